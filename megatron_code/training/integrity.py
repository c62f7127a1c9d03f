"""Checkpoint integrity: a manifest of every file's size and checksum, and the checks made with it.

A save writes `manifest.json` last, once every other file of the checkpoint is complete and
durable, and before the folder's atomic rename:
    {"checksum": "xxh3_64", "files": {"<name>": {"bytes": <size>, "xxh3_64": "<hex digest>"}, ...}}
trainer_state.json (written just before it, and listed in it) says `"manifest": true`, so a
checkpoint whose manifest went missing is told from one saved before manifests existed.

`problem(step_dir)` says why a folder is not an intact checkpoint: a missing, truncated or grown
file is found from sizes alone (one stat per file); a changed byte needs the checksums, which
stream every file once. Checksums are xxHash's XXH3-64, as fast as the page cache delivers the
bytes on this project's machines (see the README's checkpoint section for the cost per GB);
they detect accidental damage, not tampering. Under a process group the files are split over
the ranks (each streams its share, the largest files spread first) and all ranks agree on the
verdict through one collective, so every rank takes the same decision.

Hugging Face safetensors files carry no checksum; `safetensors_problem` checks that a file
holds the bytes its header promises (a truncated or cut-off file is named).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch.distributed as dist
import xxhash

MANIFEST = "manifest.json"
CHECKSUM = "xxh3_64"
READ_CHUNK = 4 << 20  # bytes per read: large enough that the hash, not the call overhead, sets the pace


def file_checksum(path: Path) -> str:
    """XXH3-64 of a file's bytes, streamed."""
    digest = xxhash.xxh3_64()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if distributed and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files `rank` of `world` checksums: the largest first, each to the rank with the fewest
    bytes so far (the same split on every rank)."""
    loads = [0] * world
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        least = min(range(world), key=lambda r: (loads[r], r))
        loads[least] += sizes[name]
        if least == rank:
            mine.append(name)
    return mine


def agree(value, distributed: bool) -> list:
    """Every rank's `value`, in rank order, on every rank (one collective; [value] alone)."""
    _, world = _rank_and_world(distributed)
    if world == 1:
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _my_checksums(directory: Path, sizes: dict[str, int], distributed: bool) -> dict[str, str | None]:
    """Checksums of this rank's share of the files named in `sizes` (None: unreadable)."""
    rank, world = _rank_and_world(distributed)
    mine = {}
    for name in share(sizes, rank, world):
        try:
            mine[name] = file_checksum(directory / name)
        except OSError:
            mine[name] = None
    return mine


def checksums(directory: Path, sizes: dict[str, int], distributed: bool) -> dict[str, str | None]:
    """Checksum of every file named in `sizes` on every rank; each rank streams its share."""
    return {name: value for part in agree(_my_checksums(directory, sizes, distributed), distributed)
            for name, value in part.items()}


def write_manifest(directory: Path, sums: dict[str, str]) -> None:
    """The manifest of `directory`: each file of `sums` with its size now, written durably."""
    files = {name: {"bytes": (directory / name).stat().st_size, CHECKSUM: sums[name]} for name in sorted(sums)}
    write_durably(directory / MANIFEST, json.dumps({"checksum": CHECKSUM, "files": files}, indent=1))


def write_durably(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory. A failure
    (a full disk) removes the temporary file and names `path`: a write's own error has no file name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def has_manifest(step_dir: Path) -> bool:
    return (step_dir / MANIFEST).is_file()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path.name} is unreadable ({type(e).__name__}: {e})") from None


def _local_problem(step_dir: Path) -> tuple[str | None, dict]:
    """(why the folder is not a checkpoint from what stat and the small JSON files say, the
    manifest's files: name -> {"bytes", checksum})."""
    if not step_dir.is_dir():
        return "no such folder", {}
    try:
        if not (step_dir / MANIFEST).is_file():
            if not (step_dir / "trainer_state.json").is_file():
                return "trainer_state.json is missing", {}
            if _read_json(step_dir / "trainer_state.json").get("manifest"):
                return f"{MANIFEST} is missing (the save did not finish, or the file was removed)", {}
            return None, {}  # saved before manifests existed: nothing to check against
        manifest = _read_json(step_dir / MANIFEST)
        files = manifest["files"]
        if manifest.get("checksum") != CHECKSUM:
            return f"{MANIFEST} uses checksum {manifest.get('checksum')!r}, this version reads {CHECKSUM}", {}
    except ValueError as e:
        return str(e), {}
    except (KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable (not a manifest)", {}
    for name, entry in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing", files
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size:,} bytes, the manifest says {entry['bytes']:,} (truncated or overwritten)", files
    return None, files


def problem(step_dir: Path, checksums_too: bool = True, distributed: bool = False) -> str | None:
    """Why `step_dir` is not an intact checkpoint, or None: sizes of every file in its manifest,
    and with `checksums_too` the checksum of every file. With `distributed`, the checksums are
    split over the process group's ranks, and one collective gives every rank the same verdict."""
    found, files = _local_problem(step_dir)
    mine = {}
    if found is None and checksums_too:
        mine = _my_checksums(step_dir, {name: entry["bytes"] for name, entry in files.items()}, distributed)
    parts = agree((found, mine), distributed)
    found = next((part_found for part_found, _ in parts if part_found is not None), None)
    if found is None:
        sums = {name: value for _, part in parts for name, value in part.items()}
        changed = sorted(name for name, value in sums.items() if value != files[name][CHECKSUM])
        if changed:
            found = f"{changed[0]} does not match its checksum in the manifest (its bytes changed after the save)"
    return found


# ----------------------------------------------------------------------------------------------
# Hugging Face safetensors

def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file does not hold what its header promises (None: it does)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path}: {size} bytes, too short for a safetensors header"
        (header_bytes,) = struct.unpack("<Q", head)
        if 8 + header_bytes > size:
            return f"{path}: truncated ({size:,} bytes, its header alone needs {8 + header_bytes:,})"
        try:
            header = json.loads(f.read(header_bytes))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
            return f"{path}: its header is unreadable (not a safetensors file, or damaged)"
    if 8 + header_bytes + end != size:
        return (f"{path}: {size:,} bytes, its header describes {8 + header_bytes + end:,} "
                f"({'truncated' if size < 8 + header_bytes + end else 'trailing bytes'})")
    return None


def safetensors_files(folder: Path) -> tuple[list[Path], str | None]:
    """(the weight files of a Hugging Face folder, why they are damaged or None): the files its
    index names (all of them must be there), or every .safetensors file without an index."""
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            return [], f"{index}: unreadable ({type(e).__name__}: {e})"
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            return files, f"{index} names {', '.join(missing[:3])}, missing from {folder}"
    return files, next((why for why in map(safetensors_problem, files) if why), None)
