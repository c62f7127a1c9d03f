"""What a checkpoint's checksums cost per GiB on this machine: the XXH3-64 stream that
training/integrity.py runs over every file (a save reads back what it wrote; a start reads what
it loads), beside plain reading and the other candidates (zlib's crc32 and adler32, blake2b,
sha256) hashing bytes already in memory.

    python tools/bench_checksum.py --gib 1

Writes a file of random bytes under --dir (deleted afterwards), reads it once to put it in the
page cache, then times each way --repeat times and prints the best and the median in s/GiB.
Reads from a cold disk cost what the disk delivers: the checksum runs at page-cache speed, so
it is rarely the limit.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import xxhash

from megatron_code.training.integrity import READ_CHUNK, file_checksum


def read_only(path: Path) -> None:
    buffer = bytearray(READ_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def timed(action, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test file")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the test file goes")
    args = parser.parse_args(argv)
    size = int(args.gib * 2**30)
    with tempfile.NamedTemporaryFile(dir=args.dir, prefix="bench_checksum.") as f:
        for _ in range(0, size, 64 << 20):
            f.write(os.urandom(min(64 << 20, size - f.tell())))
        f.flush()
        path = Path(f.name)
        read_only(path)
        gib = size / 2**30
        print(f"{gib:.2f} GiB file in {args.dir}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f} at the start")
        rows = [("streamed from the page cache: read only", lambda: read_only(path)),
                ("streamed from the page cache: read + xxh3_64 (what checkpoints use)", lambda: file_checksum(path))]
        data = path.read_bytes()
        rows += [(f"in memory: {name}", action) for name, action in (
            ("xxh3_64", lambda: xxhash.xxh3_64(data).digest()), ("crc32", lambda: zlib.crc32(data)),
            ("adler32", lambda: zlib.adler32(data)), ("blake2b", lambda: hashlib.blake2b(data).digest()),
            ("sha256", lambda: hashlib.sha256(data).digest()))]
        for name, action in rows:
            best, median = timed(action, args.repeat)
            print(f"{name:70s} best {best / gib:.3f} s/GiB, median {median / gib:.3f} s/GiB")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
