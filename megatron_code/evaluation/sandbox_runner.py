"""The sandbox's child side; sandbox.py (the parent) states the threat model.

sandbox.py starts this file as a script in the sample's own folder and a new session, with the
limits in argv and the job (the verdict nonce, the program, its tests) on stdin. It runs in two
stages, one process:

1. `contain`: `python -S -s -B -P sandbox_runner.py contain PARENT SECONDS MEMORY_MB FILE_BYTES`
   applies to itself what the kernel enforces from then on: rlimits, death with its parent,
   first pick of the OOM killer, Landlock, no capabilities, every descriptor but 0-2 closed,
   and the seccomp allow-list; then it executes the interpreter again on this file. It needs
   ctypes for that, and ctypes in a process reaches any byte of its memory (its types are found
   through `object.__subclasses__()` even when the module is gone), so the program never runs
   in this image: the exec discards it.
2. `run` (`run-guard-writes` without Landlock): a fresh image that never loads ctypes (importing
   it is refused) reads the job, points stdin at /dev/null, adds its two audit hooks
   (`_verdict_hook`, `_guard`), says it is contained, and runs the program as the module
   `solution`, then the tests in that module's namespace with the builtins as they were before
   the program ran (`_run_tests`).

Everything the kernel enforces survives the exec (no_new_privs keeps the capabilities dropped).
Every import here is paid once per sample, so this file imports nothing from the package and,
at module level, nothing that the `run` stage does not need.
"""
import builtins
import os
import sys

READY = b"megatron_code sandbox: contained\n"
"""The runner's first output, written once it is contained: the sample's clock starts here, and
output without it means the sandbox itself failed."""
FAILED_EXIT, MEMORY_EXIT, SETUP_EXIT = 1, 3, 2
"""Exit codes: the program or its tests raised; they ran out of memory; containment failed."""
INTERPRETER_FLAGS = ("-S", "-s", "-B") + (("-P",) if sys.version_info >= (3, 11) else ())
"""No site packages or user site, no bytecode files, no script folder on sys.path (-P; `run`
removes it itself before 3.11)."""
CONTAIN, RUN, RUN_GUARD_WRITES = "contain", "run", "run-guard-writes"
"""The stage argument: contain; run after Landlock; run where the kernel has no Landlock."""
ARM_EVENT, DONE_EVENT = "megatron_code.sandbox.arm", "megatron_code.sandbox.done"

# ---------------------------------------------------------------------------------------- seccomp

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {  # name: (x86_64, aarch64) from the kernel's unistd headers; None: not on that arch
    "read": (0, 63), "write": (1, 64), "readv": (19, 65), "writev": (20, 66), "pread64": (17, 67),
    "pwrite64": (18, 68), "preadv": (295, 69), "pwritev": (296, 70), "preadv2": (327, 286),
    "pwritev2": (328, 287), "lseek": (8, 62), "open": (2, None), "openat": (257, 56), "close": (3, 57),
    "fstat": (5, 80), "stat": (4, None), "lstat": (6, None), "newfstatat": (262, 79),
    "statx": (332, 291), "access": (21, None), "faccessat": (269, 48), "faccessat2": (439, 439),
    "getdents64": (217, 61), "getcwd": (79, 17), "chdir": (80, 49), "fchdir": (81, 50), "mkdir": (83, None),
    "mkdirat": (258, 34), "rmdir": (84, None), "unlink": (87, None), "unlinkat": (263, 35), "rename": (82, None),
    "renameat": (264, 38), "renameat2": (316, 276), "link": (86, None), "linkat": (265, 37),
    "symlink": (88, None), "symlinkat": (266, 36), "readlink": (89, None), "readlinkat": (267, 78),
    "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "utimensat": (280, 88), "truncate": (76, 45),
    "ftruncate": (77, 46), "fsync": (74, 82), "fdatasync": (75, 83), "fallocate": (285, 47), "dup": (32, 23),
    "dup2": (33, None), "dup3": (292, 24), "pipe": (22, None), "pipe2": (293, 59), "statfs": (137, 43),
    "fstatfs": (138, 44), "umask": (95, 166), "fadvise64": (221, 223), "sendfile": (40, 71),
    "copy_file_range": (326, 285), "flock": (73, 32), "getxattr": (191, 8), "lgetxattr": (192, 9),
    "fgetxattr": (193, 10), "listxattr": (194, 11), "llistxattr": (195, 12), "flistxattr": (196, 13),
    "brk": (12, 214), "mmap": (9, 222), "munmap": (11, 215), "mremap": (25, 216), "mprotect": (10, 226),
    "madvise": (28, 233), "clock_gettime": (228, 113), "clock_getres": (229, 114), "clock_nanosleep": (230, 115),
    "nanosleep": (35, 101), "gettimeofday": (96, 169), "time": (201, None), "getrandom": (318, 278),
    "futex": (202, 98), "sched_yield": (24, 124), "getpid": (39, 172), "gettid": (186, 178), "getppid": (110, 173),
    "getuid": (102, 174), "geteuid": (107, 175), "getgid": (104, 176), "getegid": (108, 177),
    "getgroups": (115, 158), "getresuid": (118, 148), "getresgid": (120, 150), "getpgrp": (111, None),
    "uname": (63, 160), "getrusage": (98, 165), "times": (100, 153), "exit_group": (231, 94),
    "rt_sigprocmask": (14, 135), "rt_sigreturn": (15, 139), "restart_syscall": (219, 128), "poll": (7, None),
    "ppoll": (271, 73), "select": (23, None), "pselect6": (270, 72), "epoll_create1": (291, 20),
    "epoll_ctl": (233, 21), "epoll_wait": (232, None), "epoll_pwait": (281, 22), "eventfd2": (290, 19),
    "getrlimit": (97, 163), "setrlimit": (160, 164), "prlimit64": (302, 261),
    "sched_getaffinity": (204, 123), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "fcntl": (72, 25), "ioctl": (16, 29), "capset": (126, 91), "execve": (59, 221), "arch_prctl": (158, None),
    "set_tid_address": (218, 96), "set_robust_list": (273, 99), "rseq": (334, 293), "sysinfo": (99, 179),
}
ALLOWED = (  # what strace saw CPython make, and the same operations' other calls (README); frequent first
    "read", "write", "newfstatat", "brk", "exit_group", "openat", "lseek", "close", "mmap", "munmap", "mremap",
    "madvise", "mprotect", "futex", "fstat", "statx", "stat", "lstat", "open", "getdents64", "readlink", "readlinkat",
    "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "access", "faccessat",
    "faccessat2", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename",
    "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat",
    "utimensat", "truncate", "ftruncate", "fsync", "fdatasync", "fallocate", "dup", "dup2", "dup3", "pipe",
    "pipe2", "statfs", "fstatfs", "umask", "fadvise64", "sendfile", "copy_file_range", "flock", "getxattr",
    "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr", "clock_gettime", "clock_getres",
    "clock_nanosleep", "nanosleep", "gettimeofday", "time", "getrandom", "sched_yield", "getpid", "gettid",
    "getppid", "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid", "getresgid", "getpgrp",
    "uname", "getrusage", "times", "sysinfo", "rt_sigprocmask", "rt_sigreturn", "restart_syscall",
    "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "eventfd2", "getrlimit", "setrlimit",
    "execve", "set_tid_address", "set_robust_list", "rseq",  # the `run` stage's start-up
)
"""System calls allowed whatever their arguments. Everything not listed here or in
`_checked_calls` fails with EPERM: rt_sigaction among them, so the program can install no
signal handler (the interpreter starts without its SIGINT handler and keeps the contain stage's
SIGPIPE and SIGXFSZ ignored). execve is allowed for the `run` stage; the program
cannot reach it (os.exec* is refused by `_guard` and there is no native code), and an image it
could start would hold no nonce and stay contained."""
_FCNTL_COMMANDS = (0, 1, 2, 3, 4, 1030)
"""F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC: not F_SETOWN or F_SETSIG (SIGIO
to another process), leases or notifications."""
_IOCTL_COMMANDS = (0x5401, 0x5413, 0x5421, 0x5450, 0x5451)
"""TCGETS (isatty), TIOCGWINSZ, FIONBIO (os.set_blocking), FIONCLEX, FIOCLEX: not FIOSETOWN,
FIOASYNC or anything that drives a device."""


def _checked_calls(pid: int) -> list[tuple[str, list[tuple[int, tuple[int, ...]]]]]:
    """(call, [(argument index, allowed values), ...]): allowed when every listed argument takes
    one of its values (its low 32 bits: each is an int to the kernel)."""
    return [("arch_prctl", [(0, (0x1002,))]),  # ARCH_SET_FS (thread-local storage at start-up)
            ("kill", [(0, (pid,))]), ("tkill", [(0, (pid,))]), ("tgkill", [(0, (pid,)), (1, (pid,))]),
            ("prlimit64", [(0, (0,))]), ("sched_getaffinity", [(0, (0,))]),
            ("fcntl", [(1, _FCNTL_COMMANDS)]), ("ioctl", [(1, _IOCTL_COMMANDS)])]


def arch() -> str:
    """x86_64 or aarch64; OSError elsewhere."""
    machine = os.uname().machine if hasattr(os, "uname") else "?"
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
    if sys.platform != "linux" or machine not in _AUDIT_ARCH:
        raise OSError(f"running generated code needs Linux on x86_64 or aarch64 (seccomp); this is "
                      f"{sys.platform} {machine}")
    return machine


def _seccomp_program(machine: str, pid: int) -> bytes:
    """Classic BPF over struct seccomp_data: this architecture only, then the allow-list; a few
    calls allowed only with given arguments (signals to this process, limits of this process,
    harmless fcntl and ioctl commands, this process's CPU affinity); every other call EPERM."""
    import struct

    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, eperm = 0x7FFF0000, 0x00050000 | 1
    column = 0 if machine == "x86_64" else 1

    def nr(name: str) -> int | None:
        return _SYSCALLS[name][column]

    def arg(i: int) -> int:  # offset of the low 32 bits of args[i] (little endian)
        return 16 + 8 * i

    prog = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH[machine]), (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 numbers
    for name in ALLOWED:
        if nr(name) is not None:
            prog += [(jeq, 0, 1, nr(name)), (ret, 0, 0, allow)]
    for name, conditions in _checked_calls(pid):
        if nr(name) is None:
            continue
        block = []
        for index, values in conditions:
            block.append((ld, 0, 0, arg(index)))
            for k, value in enumerate(values):  # on a match skip to the next condition, else EPERM
                block.append((jeq, len(values) - k, 0, value))
            block.append((ret, 0, 0, eperm))
        block.append((ret, 0, 0, allow))
        prog += [(jeq, 0, len(block), nr(name))] + block
    prog.append((ret, 0, 0, eperm))
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in prog)


def _check(result: int, what: str) -> int:
    import ctypes

    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def apply_seccomp() -> None:
    """Install the allow-list on this process (irreversibly; no_new_privs first, as the kernel
    requires of a process without CAP_SYS_ADMIN)."""
    import ctypes
    import struct

    libc = _libc()
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    _check(libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0), "no_new_privs")
    code = _seccomp_program(arch(), os.getpid())
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(buffer)))
    _check(libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.addressof(fprog), 0, 0), "seccomp")


# --------------------------------------------------------------------------------------- landlock

_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on both arches
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
"""The rights a rule on a file (not a folder) may carry."""
_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
READABLE = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/etc/localtime", "/etc/ld.so.cache",
            "/dev/urandom", "/dev/random", "/dev/zero")
"""Read-only beside the Python installation and the sample's folder: system libraries and zone
data, the dynamic linker's cache, the random and zero devices."""


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none."""
    if sys.platform != "linux":
        return 0
    return max(0, _libc().syscall(_LANDLOCK_CREATE_RULESET, None, 0, 1))  # flag 1: ask the version


def apply_landlock(workdir: str) -> int:
    """Restrict this process (irreversibly): files written, made or removed only beneath
    `workdir`, /dev/null written; files read only there, in the Python installation, this file
    and READABLE (so not /proc: no process's memory or environment, not /tmp or home folders);
    with ABI >= 4 no TCP, with ABI >= 6 signals and abstract unix sockets only within this
    process.
    Returns the ABI applied, 0 when the kernel has no Landlock (nothing applied)."""
    import ctypes
    import struct

    abi = landlock_abi()
    if abi == 0:
        return 0
    libc = _libc()
    fs = (1 << 13) - 1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) \
        | (_FS_IOCTL_DEV if abi >= 5 else 0)
    net, scoped = (0b11 if abi >= 4 else 0), (0b11 if abi >= 6 else 0)  # bind+connect TCP; abstract sockets+signals
    attr = struct.pack("=QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _check(libc.syscall(_LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr), len(attr), 0),
                     "landlock_create_ruleset")
    python = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(os.__file__)),
              os.path.realpath(sys.executable), os.path.join(sys.prefix, "pyvenv.cfg"),
              os.path.realpath(__file__)}  # the run stage starts from this file
    rules = [(workdir, fs), (os.devnull, (_FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE) & fs)]
    rules += [(path, _READ) for path in sorted(python) + list(READABLE)]
    try:
        for path, allowed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not os.path.isdir(path):
                    allowed &= _FILE_RIGHTS
                rule = struct.pack("=Qi", allowed, fd)  # struct landlock_path_beneath_attr (packed)
                _check(libc.syscall(_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.c_char_p(rule), 0),
                       f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


# ------------------------------------------------------------------------------------ containment


def contain(workdir: str, seconds: float, memory_mb: int, file_bytes: int, parent: int) -> int:
    """Apply every restriction to this process, in an order where each step still has the
    system calls it needs; returns the Landlock ABI applied (0: none)."""
    import ctypes
    import resource
    import signal
    import struct

    libc = _libc()
    cpu = int(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))  # not enforced for root; the filter is
    pr_set_pdeathsig = 1
    _check(libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    if os.getppid() != parent:  # the evaluator died before the line above
        os._exit(SETUP_EXIT)
    try:  # the OOM killer takes this process first (best effort: /proc may be read-only)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    abi = apply_landlock(workdir)
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    capset = _SYSCALLS["capset"][0 if arch() == "x86_64" else 1]
    _check(libc.syscall(capset, ctypes.c_char_p(header), ctypes.c_char_p(bytes(24))), "capset")  # all sets empty
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    apply_seccomp()
    return abi


# ------------------------------------------------------------------------------------ audit hooks


def _verdict_hook(nonce: bytes, done_line: int):
    """The only holder of the nonce. It writes it to stdout when the completion event comes from
    the armed frame (the first `ARM_EVENT`'s, raised by `_run_tests` before the program runs)
    standing at `done_line`, which that frame reaches only after the tests ran to their end.

    Keeping the nonce unreadable: nothing else references this function (audit hooks live where
    only gc and ctypes reach, both refused by `_guard`). While it runs, no code of the program
    runs above it: it reads only its closure (never a global the program could rebind), calls
    nothing the program can replace, allocates no gc-tracked object (so no finalizer runs), and
    the program can install no signal handler, trace function or other hook. No exception leaves
    it carrying its frame."""
    write, armed, arm_event, done_event, anything = os.write, [], ARM_EVENT, DONE_EVENT, BaseException

    def hook(event, args):
        try:
            if event == arm_event:
                if not armed:
                    armed.append(args[0])
            elif event == done_event:
                if armed and args and args[0] is armed[0] and armed[0].f_lineno == done_line:
                    write(1, nonce)
        except anything:
            pass
    return hook


_DENIED_EVENTS = frozenset({
    "sys.settrace", "sys.setprofile",  # a trace function can jump over failing asserts
    "sys.monitoring.register_callback",  # (3.12+) code of the program run at every line of the runner
    "sys.addaudithook",  # another hook would run with the runner's frames below it
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",  # they reach the verdict hook
    "code.__new__",  # hand-made bytecode reads and writes memory
    "os.exec",  # a new image would leave the audit hooks behind (and holds no nonce)
})
_DENIED_MODULES = ("ctypes", "_ctypes", "_test", "_xx")
"""Modules the program may not import (by name prefix): ctypes reaches any byte of memory; the
standard library's test and experimental modules crash or corrupt the interpreter on purpose."""


def _lexical_path(path: str) -> str:
    """`path` with "." and ".." resolved by string operations alone (nothing the program can
    patch); symlinks are not followed, which is enough where the program cannot make any."""
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def _guard(stdlib: str, write_root: str | None):
    """Refuse what would let a program reach the runner's state or run native code: the events
    and modules above, and extension modules from outside the standard library.
    With `write_root` (no Landlock) also refuse, at the Python level only, changes to files
    outside it and reads of /proc.

    Like the verdict hook, it reads only its closure, so rebinding globals of this module, of
    os or of builtins changes nothing it decides."""
    denied, modules, lexical, exact_str, refusal = _DENIED_EVENTS, _DENIED_MODULES, _lexical_path, str, PermissionError
    stdlib = _lexical_path(os.path.realpath(stdlib)) + "/"
    root = write_root and _lexical_path(os.path.realpath(write_root)) + "/"
    fsdecode, realpath, devnull, write_flags = os.fsdecode, os.path.realpath, os.devnull, os.O_WRONLY | os.O_RDWR
    changes = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                         "os.truncate", "shutil.rmtree", "os.utime", "os.chown"})
    paths = changes | {"open", "os.listdir", "os.scandir"}

    def hook(event, args):
        if event in denied or event.startswith("ctypes."):
            raise refusal(f"sandbox: {event} is not allowed")
        if event == "import":
            name, filename = args[0], args[1]
            if type(name) is not exact_str or name.startswith(modules):
                raise refusal(f"sandbox: importing {name} is not allowed")
            if filename is not None and not (type(filename) is exact_str and filename.startswith("/")
                                             and lexical(filename).startswith(stdlib)):
                raise refusal("sandbox: native code loads only from the standard library")
        if root is None or event not in paths or not args or type(args[0]) is int:
            return
        path = realpath(fsdecode(args[0]))
        writes = event == "open" and (args[1] is None or any(c in str(args[1]) for c in "wax+")
                                      or type(args[2]) is int and args[2] & write_flags)
        if (writes or event in changes) and not path.startswith(root) and path != devnull:
            raise refusal(f"sandbox: {event} outside the working directory: {path}")
        if (path + "/").startswith("/proc/"):
            raise refusal(f"sandbox: reading {path}")
    return hook


# ---------------------------------------------------------------------------------------- running


def _run_tests(run, audit, solution, tests, namespace: dict, fresh_builtins, flush) -> None:
    """Run the program (`solution`, a code object) in `namespace`, then the tests there with
    builtins as they were before the program ran. The verdict hook accepts the completion event
    only from this frame standing at its last line: it must stay the last line."""
    frame = sys._getframe()
    audit(ARM_EVENT, frame)
    run(solution, namespace)
    namespace["__builtins__"] = fresh_builtins()
    run(tests, namespace)
    flush()
    audit(DONE_EVENT, frame)


def _read_job() -> tuple:
    """(verdict hook, solution, tests) from stdin, which then reads /dev/null. The nonce goes
    into the hook only."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    nonce, solution_size, sources = b"".join(chunks).split(b"\n", 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    done_line = max(line for _, _, line in _run_tests.__code__.co_lines() if line is not None)
    solution_size = int(solution_size)
    return (_verdict_hook(nonce + b"\n", done_line), sources[:solution_size].decode(),
            sources[solution_size:].decode())


def run(guard_writes: bool) -> None:
    """The `run` stage; never returns."""
    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):  # Python < 3.11: no -P
        del sys.path[0]
    hook, solution, tests = _read_job()
    sys.addaudithook(hook)
    sys.addaudithook(_guard(os.path.dirname(os.__file__), os.getcwd() if guard_writes else None))
    del hook
    exit_, write, excepthook, stdout, stderr = os._exit, os.write, sys.__excepthook__, sys.stdout, sys.stderr
    builtins_before = type(type.__dict__)(dict(builtins.__dict__))  # a read-only view of a copy
    runner_file = _run_tests.__code__.co_filename

    def flush() -> None:
        for stream in (stdout, stderr):
            try:
                stream.flush()
            except Exception:
                pass
    write(1, READY)
    module = type(sys)("solution")
    sys.modules["solution"] = module
    try:
        code = compile(solution, "solution.py", "exec"), compile(tests, "tests.py", "exec")
        _run_tests(exec, sys.audit, code[0], code[1], module.__dict__, builtins_before.copy, flush)
    except BaseException as error:
        status = MEMORY_EXIT if isinstance(error, MemoryError) else FAILED_EXIT
        try:
            for name, source in (("solution.py", solution), ("tests.py", tests)):  # the traceback quotes them
                try:
                    with open(name, "w") as f:
                        f.write(source)
                except OSError:  # the program left its folder or filled it
                    pass
            traceback = error.__traceback__
            while traceback is not None and traceback.tb_frame.f_code.co_filename == runner_file:
                traceback = traceback.tb_next
            excepthook(type(error), error.with_traceback(traceback), traceback)
            if isinstance(error, SystemExit):
                stderr.write("sandbox: the program exited before its tests ended\n")
            flush()
        finally:
            exit_(status)
    exit_(0)


def main(argv: list[str]) -> None:
    if argv[1] in (RUN, RUN_GUARD_WRITES):
        run(guard_writes=argv[1] == RUN_GUARD_WRITES)
    parent, seconds, memory_mb, file_bytes = argv[2:]
    try:
        landlock = contain(os.getcwd(), float(seconds), int(memory_mb), int(file_bytes), int(parent))
        executable = os.path.realpath(sys.executable)
        os.execv(executable, [executable, *INTERPRETER_FLAGS, os.path.abspath(__file__),
                              RUN if landlock else RUN_GUARD_WRITES])
    except OSError as e:
        os.write(2, f"sandbox: {e}\n".encode())
        os._exit(SETUP_EXIT)


if __name__ == "__main__":
    main(sys.argv)
