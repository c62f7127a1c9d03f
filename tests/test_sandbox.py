"""The code sandbox attacked as hostile generated code would: every program goes through
`run_python(source, tests)`, the way pass@1 runs it. Each escape the sandbox once let through
(signals by rt_sigqueueinfo & co., prlimit64 on the evaluator, unix sockets, forged verdicts, a
flood of the evaluator's memory, wrong labels, leftover folders) has a test here that fails when
the defence is removed. Signals only ever target a sibling process the test itself starts, and
sockets only listeners it opens. Linux (the raw system call numbers: x86-64, as CI)."""
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_code.evaluation import sandbox
from megatron_code.evaluation.sandbox import Limits, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox runs on Linux only")
x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="raw system calls by their x86-64 numbers")

ADD = 'def add(a, b):\n    """Return a + b."""\n'
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
WRONG_TESTS = "assert add(1, 2) == 4\nassert add(2, 2) == 5\nfinished = True\n"
LIMITS = Limits(seconds=2.0, memory_mb=256, output_bytes=4096, file_bytes=1 << 16)
REPO = Path(__file__).resolve().parent.parent

SOLUTIONS = {
    "correct": ("    return a + b\n", "passed"),
    "wrong": ("    return a - b\n", "failed"),
    "crashing": ("    return a / 0\n", "failed"),
    "syntax error": ("    return a +\n", "failed"),
    "infinite loop": ("    while True:\n        pass\n", "timeout"),
    "sleeps": ("    import time\n    time.sleep(60)\n", "timeout"),
    "exits before the tests": ("    return a + b\nimport sys\nsys.exit(0)\n", "failed"),
    "os._exit before the tests": ("    return a + b\nimport os\nos._exit(0)\n", "failed"),
    "huge output": ("    return a + b\nwhile True:\n    print('x' * 10000)\n", "output_limit"),
    "huge memory": ("    return a + b\nblob = bytearray(1 << 30)\n", "memory"),
    "huge file": ("    return a + b\nopen('big', 'wb').write(b'x' * (1 << 20))\n", "failed"),
    "threads": ("    return a + b\nimport threading\nthreading.Thread(target=print).start()\n", "failed"),
    "subprocess": ("    return a + b\nimport subprocess\nsubprocess.run(['true'])\n", "failed"),
    "kills itself": ("    return a + b\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed(SIGKILL)"),
    "aborts": ("    return a + b\nimport os\nos.abort()\n", "killed(SIGABRT)"),
    "signals the evaluator": ("    return a + b\nimport os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n", "failed"),
    "a main block that reads input": ("    return a + b\nif __name__ == '__main__':\n"
                                      "    add(*map(int, input().split()))\n", "passed"),
}


@pytest.mark.parametrize("kind", SOLUTIONS)
def test_each_kind_of_solution_gets_its_exact_status(kind):
    body, expected = SOLUTIONS[kind]
    result = run_python(ADD + body, TESTS, LIMITS)
    assert result.status == expected, result.output
    assert len(result.output.encode()) <= LIMITS.output_bytes
    assert result.seconds < LIMITS.seconds + 10  # the limit plus interpreter start-up on a busy machine


def test_generated_code_patterns_run(tmp_path):
    """What generated solutions do (the standard library's common modules, recursion, big lists,
    files in their folder, exceptions, the clock) still works under the allow-list."""
    program = textwrap.dedent("""\
        import bisect, collections, dataclasses, datetime, decimal, fractions, functools, heapq, itertools
        import json, math, random, re, string, typing, statistics, copy, operator, enum, hashlib, textwrap, time
        from typing import List, Optional

        @dataclasses.dataclass(order=True)
        class Item:
            weight: int
            name: str = ""

        @functools.lru_cache(maxsize=None)
        def fib(n: int) -> int:
            return n if n < 2 else fib(n - 1) + fib(n - 2)

        def depth(n: int) -> int:
            return 0 if n == 0 else 1 + depth(n - 1)

        def solve(xs: List[int]) -> Optional[int]:
            heap = list(xs)
            heapq.heapify(heap)
            return heapq.heappop(heap) if heap else None
        Point = collections.namedtuple("Point", "x y")
        T = typing.TypeVar("T")
        """)
    tests = textwrap.dedent("""\
        assert solve([5, 3, 9]) == 3 and solve([]) is None
        assert fib(80) == 23416728348467685 and depth(900) == 900
        big = list(range(2_000_000)); assert sum(big) == 1999999000000
        assert bisect.bisect_left([1, 3, 5], 4) == 2
        assert collections.Counter("abca").most_common(1) == [("a", 2)] and Point(1, 2).y == 2
        assert sorted([Item(2, "b"), Item(1, "a")])[0].name == "a"
        assert datetime.date(2024, 1, 31) + datetime.timedelta(days=1) == datetime.date(2024, 2, 1)
        assert datetime.datetime.now().year >= 2024 and time.time() > 0 and time.perf_counter() >= 0
        assert decimal.Decimal("0.1") + decimal.Decimal("0.2") == decimal.Decimal("0.3")
        assert fractions.Fraction(1, 3) * 3 == 1 and math.isclose(math.sqrt(2) ** 2, 2)
        assert list(itertools.permutations("ab")) == [("a", "b"), ("b", "a")]
        assert json.loads(json.dumps({"a": [1, 2]})) == {"a": [1, 2]}
        assert re.findall(r"\\d+", "a1b22") == ["1", "22"] and string.ascii_lowercase[0] == "a"
        random.seed(0); assert 0 <= random.random() < 1 and len(random.sample(range(10), 3)) == 3
        assert statistics.median([3, 1, 2]) == 2 and copy.deepcopy({"a": [1]}) == {"a": [1]}
        assert functools.reduce(operator.mul, [1, 2, 3]) == 6 and enum.Enum("C", "R G").R.value == 1
        assert len(hashlib.sha256(b"x").hexdigest()) == 64 and textwrap.dedent("  a") == "a"
        with open("scratch.txt", "w") as f:
            f.write("hello")
        assert open("scratch.txt").read() == "hello"
        try:
            {}["missing"]
        except KeyError:
            pass
        print("ok")
        """)
    result = run_python(program, tests, Limits(seconds=20.0, memory_mb=512))
    assert result.status == "passed", result.output
    assert result.output.strip() == "ok"


def test_hash_seed_is_fixed_so_runs_repeat():
    """String hashing (set order) is the same in every run, so a score is reproducible."""
    program = "print(hash('megatron'), list({'a', 'b', 'c', 'd', 'e'}))\n"
    first, second = run_python(program, "", LIMITS), run_python(program, "", LIMITS)
    assert first.status == second.status == "passed"
    assert first.output == second.output


def test_nothing_is_handed_to_the_program():
    """No file descriptor but stdin, stdout and stderr; no number in argv or the environment."""
    program = textwrap.dedent("""\
        import os, sys
        fds = []
        for fd in range(1024):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                pass
        print(fds)
        print(sys.argv)
        print(sorted(os.environ))
        """)
    result = run_python(program, "", LIMITS)
    fds, argv, env = result.output.splitlines()
    assert result.status == "passed"
    assert fds == "[0, 1, 2]"
    assert not any(ch.isdigit() for arg in eval(argv)[1:] for ch in arg), argv
    assert set(eval(env)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "PYTHONHASHSEED"}, env


# ------------------------------------------------------------------------------ forged verdicts

FORGERIES = {
    "replaces builtins.compile": "import builtins\n_compile = builtins.compile\nbuiltins.compile = "
                                 "lambda source, name, mode, *a, **k: _compile('pass', name, mode)\n",
    "replaces builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
    "writes a completion message to every descriptor": textwrap.dedent("""\
        import os, sys
        for fd in {int(a) for a in sys.argv if a.isdigit()} | set(range(256)):
            try:
                os.write(fd, b"tests completed\\n")
            except OSError:
                pass
        os._exit(0)
        """),
    "jumps over the asserts with a trace function": textwrap.dedent("""\
        import sys
        def tracer(frame, event, arg):
            if frame.f_code.co_name == "<module>" and frame.f_globals.get("add") is add:
                if event == "line" and frame.f_lineno < 3:
                    frame.f_lineno = 3
                return tracer
            return None
        sys.settrace(tracer)
        """),
    "reads its standard input": "import os, sys\nos.write(1, sys.stdin.buffer.read())\nos._exit(0)\n",
    "prints every string in the runner's frames": textwrap.dedent("""\
        import os, sys
        frame = sys._getframe()
        while frame is not None:
            for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
                if isinstance(value, (str, bytes)):
                    os.write(1, value if isinstance(value, bytes) else value.encode("utf-8", "replace"))
            frame = frame.f_back
        os._exit(0)
        """),
    "searches the heap for the nonce": textwrap.dedent("""\
        import gc, os
        for o in gc.get_objects():
            for value in ([c.cell_contents for c in o.__closure__ or ()] if callable(o) and hasattr(o, "__closure__")
                          else list(o.values()) if isinstance(o, dict) else list(o) if isinstance(o, (list, tuple))
                          else []):
                if isinstance(value, bytes) and len(value) == 33 and value.endswith(b"\\n"):
                    os.write(1, value)
        os._exit(0)
        """),
    "raises the completion event from every frame": textwrap.dedent("""\
        import os, sys
        frame = sys._getframe()
        while frame is not None:
            for event in ("megatron_code.sandbox.arm", "megatron_code.sandbox.done"):
                sys.audit(event, frame)
            frame = frame.f_back
        os._exit(0)
        """),
    "arms its own frame at the completion line": textwrap.dedent("""\
        import sys
        runner = sys.modules["__main__"]
        line = max(n for _, _, n in runner._run_tests.__code__.co_lines() if n)
        forged = "\\n" * (line - 1) + ("import os, sys; frame = sys._getframe(); sys.audit(runner.ARM_EVENT, frame); "
                                      "sys.audit(runner.DONE_EVENT, frame); os._exit(0)\\n")
        exec(compile(forged, "forged", "exec"), {"runner": runner})
        """),
    "raises the completion event from a finalizer": textwrap.dedent("""\
        import functools, gc, sys
        frames, frame = [], sys._getframe()
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        class Trigger:
            pass
        for frame in frames:
            Trigger.__del__ = functools.partial(sys.audit, "megatron_code.sandbox.done", frame)
            a, b = Trigger(), Trigger()
            a.other, b.other = b, a
            del a, b
        gc.set_threshold(1)
        """),
    "installs a signal handler": "import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\n",
    "adds an audit hook": "import sys\nsys.addaudithook(lambda *a: None)\n",
    "uses ctypes": "import ctypes\nctypes.memmove(0, 0, 0)\n",
    "builds its own code object": "(lambda: 0).__code__.replace(co_consts=(1,))\n",
}


@pytest.mark.parametrize("attack", FORGERIES)
def test_verdicts_cannot_be_forged(attack):
    """Wrong solutions plus an attempt to pass anyway: never "passed"."""
    result = run_python(ADD + "    return a - b\n" + FORGERIES[attack], WRONG_TESTS, LIMITS)
    assert result.status != "passed", result.output
    assert result.status in ("failed", "timeout", "output_limit"), (result.status, result.output)


def test_tests_run_with_the_builtins_from_before_the_program():
    """A program that rigs a builtin its tests call (abs) does not change what they compute."""
    rigged = ADD + "    return a - b\nimport builtins\nbuiltins.abs = lambda x: 0\n"
    assert run_python(rigged, "assert abs(add(2, 2) - 5) == 0\n", LIMITS).status == "failed"
    assert run_python(ADD + "    return a + b\n", "assert abs(add(2, 2) - 5) == 1\n", LIMITS).passed


def test_a_native_module_from_the_sample_folder_is_refused():
    """Native code would bypass every Python-level check: extension modules load only from the
    Python installation (here a copy of the standard library's own _bisect under another path)."""
    import _bisect

    program = textwrap.dedent(f"""\
        import importlib.util, shutil
        shutil.copy({_bisect.__file__!r}, {Path(_bisect.__file__).name!r})
        spec = importlib.util.spec_from_file_location("_bisect", "./" + {Path(_bisect.__file__).name!r})
        module = importlib.util.module_from_spec(spec)
        print("loaded", module)
        """)
    result = run_python(program, "", LIMITS)
    assert result.status == "failed" and "loaded" not in result.output, result.output


def test_the_program_shares_no_process_with_ctypes():
    """ctypes reads and writes any byte of its process (its types stay reachable through
    object.__subclasses__() even without the module), so the contained image never loads it."""
    program = textwrap.dedent("""\
        import sys
        seen, todo = set(), [object]
        while todo:
            cls = todo.pop()
            if cls not in seen:
                seen.add(cls)
                todo.extend(type.__subclasses__(cls))
        print(sorted({c.__module__ for c in seen if "ctypes" in str(c.__module__)}),
              [m for m in sys.modules if "ctypes" in m])
        """)
    result = run_python(program, "", LIMITS)
    assert result.status == "passed" and result.output == "[] []\n", result.output


# ------------------------------------------------------------------------ other processes, network


@pytest.fixture
def sibling():
    """A process of the test's own for hostile programs to aim at."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


SIGNAL_ROUTES = {
    "rt_sigqueueinfo": "libc.syscall(129, PID, 9, info)",
    "rt_tgsigqueueinfo": "libc.syscall(297, PID, PID, 9, info)",
    "kill": "libc.syscall(62, PID, 9)",
    "pidfd_send_signal": "import signal\nsignal.pidfd_send_signal(os.pidfd_open(PID), 9)",
    "os.kill": "os.kill(PID, 9)",
}


@x86_64
@pytest.mark.parametrize("route", SIGNAL_ROUTES)
def test_signals_to_another_process_fail(route, sibling):
    program = textwrap.dedent("""\
        import ctypes, os, struct
        libc = ctypes.CDLL(None, use_errno=True)
        info = ctypes.create_string_buffer(struct.pack("iii", 9, 0, -1), 128)  # SIGKILL, SI_QUEUE
        """) if "libc" in SIGNAL_ROUTES[route] else "import os\n"
    program += textwrap.dedent(f"""\
        result = {SIGNAL_ROUTES[route].replace("PID", str(sibling.pid))}
        if isinstance(result, int) and result < 0:
            raise OSError(ctypes.get_errno(), "refused")
        """)
    result = run_python(program, "", LIMITS)
    time.sleep(0.2)
    assert sibling.poll() is None, f"{route} killed the sibling process: {result.status} {result.output}"
    assert result.status == "failed", result.output


def layer_alone(apply: str, sibling_pid: int, body: str, tmp: Path) -> dict:
    """Run `body` (which fills `results`) in a plain Python process after `apply` (a statement
    using the runner's functions): one layer of the sandbox, without the others."""
    script = textwrap.dedent("""\
        import ctypes, json, os, socket, struct, sys
        from megatron_code.evaluation.sandbox_runner import apply_landlock, apply_seccomp
        sibling = {sibling}
        pidfd = os.pidfd_open(sibling)  # opened before: sending through it must still fail
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        info = ctypes.create_string_buffer(struct.pack("iii", 9, 0, -1), 128)  # SIGKILL, SI_QUEUE
        buffer = ctypes.create_string_buffer(64)

        def call(nr, *args):
            ctypes.set_errno(0)
            return 0 if libc.syscall(nr, *args) >= 0 else ctypes.get_errno()

        def attempt(action):
            try:
                action()
                return 0
            except OSError as e:
                return e.errno
        results = {{}}
        {apply}
        """).format(sibling=sibling_pid, apply=apply) + textwrap.dedent(body) + "print(json.dumps(results))\n"
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@x86_64
def test_the_system_call_filter_alone_refuses_other_processes_and_sockets(sibling, tmp_path):
    """The seccomp layer by itself, with raw system calls (x86-64 numbers): everything that
    signals, re-limits, traces or reads another process, and every socket, fails with EPERM;
    what a program needs for itself works."""
    results = layer_alone("apply_seccomp()", sibling.pid, """\
        me = os.getpid()
        for name, args in {
            "rt_sigqueueinfo": (129, sibling, 9, info), "rt_tgsigqueueinfo": (297, sibling, sibling, 9, info),
            "pidfd_send_signal": (424, pidfd, 9, None, 0), "pidfd_open": (434, sibling, 0),
            "pidfd_getfd": (438, pidfd, 0, 0), "kill": (62, sibling, 9), "tkill": (200, sibling, 9),
            "tgkill": (234, sibling, sibling, 9), "kill the process group": (62, 0, 0),
            "prlimit64 on the parent": (302, os.getppid(), 7, None, buffer),
            "prlimit64 on its own pid": (302, me, 7, None, buffer), "ptrace": (101, 16, sibling, 0, 0),
            "process_vm_readv": (310, sibling, buffer, 1, buffer, 1, 0), "kcmp": (312, me, sibling, 0, 0, 0),
            "setpriority": (141, 0, sibling, 19), "sched_setaffinity": (203, sibling, 8, buffer),
            "fcntl F_SETOWN": (72, 1, 8, sibling), "ioctl FIOSETOWN": (16, 1, 0x8901, buffer),
            "rt_sigaction": (13, 10, info, None, 8), "socket AF_UNIX": (41, 1, 1, 0),
            "socket AF_INET": (41, 2, 1, 0), "socket AF_INET6": (41, 10, 1, 0), "socket AF_NETLINK": (41, 16, 3, 0),
            "socketpair": (53, 1, 1, 0, buffer), "io_uring_setup": (425, 1, buffer),
            "execveat": (322, -1, None, None, None, 0),
        }.items():
            results[name] = call(*args)
        results["allowed"] = {"prlimit64 pid 0": call(302, 0, 7, None, buffer), "kill itself": call(62, me, 0),
                              "tgkill itself": call(234, me, me, 0), "fcntl F_GETFD": call(72, 1, 1, 0),
                              "sched_getaffinity 0": call(204, 0, 64, buffer)}
        """, tmp_path)
    allowed = results.pop("allowed")
    assert sibling.poll() is None
    assert results == {name: 1 for name in results}, {k: v for k, v in results.items() if v != 1}
    assert allowed == {name: 0 for name in allowed}, allowed


@pytest.mark.skipif(sandbox.landlock_abi() < 6, reason="Landlock ABI >= 6 scopes signals and abstract sockets")
def test_landlock_alone_scopes_signals_sockets_and_files(sibling, tmp_path):
    """The Landlock layer by itself: no signal to another process, no abstract unix socket of
    another process, no TCP, no reading /proc or files outside its folder, no writing outside."""
    abstract_name = f"\0megatron_code-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as abstract, socket.create_server(("127.0.0.1", 0)) as tcp:
        abstract.bind(abstract_name)
        abstract.listen()
        outside = tmp_path / "outside.txt"
        outside.write_text("keep")
        results = layer_alone(f"apply_landlock({str(tmp_path / 'work')!r})", sibling.pid, f"""\
            results["kill"] = attempt(lambda: os.kill(sibling, 0))
            results["abstract socket"] = attempt(lambda: socket.socket(socket.AF_UNIX).connect({abstract_name!r}))
            results["tcp"] = attempt(lambda: socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]})))
            results["proc environ"] = attempt(lambda: open(f"/proc/{{sibling}}/environ", "rb").read())
            results["own memory"] = attempt(lambda: open("/proc/self/mem", "rb"))
            results["read outside"] = attempt(lambda: open({str(outside)!r}).read())
            results["write outside"] = attempt(lambda: open({str(outside)!r}, "w"))
            results["list /tmp"] = attempt(lambda: os.listdir("/tmp"))
            results["allowed"] = [attempt(lambda: open("mine.txt", "w").write("x")),
                                  attempt(lambda: open(os.__file__).read()), attempt(lambda: os.kill(os.getpid(), 0))]
            """, tmp_path / "work")
    assert sibling.poll() is None and outside.read_text() == "keep"
    assert results.pop("allowed") == [0, 0, 0]
    assert results == {"kill": 1, "abstract socket": 1, "tcp": 13, "proc environ": 13, "own memory": 13,
                       "read outside": 13, "write outside": 13, "list /tmp": 13}, results


def test_guard_alone_without_landlock(tmp_path):
    """The audit-hook guard by itself, as where the kernel has no Landlock: no writes outside the
    folder, no /proc, and none of what would reach the runner's state or native code."""
    work, outside = tmp_path / "work", tmp_path / "outside.txt"
    work.mkdir()
    outside.write_text("keep")
    script = textwrap.dedent(f"""\
        import os, sys
        from megatron_code.evaluation.sandbox_runner import _guard
        sys.addaudithook(_guard(os.path.dirname(os.__file__), {str(work)!r}))
        os.chdir({str(work)!r})
        open("inside.txt", "w").write("ok")
        for attempt in (lambda: open({str(outside)!r}, "w"), lambda: os.remove({str(outside)!r}),
                        lambda: os.mkdir({str(tmp_path / "d")!r}), lambda: open("/proc/self/mem", "rb"),
                        lambda: sys.settrace(None), lambda: __import__("gc").get_objects(),
                        lambda: (lambda: 0).__code__.replace(), lambda: __import__("_testcapi"),
                        lambda: os.execv(sys.executable, [sys.executable])):
            try:
                attempt()
                print("allowed")
            except PermissionError:
                print("refused")
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["refused"] * 9, out.stdout + out.stderr
    assert outside.read_text() == "keep" and (work / "inside.txt").is_file()


def test_the_limits_of_other_processes_cannot_change(tmp_path):
    """prlimit64 on the evaluator (its parent) is refused; a program still lowers its own limits."""
    program = textwrap.dedent("""\
        import os, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        print("own", resource.getrlimit(resource.RLIMIT_NOFILE))
        for who, pid in (("parent", os.getppid()), ("own pid", os.getpid())):
            try:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (16, 16))
                print(who, "changed")
            except OSError as e:
                print(who, "refused", e.errno)
        """)
    report = evaluate_in_child(f"""
        import json, resource
        from megatron_code.evaluation.sandbox import Limits, run_python
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        result = run_python({program!r}, "", Limits(seconds=10))
        print(json.dumps({{"before": before, "after": resource.getrlimit(resource.RLIMIT_NOFILE),
                          "status": result.status, "output": result.output}}))
        """, tmp_path)
    assert report["after"] == report["before"], report
    assert report["output"].splitlines() == ["own (64, 64)", "parent refused 1", "own pid refused 1"], report


def test_sockets_fail_and_no_listener_hears_anything(tmp_path):
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = tmp_path / "listener.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    abstract_name = f"\0megatron_code-test-{uuid.uuid4().hex}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(abstract_name)
    listeners = {"tcp": tcp, "unix": unix, "abstract": abstract}
    for listener in listeners.values():
        listener.listen()
        listener.setblocking(False)
    targets = {"tcp": (int(socket.AF_INET), ("127.0.0.1", tcp.getsockname()[1])),
               "unix": (int(socket.AF_UNIX), str(unix_path)), "abstract": (int(socket.AF_UNIX), abstract_name),
               "tcp6": (int(socket.AF_INET6), ("::1", tcp.getsockname()[1]))}
    program = textwrap.dedent(f"""\
        import socket
        for name, (family, address) in {targets!r}.items():
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
            except OSError as e:
                print(name, "socket refused", e.errno)
                continue
            try:
                s.connect(address)
                s.sendall(b"escaped")
                print(name, "connected")
            except OSError as e:
                print(name, "connect refused", e.errno)
        try:
            socket.socketpair()
            print("socketpair made")
        except OSError as e:
            print("socketpair refused", e.errno)
        """)
    try:
        result = run_python(program, "", LIMITS)
        heard = []
        for name, listener in listeners.items():
            try:
                listener.accept()[0].close()
                heard.append(name)
            except BlockingIOError:
                pass
    finally:
        for listener in listeners.values():
            listener.close()
    assert not heard, f"listeners reached: {heard}; {result.output}"
    assert result.output.splitlines() == [f"{name} socket refused 1" for name in targets] + ["socketpair refused 1"]


# ------------------------------------------------------------------------------ the evaluator


def evaluate_in_child(script: str, tmp: Path, timeout: float = 120, limit_memory: bool = False) -> dict:
    """Run `script` (the last line it prints is JSON) as a fresh evaluator process whose
    temporary folder is `tmp`; `limit_memory` caps its address space at 3 GiB."""
    tmp.mkdir(parents=True, exist_ok=True)

    def cap():
        if limit_memory:
            resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TMPDIR": str(tmp)}, cwd=REPO, preexec_fn=cap)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_evaluator_memory_stays_flat_whatever_a_program_writes(tmp_path):
    """A program floods every descriptor it can find (the old completion pipe grew the
    evaluator by gigabytes), then its output: the evaluator's peak memory barely moves."""
    flood = textwrap.dedent("""\
        import os, sys, time
        blob = b"x" * (1 << 20)

        def write(fd):
            try:
                return os.write(fd, blob)
            except OSError:
                return 0
        targets = {int(a) for a in sys.argv if a.isdigit()} | set(range(3, 64))
        end = time.monotonic() + 4
        while time.monotonic() < end and sum(write(fd) for fd in targets):
            pass
        while True:
            os.write(1, blob)
        """)
    report = evaluate_in_child(f"""
        import json, resource
        from megatron_code.evaluation.sandbox import Limits, run_python, sandbox_features
        sandbox_features()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = run_python({flood!r}, "", Limits(seconds=3))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"grew_mib": (after - before) / 1024, "status": result.status}}))
        """, tmp_path / "tmp", limit_memory=True)
    assert report["grew_mib"] < 32, report
    assert report["status"] == "output_limit", report


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


RUN_ONE = """
    import json
    from megatron_code.evaluation.sandbox import run_python
    print(json.dumps({"status": run_python("print(1)", "").status}))
    """


def test_no_folder_outlives_a_killed_evaluator(tmp_path):
    """Another evaluation leaves a live evaluator's folder alone; kill -9 of the evaluator
    mid-sample kills its sample too, and the next evaluation removes what it left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    sleeper = "import os, time\nopen('started', 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    evaluator = subprocess.Popen(
        [sys.executable, "-c", "from megatron_code.evaluation.sandbox import Limits, run_python\n"
                               f"run_python({sleeper!r}, '', Limits(seconds=60))"],
        env={**os.environ, "TMPDIR": str(tmp)}, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (marker := [p for p in tmp.rglob("started") if p.stat().st_size]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker, "the sample never started"
        sample_pid = int(marker[0].read_text())
        assert evaluate_in_child(RUN_ONE, tmp)["status"] == "passed"
        assert marker[0].is_file(), "a second evaluation removed the folder of a live one"
    finally:
        evaluator.kill()
        evaluator.wait()
    time.sleep(0.5)
    alive = Path(f"/proc/{sample_pid}").exists() and "sandbox" in Path(f"/proc/{sample_pid}/cmdline").read_text()
    if alive:
        os.kill(sample_pid, signal.SIGKILL)
    assert not alive, "the sample outlived its evaluator"
    assert files_under(tmp), "the killed evaluator's folder should still be there before the next run"
    assert evaluate_in_child(RUN_ONE, tmp)["status"] == "passed"
    assert files_under(tmp) == [], files_under(tmp)


def test_no_folder_outlives_an_evaluator_out_of_file_descriptors(tmp_path):
    tmp = tmp_path / "tmp"
    report = evaluate_in_child("""
        import json, os, resource
        from megatron_code.evaluation.sandbox import run_python, sandbox_features
        sandbox_features()
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        os.close(held.pop())  # one left: the sample's folder can be made, not its pipes
        result = run_python("print(1)", "")
        print(json.dumps({"status": result.status}))
        """, tmp)
    assert report["status"] == "sandbox_error", report
    assert evaluate_in_child(RUN_ONE, tmp)["status"] == "passed"
    assert files_under(tmp) == [], files_under(tmp)


def test_pass_at_1_refuses_to_count_programs_the_sandbox_could_not_run():
    """An address-space limit too small for the interpreter makes every sample a sandbox_error;
    score_code says so instead of reporting pass@1 = 0."""
    from types import SimpleNamespace

    from megatron_code.data.synthetic import CodeItem
    from megatron_code.evaluation.code import score_code
    from megatron_code.evaluation.sandbox import SandboxUnavailable
    from megatron_code.evaluation.tasks import CODE, Task

    item = CodeItem("0", ADD, ("assert add(1, 2) == 3",), "    return a + b\n")
    task = Task("adds", Path("adds.jsonl"), CODE, (item,))
    characters = SimpleNamespace(encode=lambda text: [ord(c) for c in text], decode=lambda ids: "".join(map(chr, ids)),
                                 eod_id=0)
    answer = [ord(c) for c in "    return a + b\n"] + [0]
    model = SimpleNamespace(tokenizer=characters, generate=lambda batch, n, finished: [answer for _ in batch])
    assert score_code(task, model, LIMITS).metrics["pass@1"] == 1.0
    with pytest.raises(SandboxUnavailable, match="could not run 1 of 1 programs; the first: sandbox: the contained"):
        score_code(task, model, replace(LIMITS, memory_mb=8))


def test_a_kernel_without_landlock_is_said_once_per_run(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 0)
    monkeypatch.setattr(sandbox, "_run", None)
    try:
        features = sandbox.sandbox_features()
        sandbox.sandbox_features()
        assert run_python("print(1)", "", LIMITS).passed
        assert capsys.readouterr().err.count("no Landlock") == 1
        assert features["landlock"].startswith("none")
    finally:
        sandbox._run.close()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_everyday_programs_make_no_system_call_the_filter_refuses():
    """tools/sandbox_syscalls.py, how the allow-list was measured: under strace, the calls the
    contained process makes are all allowed but rt_sigaction (refused on purpose)."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "sandbox_syscalls.py")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "refused: rt_sigaction"
