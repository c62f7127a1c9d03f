"""The system calls contained programs make: runs everyday programs (the standard library's
common modules, recursion, big lists, files in the sample's folder, an os-module tour, a
traceback) through the sandbox's real runner under `strace -f`, and prints every call its
process made after the seccomp filter went in, in how many programs, and which the filter
refused. How sandbox_runner.ALLOWED was measured; run it on a new kernel, libc or Python.

    apt-get install -y strace   # if missing
    python tools/sandbox_syscalls.py

Exits 1 when a call other than rt_sigaction (refused on purpose: the interpreter then starts
without signal handlers) was refused, i.e. when the allow-list misses something these programs
need.
"""
from __future__ import annotations

import collections
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_code.evaluation import sandbox_runner as runner  # noqa: E402

PROGRAMS = {
    "stdlib": "import bisect, collections, dataclasses, datetime, decimal, fractions, functools, heapq, itertools\n"
              "import json, math, random, re, string, typing, statistics, copy, operator, enum, hashlib, textwrap\n"
              "print(datetime.datetime.now(), random.random(), decimal.Decimal(1) / 3, re.findall('a', 'aa'))\n",
    "more stdlib": "import unicodedata, zlib, array, struct, binascii, base64, csv, io, pprint, calendar, queue\n"
                   "import secrets, uuid, zoneinfo, sqlite3, lzma, bz2, gzip, selectors, mmap, warnings\n"
                   "print(uuid.uuid4(), zoneinfo.ZoneInfo('Europe/Paris'), sqlite3.connect(':memory:'))\n"
                   "warnings.warn('x')\n",
    "recursion and big lists": "import sys\nsys.setrecursionlimit(20000)\n"
                               "def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\n"
                               "print(f(15000), len([0] * 50_000_000), sum(range(10**6)))\n",
    "files": "import os, shutil, tempfile, pathlib\nopen('a', 'w').write('x' * 10)\nos.rename('a', 'b')\n"
             "os.symlink('b', 'c')\nos.link('b', 'd')\nos.truncate('b', 3)\nshutil.copy2('b', 'e')\n"
             "shutil.copytree('.', '../never') if False else None\nos.makedirs('x/y')\nos.rmdir('x/y')\n"
             "print(sorted(os.listdir('.')), os.stat('c').st_size, shutil.disk_usage('.').total > 0)\n"
             "with tempfile.TemporaryDirectory() as t:\n    pathlib.Path(t, 'f').write_text('y')\n",
    "os tour": "import os, select, fcntl, time, sys\nfd = os.open('f', os.O_RDWR | os.O_CREAT)\n"
               "os.pwrite(fd, b'ab', 0)\nos.pread(fd, 1, 0)\nos.fsync(fd)\nos.ftruncate(fd, 1)\n"
               "fcntl.flock(fd, fcntl.LOCK_EX)\nr, w = os.pipe()\nos.set_blocking(r, False)\n"
               "os.set_inheritable(w, True)\nselect.select([r], [], [], 0)\nos.close(fd)\n"
               "print(os.getuid(), os.getgroups(), os.times(), os.cpu_count(), os.sched_getaffinity(0))\n"
               "time.sleep(0.001)\nprint(sys.stdout.isatty(), os.umask(0o22), os.uname().sysname)\n",
    "traceback": "import traceback\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n    traceback.print_exc()\n"
                 "input_ok = True\n",
    "a failing assert": "x = 1\n",
}
TESTS = {"a failing assert": "assert x == 2\n"}


def trace(source: str, tests: str, out: Path) -> list[str]:
    """The calls (with results) of the runner's process after its filter went in."""
    work = tempfile.mkdtemp(dir=out)
    solution = source.encode()
    job = secrets.token_hex(16).encode() + b"\n" + f"{len(solution)}\n".encode() + solution + tests.encode()
    log = out / "trace.txt"
    flags = " ".join(runner.INTERPRETER_FLAGS)
    command = (f"exec strace -f -qq -o {log} {sys.executable} {flags} {runner.__file__} {runner.CONTAIN} $$ 10.0 512 "
               f"{1 << 20}")  # $$: strace replaces the shell, so it is the runner's parent
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    subprocess.run(["sh", "-c", command], input=job, cwd=work, env=env, capture_output=True, timeout=300)
    lines = log.read_text().splitlines()
    main = lines[0].split()[0]
    after = [i for i, line in enumerate(lines) if "PR_SET_SECCOMP" in line]
    return [line.split(None, 1)[1] for line in lines[after[0] + 1:] if line.split()[0] == main] if after else []


def main() -> int:
    if shutil.which("strace") is None:
        print("strace is not installed (apt-get install -y strace)", file=sys.stderr)
        return 2
    seen, refused = collections.Counter(), collections.Counter()
    with tempfile.TemporaryDirectory() as folder:
        for name, source in PROGRAMS.items():
            calls = trace(source, TESTS.get(name, ""), Path(folder))
            names = {m.group(1) for call in calls if (m := re.match(r"(\w+)\(", call))}
            seen.update(names)
            refused.update({m.group(1) for call in calls if "EPERM" in call and (m := re.match(r"(\w+)\(", call))})
            print(f"{name}: {len(names)} different calls", flush=True)
    print(f"\n{len(seen)} calls over {len(PROGRAMS)} programs (programs that made each):")
    print(" ".join(f"{name}:{n}" for name, n in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))))
    unexpected = sorted(set(refused) - {"rt_sigaction"})
    print(f"refused: {', '.join(sorted(refused)) or 'none'}" + (f"; NOT EXPECTED: {unexpected}" if unexpected else ""))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
