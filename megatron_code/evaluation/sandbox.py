"""Run generated Python (a solution plus its test asserts) in a contained child process.

Threat model. A study scores thousands of programs written by a model trained on arbitrary
code, so every program is treated as hostile: it may try to leave its sandbox, harm the
evaluator or other processes on the machine, or be counted as passing when its tests fail. It
runs as the evaluator's user (root included) on a machine shared with other work.

What a program cannot do. Before its first line runs, the child (sandbox_runner.py, started as
`python -S -s -B -P`, standard library only, in a new session) applies to itself what the kernel
enforces from then on, then executes a fresh interpreter that never loads ctypes to run it:
- seccomp, deny by default: an allow-list of the system calls CPython needs to run a program
  (measured with strace; README), everything else failing with EPERM, so a program fails
  cleanly. So no processes or threads, no sockets of any family, no signal except to itself
  (kill, tkill and tgkill checked; rt_sigqueueinfo, rt_tgsigqueueinfo and pidfd_* refused), no
  signal handlers, prlimit64 only with pid 0, nothing that traces, reads or re-limits another
  process (ptrace, process_vm_*, kcmp, setpriority, ...), fcntl and ioctl only with the
  commands CPython uses (not F_SETOWN, which sends SIGIO to a chosen process);
- Landlock, where the kernel has it: files written, made or removed only beneath the sample's
  own folder; files read only there, in the Python installation and system libraries (not
  /proc, so no process's memory or environment, not /tmp or home folders); with ABI >= 4 no
  TCP; with ABI >= 6 signals and abstract unix sockets scoped to the process. Without Landlock
  a Python audit hook refuses writes outside the folder and reads of /proc (native code could
  bypass it, but the guard below refuses native code); the evaluator says so once per run;
- rlimits on CPU time, address space (MemoryError, status "memory"), file size and core
  dumps; no capabilities; no_new_privs; death with the evaluator (PR_SET_PDEATHSIG); first
  pick of the OOM killer (oom_score_adj 1000);
- inherited from the evaluator: stdin, stdout and stderr only (stdin reads /dev/null), no
  number in argv, an environment of PATH, HOME, TMPDIR (its folder), LANG and PYTHONHASHSEED=0.

What a program cannot forge. The evaluator sends each sample a fresh random nonce on stdin. The
runner keeps it only inside an audit hook and writes it to stdout when, and only when, the
runner's own frame reaches the line after the tests ran to their end; "passed" needs that nonce
and exit status 0. The tests run with the builtins as they were before the program ran, so
replacing `builtins.compile` or `exec` changes nothing; tracing (which can jump over asserts),
gc introspection, ctypes, extra audit hooks, hand-built code objects, os.exec* and native
code from outside the standard library are refused, so the program cannot read the nonce or skip its
tests. Output is read up to a bound; the evaluator's memory stays flat whatever a program writes.

What a program can still do: read what Landlock leaves readable (the standard library, system
libraries), burn its own CPU time, memory and output up to the limits, fill its folder with
files of up to the file-size limit each for as long as it runs (the folder goes after the
sample), and print anything (results files keep the end of its output). Its tests run in its own interpreter, so it can
make its asserts hold by rigging what they compare (an object equal to everything, a patched
module a test calls, changing the test's namespace while it runs): such a program is visibly
wrong in its source. Its interpreter's memory safety is CPython's: hand-made bytecode fed to
`marshal.loads` (which the import system needs) or a memory-safety bug in CPython could reach
the nonce. It is not a boundary against a kernel exploit. Linux on x86-64 or arm64 only (the
allow-list was measured on x86-64; arm64 uses the same calls' numbers, and every evaluation run
first checks that a known-good program passes). Python 3.10 to 3.13.

Statuses (`ExecResult.status`): passed; failed (an assert or error, or the program exited
before its tests ended); timeout (wall clock or CPU); memory (MemoryError, or killed by the OOM
killer); output_limit; killed(SIGNAL) (any other death by signal, e.g. a segfault or its own
SIGKILL); sandbox_error (the sandbox could not run it: the evaluator is out of file descriptors,
containment failed, ...).

Temporary folders: one folder per evaluation run (process), <tmp>/megatron_code_sandbox-<uid>/
run-*, locked while its process lives and removed at its exit; every run first removes the
folders of runs whose process is gone, even one killed with SIGKILL. Each sample's folder is
removed after the sample.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_code.evaluation import sandbox_runner as runner
from megatron_code.evaluation.sandbox_runner import landlock_abi

__all__ = ["ExecResult", "Limits", "SandboxUnavailable", "landlock_abi", "run_python", "sandbox_features"]


class SandboxUnavailable(RuntimeError):
    """Code cannot be executed safely here; the message says why."""


@dataclass(frozen=True)
class Limits:
    seconds: float = 5.0
    """Wall-clock limit on running the sample (interpreter start-up excluded); CPU time is
    limited to the same, rounded up, plus one second."""
    memory_mb: int = 512
    """Address-space limit of the child (Python itself needs about 30 MB)."""
    output_bytes: int = 16_384
    """Output kept; a sample that prints more is stopped (status output_limit)."""
    file_bytes: int = 1 << 20
    """Largest file the sample may write in its folder."""


@dataclass(frozen=True)
class ExecResult:
    status: str
    """passed | failed | timeout | memory | output_limit | killed(SIGNAL) | sandbox_error (the
    module docstring says when)."""
    output: str
    """stdout and stderr, interleaved, cut at the output limit; for sandbox_error, why."""
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_STARTUP_SECONDS = 60.0
"""Allowance for starting the interpreter, which does not count against the sample's limit."""
_NONCE_BYTES = 16
_SELF_TEST = ("import bisect, collections, datetime, decimal, fractions, functools, heapq, itertools, json, math\n"
              "import random, re, string, typing, dataclasses\n"
              "def f(xs):\n    return sorted(collections.Counter(xs).elements())\n",
              "assert f([2, 1, 2]) == [1, 2, 2] and math.gcd(12, 18) == 6\n")
"""A known-good program each evaluation run checks first: a missing system call in the allow-list
(another kernel, libc or architecture) would otherwise fail every sample silently."""


def sandbox_features() -> dict:
    """What contains a sample on this machine (recorded with code-execution results). The first
    call in a process prepares its evaluation run: raises SandboxUnavailable where code cannot
    run contained, says once when Landlock is missing or old, and checks that a known-good
    program passes."""
    return _evaluation_run().features


def run_python(source: str, tests: str, limits: Limits = Limits()) -> ExecResult:
    """Run `source` as the module `solution`, then `tests` in its namespace, in a contained child
    (see the module docstring)."""
    return _evaluation_run().execute(source, tests, limits)


# ---------------------------------------------------------------------------- the evaluation run

_run: _EvaluationRun | None = None
_run_lock = threading.Lock()


def _evaluation_run() -> _EvaluationRun:
    global _run
    with _run_lock:
        if _run is None or _run.pid != os.getpid():  # a forked child makes its own
            _run = _EvaluationRun()
        return _run


class _EvaluationRun:
    """This process's folder for samples, locked while it lives; what contains a sample here."""

    def __init__(self):
        try:
            runner.arch()
        except OSError as e:
            raise SandboxUnavailable(str(e)) from None
        self.pid = os.getpid()
        base = Path(tempfile.gettempdir()) / f"megatron_code_sandbox-{os.getuid()}"
        base.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(base)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise SandboxUnavailable(f"{base} is not a folder of this user's; remove it")
        self.folder = Path(tempfile.mkdtemp(prefix="run-", dir=base))
        self._lock = os.open(self.folder / "lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        atexit.register(self.close)
        _remove_stale_runs(base, self.folder)
        abi = landlock_abi()
        self.features = {
            "seccomp": f"allow-list of {len(runner.ALLOWED)} system calls and {len(runner._checked_calls(0))} checked "
                       "by argument, EPERM otherwise: no processes, threads or sockets; signals and limits only for "
                       "the program itself",
            "landlock": (f"ABI {abi}: writes only in the sample's folder, reads only there, in the Python "
                         "installation and system libraries"
                         + (", no TCP" if abi >= 4 else "")
                         + ("; signals and abstract unix sockets scoped" if abi >= 6 else "")) if abi
            else "none: writes and /proc reads guarded by a Python audit hook",
            "verdict": "a per-sample nonce the runner writes after the last assert",
        }
        if abi < 6:
            print("sandbox: " + ("this kernel has no Landlock: a Python audit hook alone keeps writes in a sample's "
                                 "folder and /proc unread" if abi == 0 else
                                 f"Landlock ABI {abi} < 6: signals and abstract unix sockets are refused by "
                                 "seccomp alone"), file=sys.stderr)
        check = self.execute(*_SELF_TEST, Limits(seconds=30.0))
        if not check.passed:
            raise SandboxUnavailable(f"the sandbox's self-test program did not pass here ({check.status}): "
                                     f"{check.output.strip()[-500:]}")

    def close(self) -> None:
        """Remove this run's folder (at exit; a forked child leaves it to its parent)."""
        if os.getpid() == self.pid and self._lock is not None:
            _remove(self.folder)
            os.close(self._lock)
            self._lock = None

    def execute(self, source: str, tests: str, limits: Limits) -> ExecResult:
        started = time.perf_counter()
        try:
            workdir = tempfile.mkdtemp(prefix="sample-", dir=self.folder)
        except OSError as e:
            return ExecResult("sandbox_error", f"sandbox: cannot make the sample's folder: {e}",
                              time.perf_counter() - started)
        try:
            status, output = _run_sample(workdir, source, tests, limits)
        finally:
            _remove(workdir)
        return ExecResult(status, output, time.perf_counter() - started)


def _remove_stale_runs(base: Path, keep: Path) -> None:
    """Remove the run folders under `base` whose process is gone (its lock is free)."""
    for entry in base.iterdir():
        if entry == keep:
            continue
        try:
            fd = os.open(entry / "lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # its process died before locking it, or is about to lock it
            if time.time() - entry.lstat().st_mtime > 60:
                _remove(entry)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its evaluator is alive
        finally:
            os.close(fd)
        _remove(entry)


def _remove(path: str | Path) -> None:
    """Remove a folder a sample may have filled with anything, read-only folders included."""
    def unlock(folder: str) -> None:
        os.chmod(folder, 0o700)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    unlock(entry.path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        try:
            unlock(str(path))
        except OSError:
            pass
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------ one sample


def _run_sample(workdir: str, source: str, tests: str, limits: Limits) -> tuple[str, str]:
    """(status, output) of one program in `workdir`."""
    nonce = secrets.token_hex(_NONCE_BYTES).encode() + b"\n"
    solution = source.encode()
    job = nonce + f"{len(solution)}\n".encode() + solution + tests.encode()
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    oom_kills = _oom_kills()
    try:
        proc = subprocess.Popen(
            [sys.executable, *runner.INTERPRETER_FLAGS, runner.__file__, runner.CONTAIN, str(os.getpid()),
             repr(limits.seconds), str(limits.memory_mb), str(limits.file_bytes)],
            cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
    except OSError as e:
        return "sandbox_error", f"sandbox: cannot start the interpreter: {e}"
    try:
        output, stopped = _collect(proc, job, len(runner.READY) + limits.output_bytes + len(nonce), limits.seconds)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session and cannot fork
        except ProcessLookupError:
            pass
        _, wait_status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(wait_status)  # reaped here, for its resource usage
        proc.stdin.close()
        proc.stdout.close()
    if not output.startswith(runner.READY):
        why = "did not start within the start-up allowance" if stopped else f"exited with {proc.returncode}"
        return "sandbox_error", f"sandbox: the contained interpreter {why}: {output.decode('utf-8', 'replace')}"
    output = output[len(runner.READY):]
    finished = nonce in output
    output = output.replace(nonce, b"", 1)
    if stopped:
        status = stopped
    elif len(output) > limits.output_bytes:
        status = "output_limit"
    elif os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        cpu = usage.ru_utime + usage.ru_stime
        if sig == signal.SIGXCPU or sig == signal.SIGKILL and cpu >= int(limits.seconds) + 1:
            status = "timeout"
        elif sig == signal.SIGKILL and oom_kills is not None and (_oom_kills() or 0) > oom_kills:
            status = "memory"
        else:
            status = f"killed({signal.Signals(sig).name})"
    elif proc.returncode == 0 and finished:
        status = "passed"
    else:
        status = "memory" if proc.returncode == runner.MEMORY_EXIT else "failed"
    return status, output[: limits.output_bytes].decode("utf-8", "replace")


def _collect(proc: subprocess.Popen, job: bytes, budget: int, seconds: float) -> tuple[bytes, str | None]:
    """Write the job, read at most `budget` bytes of output until the child has exited (it is not
    reaped), or stop it: (output, None | "timeout" | "output_limit"). The sample's clock starts
    when the runner says it is contained."""
    output, pending, stopped = bytearray(), memoryview(job), None
    deadline = time.monotonic() + _STARTUP_SECONDS
    started = eof = exited = False
    os.set_blocking(proc.stdin.fileno(), False)
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll for the exit
        pidfd = None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, "output")
        selector.register(proc.stdin, selectors.EVENT_WRITE, "job")
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ, "exit")
        while not (eof and exited) and stopped is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            if pidfd is None and eof:
                exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                remaining = min(remaining, 0.01)
            for key, _ in selector.select(timeout=remaining):
                if key.data == "exit":
                    exited = True
                    selector.unregister(key.fileobj)
                elif key.data == "job":
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending[:1 << 16]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                else:
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        eof = True
                        selector.unregister(proc.stdout)
                        continue
                    output += chunk
                    if not started and output.startswith(runner.READY):
                        started = True
                        deadline = time.monotonic() + seconds
                    if len(output) > budget:
                        stopped = "output_limit"
    if pidfd is not None:
        os.close(pidfd)
    return bytes(output[:budget + 1]), stopped


def _oom_kills() -> int | None:
    """The kernel's count of OOM kills so far (/proc/vmstat), None where it cannot be read."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
