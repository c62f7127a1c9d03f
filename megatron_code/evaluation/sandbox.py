"""Run generated Python (a solution plus its test asserts) in a contained child process.

The parent starts `python -I -S -B sandbox.py` (isolated, standard library only, no bytecode
files) in a fresh temporary directory and a new session, reads at most `Limits.output_bytes` of
its output, and kills the process group at the wall-clock limit. Before the sample's code runs,
the child (this file run as a script) applies, to itself, limits the kernel enforces:

- resources: address space (`memory_mb`), CPU seconds, largest file written, no core dumps;
- no new processes or threads: a seccomp filter fails fork/vfork/clone/clone3;
- no network: the same filter fails socket() for every family but AF_UNIX, and io_uring;
- no signals, ptrace or memory access aimed at other processes;
- writes only beneath its working directory (Landlock), and no capabilities when run as root.

Where Landlock is missing (older kernels, or one that does not enable it) the write rule falls
back to a Python audit hook, which native code could bypass; `sandbox_features()` says which
applies. Linux on x86-64 or arm64 only: elsewhere code execution refuses to run. This contains
the mistakes a language model makes (endless loops, fork bombs, huge outputs, stray file
writes); it is not a security boundary against a determined attacker with a kernel exploit.

A sample passes when its tests ran to the end: the child reports completion on a private pipe
after the last assert, so `sys.exit(0)` or `os._exit(0)` inside a solution is a failure.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass


class SandboxUnavailable(RuntimeError):
    """Code cannot be executed safely on this platform; the message says why."""


@dataclass(frozen=True)
class Limits:
    seconds: float = 5.0
    """Wall-clock limit on running the sample (interpreter start-up excluded); CPU time is
    limited to the same (rounded up)."""
    memory_mb: int = 512
    """Address-space limit of the child (Python itself needs about 30 MB)."""
    output_bytes: int = 16_384
    """Output kept; a sample that prints more is stopped and fails."""
    file_bytes: int = 1 << 20
    """Largest file the sample may write in its directory."""


@dataclass(frozen=True)
class ExecResult:
    status: str
    """passed | failed (an assert or error) | exited (left before its tests ended) | timeout |
    output_limit."""
    output: str
    """stdout and stderr, interleaved, cut at the output limit."""
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_STARTED, _DONE = b"contained\n", b"tests completed\n"
"""What the child reports on its private pipe: limits in place (the clock starts), tests done."""
_STARTUP_SECONDS = 60.0
"""Allowance for starting the interpreter, which does not count against the sample's limit."""
_EXITED = 3
"""The child's exit code when the solution raised SystemExit before its tests ran."""

# Per architecture: the audit arch id and the syscall numbers the filter needs.
_ARCHES = {
    "x86_64": dict(audit=0xC000003E, fork=57, vfork=58, clone=56, clone3=435, socket=41, kill=62, tkill=200,
                   tgkill=234, ptrace=101, process_vm_readv=310, process_vm_writev=311, pidfd_open=434,
                   pidfd_send_signal=424, pidfd_getfd=438, io_uring_setup=425, capset=126),
    "aarch64": dict(audit=0xC00000B7, clone=220, clone3=435, socket=198, kill=129, tkill=130, tgkill=131,
                    ptrace=117, process_vm_readv=270, process_vm_writev=271, pidfd_open=434,
                    pidfd_send_signal=424, pidfd_getfd=438, io_uring_setup=425, capset=91),
}
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on both


def _arch() -> dict:
    machine = platform.machine()
    arch = _ARCHES.get({"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine))
    if sys.platform != "linux" or arch is None:
        raise SandboxUnavailable(f"running generated code needs Linux on x86_64 or aarch64 (seccomp); "
                                 f"this is {sys.platform} {machine}")
    return arch


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none."""
    if sys.platform != "linux":
        return 0
    return max(0, _libc().syscall(_LANDLOCK_CREATE_RULESET, None, 0, 1))  # flag 1: ask the version


def sandbox_features() -> dict:
    """What contains a sample on this machine (recorded with code-execution results)."""
    _arch()
    return {"seccomp": "no processes, threads or network sockets",
            "writes": "landlock" if landlock_abi() else "python audit hook (no Landlock in this kernel)"}


# ------------------------------------------------------------------------------------ parent side


def run_python(source: str, tests: str, limits: Limits = Limits()) -> ExecResult:
    """Run `source`, then `tests`, in a contained child (see the module docstring)."""
    _arch()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="megatron_code_exec_", ignore_cleanup_errors=True) as workdir:
        with open(os.path.join(workdir, "solution.py"), "w") as f:
            f.write(source)
        with open(os.path.join(workdir, "tests.py"), "w") as f:
            f.write(tests)
        done_read, done_write = os.pipe()
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), workdir, json.dumps(asdict(limits)),
                 str(done_write)],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, pass_fds=(done_write,))
        finally:
            os.close(done_write)
        try:
            output, status = _collect(proc, done_read, limits)
        finally:
            _kill_group(proc)
            proc.stdout.close()
            os.close(done_read)
    return ExecResult(status, output.decode("utf-8", "replace"), time.perf_counter() - started)


def _collect(proc: subprocess.Popen, done_fd: int, limits: Limits) -> tuple[bytes, str]:
    """Read output and the completion pipe until the child exits or breaks a limit."""
    deadline = time.monotonic() + _STARTUP_SECONDS
    output, done, status = bytearray(), bytearray(), None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(done_fd, selectors.EVENT_READ, "done")
        while sel.get_map() and status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(timeout=remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "done":
                    if not done:  # the sample starts now
                        deadline = time.monotonic() + limits.seconds
                    done += chunk
                else:
                    output += chunk
                    if len(output) > limits.output_bytes:
                        status = "output_limit"
    if status is None:
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        except subprocess.TimeoutExpired:
            status = "timeout"
        else:
            cpu_killed = code in (-signal.SIGXCPU, -signal.SIGKILL)
            finished = bytes(done) == _STARTED + _DONE
            status = ("passed" if code == 0 and finished else "timeout" if cpu_killed
                      else "exited" if code in (0, _EXITED) and not finished else "failed")
    return bytes(output[: limits.output_bytes]), status


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session and cannot fork
    except ProcessLookupError:
        pass
    proc.wait()


# ------------------------------------------------------------------------------------- child side


def _set_rlimits(limits: Limits) -> None:
    cpu = int(limits.seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    memory = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))  # not enforced for root; the filter is


def _restrict_writes(libc, workdir: str) -> bool:
    """Landlock: file-system changes only beneath `workdir` (and writes to /dev/null)."""
    abi = landlock_abi()
    if abi == 0:
        return False
    write_file, truncate = 1 << 1, 1 << 14
    handled = write_file | sum(1 << b for b in range(4, 13))  # remove and make files, dirs, links, ...
    handled |= (1 << 13 if abi >= 2 else 0) | (truncate if abi >= 3 else 0)  # refer, truncate
    ruleset = _check(libc.syscall(_LANDLOCK_CREATE_RULESET, ctypes.byref(ctypes.c_uint64(handled)), 8, 0),
                     "landlock_create_ruleset")
    for path, allowed in ((workdir, handled), (os.devnull, handled & (write_file | truncate))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", allowed, fd)  # landlock_path_beneath_attr (packed)
        _check(libc.syscall(_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.c_char_p(rule), 0), f"landlock_add_rule {path}")
        os.close(fd)
    _check(libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return True


def _audit_writes(workdir: str):
    """Fallback without Landlock: refuse Python-level writes outside `workdir`."""
    root = os.path.realpath(workdir) + os.sep
    changes = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
               "os.truncate", "shutil.rmtree", "os.utime", "os.chown"}

    def inside(path) -> bool:
        return isinstance(path, (str, bytes)) and os.path.realpath(os.fsdecode(path)).startswith(root)

    def hook(event, args):
        writes = event == "open" and (args[1] is None or any(c in str(args[1]) for c in "wax+")
                                      or isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR))
        if (writes or event in changes) and args and not isinstance(args[0], int) and not inside(args[0]) \
                and os.fsdecode(args[0]) != os.devnull:
            raise PermissionError(f"sandbox: {event} outside the working directory: {args[0]!r}")
    return hook


def _drop_capabilities(libc, arch: dict) -> None:
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(libc.syscall(arch["capset"], ctypes.c_char_p(header), ctypes.c_char_p(bytes(24))), "capset")


def _seccomp_filter(arch: dict, pid: int) -> bytes:
    """A classic-BPF program over seccomp_data: fail process creation, non-unix sockets and
    anything aimed at another process; allow the rest."""
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000

    def errno(e: int) -> int:
        return 0x00050000 | e

    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch["audit"]), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if arch["audit"] == _ARCHES["x86_64"]["audit"]:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, errno(38))]  # x32 calls: ENOSYS
    fails = {"fork": 11, "vfork": 11, "clone": 11, "clone3": 38, "ptrace": 1, "process_vm_readv": 1,
             "process_vm_writev": 1, "pidfd_open": 1, "pidfd_send_signal": 1, "pidfd_getfd": 1,
             "io_uring_setup": 1}  # EAGAIN, or ENOSYS so libc falls back to clone, or EPERM
    for name, err in fails.items():
        if name in arch:
            prog += [(jeq, 0, 1, arch[name]), (ret, 0, 0, errno(err))]
    for name, allowed_arg, err in (("socket", 1, 97), ("kill", pid, 1), ("tkill", pid, 1), ("tgkill", pid, 1)):
        # first argument (low 32 bits): AF_UNIX for socket (else EAFNOSUPPORT), this process for signals
        prog += [(jeq, 0, 4, arch[name]), (ld, 0, 0, 16), (jeq, 0, 1, allowed_arg), (ret, 0, 0, allow),
                 (ret, 0, 0, errno(err))]
    prog.append((ret, 0, 0, allow))
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _install_seccomp(libc, arch: dict) -> None:
    code = _seccomp_filter(arch, os.getpid())
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(buffer))  # struct sock_fprog
    pr_set_seccomp, seccomp_mode_filter = 22, 2
    fprog_buffer = ctypes.create_string_buffer(fprog, len(fprog))
    _check(libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.addressof(fprog_buffer), 0, 0), "seccomp")


def _child_main(workdir: str, limits: Limits, done_fd: int) -> None:
    arch, libc = _arch(), _libc()
    os.chdir(workdir)
    sources = [(name, open(name).read()) for name in ("solution.py", "tests.py")]
    _set_rlimits(limits)
    pr_set_no_new_privs = 38
    _check(libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0), "no_new_privs")
    if not _restrict_writes(libc, workdir):
        sys.addaudithook(_audit_writes(workdir))
    _drop_capabilities(libc, arch)
    _install_seccomp(libc, arch)
    del libc
    os.write(done_fd, _STARTED)
    namespace = {"__name__": "__main__"}
    for name, source in sources:
        try:
            exec(compile(source, name, "exec"), namespace)
        except SystemExit:  # a solution that exits has not run its tests
            os._exit(_EXITED)
    os.write(done_fd, _DONE)


if __name__ == "__main__":
    _child_main(sys.argv[1], Limits(**json.loads(sys.argv[2])), int(sys.argv[3]))
