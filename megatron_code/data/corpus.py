"""Pretraining corpora: one JSONL file per source, `{"text": ..., "source": ..., "path" | "id": ...}`.

A source is a directory of files matched by glob patterns, an existing JSONL file (plain or .gz),
a Hugging Face dataset (streamed), or the built-in corpus every Python installation carries:
the standard library's `.py` files as code, `pydoc_data.topics` and the library's docstrings as
English prose. Each source is deduplicated (exact text hash), shuffled with a fixed seed and
optionally capped, so its output bytes depend only on its inputs and the parameters. A
manifest next to the outputs lets a second run with the same parameters skip the work.

Sources are written on the command line as `NAME=KIND:LOCATION[?option=value&...]`:

    code=dir:~/src/project?glob=*.py,*.c&exclude=tests/*
    web=jsonl:data/web.jsonl.gz?key=content
    wiki=hf:wikitext?config=wikitext-103-raw-v1&split=train
    code=stdlib:code            text=stdlib:text     (the built-in corpus)
"""
from __future__ import annotations

import ast
import fnmatch
import gzip
import hashlib
import json
import mmap
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl

import numpy as np
from tqdm import tqdm

from megatron_code.data.errors import DataError

FORMAT_VERSION = 1
"""Bump when the documents a source produces change, so old manifests stop matching."""
QUICKSTART_MAX_BYTES_PER_SOURCE = 4_000_000
"""Cap used by the quickstart: corpus + tokenizer + binaries take seconds on 2 cores."""
MANIFEST = "manifest.json"

# kind -> options it accepts, with their defaults
_OPTIONS: dict[str, dict[str, str]] = {
    "dir": {"glob": "*", "exclude": "", "max_file_bytes": "1000000"},
    "jsonl": {"key": "text"},
    "hf": {"config": "", "split": "train", "key": "text"},
    "stdlib": {},
}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Directory parts never worth reading as a corpus.
_DIR_EXCLUDES = (".*", "__pycache__", "node_modules", "site-packages", "dist-packages")
_STDLIB_EXCLUDES = _DIR_EXCLUDES + ("test", "tests", "idle_test", "test_*.py")
_STDLIB_MAX_FILE_BYTES = 256 * 1024
_GENERATED = re.compile(r"auto-?generated|automatically generated|do not edit|generated from '", re.I)
_MIN_DOCSTRING_DOC_CHARS = 200


@dataclass(frozen=True)
class SourceSpec:
    """One source: `name` names the output file, `kind` says how `location` is read."""

    name: str
    kind: str
    location: str
    options: dict[str, str] = field(default_factory=dict)

    def option(self, key: str) -> str:
        return self.options.get(key, _OPTIONS[self.kind][key])

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}={self.kind}:{self.location}" + (f"?{query}" if query else "")


def parse_source(spec: str) -> SourceSpec:
    """Parse `NAME=KIND:LOCATION[?option=value&...]` (see the module docstring)."""
    name, eq, rest = spec.partition("=")
    kind, colon, location = rest.partition(":")
    location, _, query = location.partition("?")
    if not eq or not colon or not location:
        raise DataError(f"source {spec!r}: expected NAME=KIND:LOCATION[?option=value&...]")
    if not _NAME.fullmatch(name):
        raise DataError(f"source {spec!r}: the name may use only letters, digits, '_', '-' and '.'")
    if kind not in _OPTIONS:
        raise DataError(f"source {spec!r}: unknown kind {kind!r} (one of {', '.join(_OPTIONS)})")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_OPTIONS[kind]))
    if unknown:
        allowed = ", ".join(_OPTIONS[kind]) or "none"
        raise DataError(f"source {spec!r}: unknown option(s) {', '.join(unknown)} for {kind} (allowed: {allowed})")
    if kind == "stdlib" and location not in ("code", "text"):
        raise DataError(f"source {spec!r}: stdlib sources are stdlib:code or stdlib:text")
    return SourceSpec(name, kind, location, options)


def builtin_sources() -> list[SourceSpec]:
    """The embedded corpus: English prose and Python code from the running interpreter."""
    return [SourceSpec("text", "stdlib", "text"), SourceSpec("code", "stdlib", "code")]


def prepare_builtin_corpus(out_dir: Path, seed: int = 1234, max_bytes_per_source: int | None = None,
                           progress: bool = True) -> dict[str, Path]:
    """Write `text.jsonl` and `code.jsonl` under `out_dir` from the Python installation.

    `max_bytes_per_source=None` writes everything (about 2 MB of prose and 10 MB of code on
    CPython 3.11); the quickstart passes QUICKSTART_MAX_BYTES_PER_SOURCE.
    """
    return prepare_corpus(builtin_sources(), out_dir, seed=seed, max_bytes_per_source=max_bytes_per_source,
                          progress=progress)


def prepare_corpus(sources: Sequence[SourceSpec], out_dir: Path, seed: int = 1234,
                   max_bytes_per_source: int | None = None, min_chars: int = 1,
                   force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Write `<out_dir>/<name>.jsonl` for each source and return {name: path}.

    Documents shorter than `min_chars` (after stripping) and exact duplicates are dropped; the
    rest are shuffled with `seed` and taken in that order until the next one would push the
    file past `max_bytes_per_source`. A source whose output and manifest entry already match
    these parameters is skipped unless `force`.
    """
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"source names must be unique, got {', '.join(names)}")
    if max_bytes_per_source is not None and max_bytes_per_source <= 0:
        raise DataError(f"max_bytes_per_source must be positive, got {max_bytes_per_source}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    outputs: dict[str, Path] = {}
    for spec in sources:
        path = out_dir / f"{spec.name}.jsonl"
        params = {"format": FORMAT_VERSION, "spec": str(spec), "fingerprint": _fingerprint(spec),
                  "seed": seed, "max_bytes": max_bytes_per_source, "min_chars": min_chars}
        entry = manifest.get(spec.name)
        if (not force and entry and entry["params"] == params and path.exists()
                and path.stat().st_size == entry["bytes"]):
            if progress:
                print(f"corpus: {path} is up to date ({entry['documents']:,} documents)", file=sys.stderr)
        else:
            manifest[spec.name] = {"params": params, **_write_source(spec, path, seed, max_bytes_per_source,
                                                                      min_chars, progress)}
            _write_json_atomic(manifest_path, manifest)
        outputs[spec.name] = path
    return outputs


# ----------------------------------------------------------------------------------- JSONL input


def open_binary(path: Path) -> BinaryIO:
    """Open a file for reading bytes, decompressing `.gz`; a missing file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def parse_json_line(line: bytes, path: Path | str, line_no: int) -> dict[str, Any]:
    """Parse one JSONL line into an object; errors name the file and line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}:{line_no}: not valid UTF-8") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    return obj


def get_text(obj: dict[str, Any], key: str, path: Path | str, line_no: int) -> str:
    """`obj[key]` as a string; a missing or non-string value names the file, line and key."""
    if key not in obj:
        present = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise DataError(f"{path}:{line_no}: missing key {key!r} (keys present: {present})")
    text = obj[key]
    if not isinstance(text, str):
        raise DataError(f"{path}:{line_no}: key {key!r} holds {type(text).__name__}, expected a string")
    return text


def iter_jsonl(path: Path, key: str = "text") -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for each non-blank line of a JSONL file (plain or .gz)."""
    with open_binary(path) as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield line_no, get_text(parse_json_line(line, path, line_no), key, path, line_no)


def write_jsonl(path: str | Path, records) -> Path:
    """Write records as JSONL under a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------- sources

Document = dict[str, Any]
Loader = Callable[[int], "Document | None"]


def _fingerprint(spec: SourceSpec) -> str | None:
    """What besides the spec decides a source's documents (None: the spec alone)."""
    if spec.kind == "stdlib":
        return f"python {sys.version.split()[0]} {sysconfig.get_paths()['stdlib']}"
    path = Path(spec.location).expanduser()
    if spec.kind == "jsonl" and path.is_file():
        st = path.stat()
        return f"{st.st_size} {st.st_mtime_ns}"
    return None


def _items(spec: SourceSpec, scratch: Path, limit_bytes: int | None, progress: bool) -> tuple[int, Loader]:
    """A source as (number of items, loader of item i): shuffling items and loading lazily
    makes a capped run read only what it keeps."""
    if spec.kind == "stdlib":
        return _stdlib_code(spec.name) if spec.location == "code" else _stdlib_text(spec.name)
    if spec.kind == "dir":
        root = Path(spec.location).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: not a directory (source {spec.name!r})")
        globs = [g for g in spec.option("glob").split(",") if g]
        excludes = _DIR_EXCLUDES + tuple(g for g in spec.option("exclude").split(",") if g)
        return _files_items(spec.name, root, _list_files(root, globs, excludes), int(spec.option("max_file_bytes")))
    if spec.kind == "jsonl":
        return _jsonl_items(spec.name, Path(spec.location).expanduser(), spec.option("key"), scratch)
    return _hf_items(spec, scratch, limit_bytes, progress)


def _list_files(root: Path, globs: Sequence[str], excludes: Sequence[str]) -> list[str]:
    """Relative posix paths of the files under `root` that match a glob, sorted. A glob with
    no "/" matches file names, one with "/" the relative path; an exclude pattern matches
    any path component or the relative path, and excluded folders are not entered."""
    def excluded(name: str, rel: str) -> bool:
        return any(fnmatch.fnmatch(name, x) or fnmatch.fnmatch(rel, x) for x in excludes)

    found = []
    for folder, dirs, files in os.walk(root):
        prefix = Path(folder).relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        dirs[:] = [d for d in dirs if not excluded(d, prefix + d)]
        for name in files:
            rel = prefix + name
            if not excluded(name, rel) and any(fnmatch.fnmatch(rel if "/" in g else name, g) for g in globs):
                found.append(rel)
    return sorted(found)


def _read_source_file(root: Path, rel: str, max_bytes: int) -> str | None:
    """A text file's contents, or None when too big or not UTF-8 (binary)."""
    path = root / rel
    if path.stat().st_size > max_bytes:
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def _files_items(name: str, root: Path, files: list[str], max_bytes: int) -> tuple[int, Loader]:
    def load(i: int) -> Document | None:
        text = _read_source_file(root, files[i], max_bytes)
        return None if text is None else {"text": text, "source": name, "path": files[i]}
    return len(files), load


def _stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, _list_files(root, ["*.py"], _STDLIB_EXCLUDES)


def _stdlib_code(name: str) -> tuple[int, Loader]:
    """Standard-library modules as code documents, without tests and generated tables."""
    root, files = _stdlib_files()

    def load(i: int) -> Document | None:
        text = _read_source_file(root, files[i], _STDLIB_MAX_FILE_BYTES)
        # Generated files (codec tables, token lists) would teach the tokenizer their tables.
        if text is None or _GENERATED.search(text[:1000]) or files[i].startswith("_sysconfigdata"):
            return None
        return {"text": text, "source": name, "path": files[i], "lang": "python"}
    return len(files), load


def _stdlib_text(name: str) -> tuple[int, Loader]:
    """English prose: the pydoc topics (the language reference) and one document per module
    holding its docstring and those of its public classes and functions."""
    from pydoc_data.topics import topics

    root, files = _stdlib_files()
    topic_names = sorted(topics)

    def load(i: int) -> Document | None:
        if i < len(topic_names):
            return {"text": topics[topic_names[i]], "source": name, "id": f"pydoc_data.topics/{topic_names[i]}"}
        rel = files[i - len(topic_names)]
        source = _read_source_file(root, rel, _STDLIB_MAX_FILE_BYTES)
        text = _docstring_document(_module_name(rel), source) if source else None
        return {"text": text, "source": name, "id": rel} if text else None
    return len(topic_names) + len(files), load


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _docstring_document(module: str, source: str) -> str | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    parts = [module]
    if doc := ast.get_docstring(tree):
        parts.append(doc)
    parts += [f"{qualname}\n{doc}" for qualname, doc in _public_docstrings(tree.body, "")]
    text = "\n\n".join(parts) + "\n"
    return text if len(parts) > 1 and len(text) >= _MIN_DOCSTRING_DOC_CHARS else None


def _public_docstrings(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            if doc := ast.get_docstring(node):
                yield prefix + node.name, doc
            if isinstance(node, ast.ClassDef):
                yield from _public_docstrings(node.body, f"{prefix}{node.name}.")


def _line_offsets(path: Path) -> np.ndarray:
    """Start offsets of every line of a file plus its size (so line i is [o[i], o[i+1]))."""
    starts = [np.zeros(1, np.int64)]
    pos = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            starts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(block)
    offsets = np.concatenate(starts)
    return offsets if offsets[-1] == pos else np.append(offsets, pos)


def _jsonl_items(name: str, path: Path, key: str, scratch: Path) -> tuple[int, Loader]:
    """Lines of a JSONL file, read through a memory map (a .gz is decompressed to scratch first)."""
    with open_binary(path) as f:
        if path.suffix == ".gz":
            plain = scratch / "input.jsonl"
            with open(plain, "wb") as out:
                while block := f.read(1 << 24):
                    out.write(block)
        else:
            plain = path
    offsets = _line_offsets(plain)
    if offsets[-1] == 0:
        return 0, lambda i: None
    with open(plain, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def load(i: int) -> Document | None:
        line = data[offsets[i]:offsets[i + 1]]
        if not line.strip():
            return None
        obj = parse_json_line(line, path, i + 1)
        return {"text": get_text(obj, key, path, i + 1), "source": name, "id": f"{path.name}:{i + 1}"}
    return len(offsets) - 1, load


def _hf_items(spec: SourceSpec, scratch: Path, limit_bytes: int | None, progress: bool) -> tuple[int, Loader]:
    """Stream a Hugging Face dataset into a scratch JSONL (up to the cap), then read it as one."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"source {spec.name!r}: Hugging Face datasets need the `datasets` package "
                        "(pip install datasets)") from None
    key, split = spec.option("key"), spec.option("split")
    where = f"Hugging Face dataset {spec.location!r} (split {split!r})"
    plain = scratch / "hf.jsonl"
    written = 0
    try:
        stream = datasets.load_dataset(spec.location, spec.option("config") or None, split=split, streaming=True)
        with open(plain, "wb") as out, tqdm(desc=f"{spec.name}: download", unit="doc", disable=not progress) as bar:
            for i, row in enumerate(stream):
                text = get_text(row, key, where, i)
                line = _json_line({"text": text, "source": spec.name, "id": f"{spec.location}/{split}/{i}"})
                out.write(line)
                written += len(line)
                bar.update()
                if limit_bytes is not None and written >= limit_bytes:
                    break  # a capped run keeps no more than this, so stop streaming
    except DataError:
        raise
    except Exception as e:  # network, authentication, unknown dataset: all end the same way
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"source {spec.name!r}: could not read {where}: {type(e).__name__}: {message}") from None
    return _jsonl_items(spec.name, plain, "text", scratch)


# --------------------------------------------------------------------------------------- writer


def _write_source(spec: SourceSpec, path: Path, seed: int, max_bytes: int | None, min_chars: int,
                  progress: bool) -> dict[str, Any]:
    """Dedup, shuffle, cap and write one source; returns its manifest entry."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    stats = {"documents": 0, "bytes": 0, "duplicates": 0, "skipped": 0}
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.name}.") as scratch:
        count, load = _items(spec, Path(scratch), max_bytes, progress)
        order = np.random.default_rng(seed).permutation(count)
        seen: set[bytes] = set()
        try:
            with open(tmp, "wb") as out, tqdm(total=count, desc=spec.name, unit="doc", disable=not progress) as bar:
                for i in order.tolist():
                    bar.update()
                    doc = load(i)
                    if doc is None or len(doc["text"].strip()) < min_chars:
                        stats["skipped"] += 1
                        continue
                    key = hashlib.blake2b(doc["text"].encode("utf-8", "surrogatepass"), digest_size=16).digest()
                    if key in seen:
                        stats["duplicates"] += 1
                        continue
                    line = _json_line(doc)
                    if max_bytes is not None and stats["bytes"] + len(line) > max_bytes:
                        break
                    seen.add(key)
                    out.write(line)
                    digest.update(line)
                    stats["documents"] += 1
                    stats["bytes"] += len(line)
            if stats["documents"] == 0:
                raise DataError(f"source {spec} produced no documents")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    if progress:
        print(f"corpus: {path}: {stats['documents']:,} documents, {stats['bytes'] / 1e6:.1f} MB "
              f"({stats['duplicates']:,} duplicates, {stats['skipped']:,} empty or unreadable dropped)",
              file=sys.stderr)
    return {**stats, "sha256": digest.hexdigest()}


def _json_line(doc: Document) -> bytes:
    """One JSONL line, UTF-8; text holding lone surrogates (legal in JSON escapes, not in
    UTF-8) falls back to ASCII escapes so the file stays valid UTF-8."""
    try:
        return (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(doc) + "\n").encode("ascii")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
