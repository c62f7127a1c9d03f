"""JSONL -> Megatron indexed datasets: `<prefix>_<key>_document.bin/.idx`.

For the same input, flags and tokenizer the files are byte for byte those Megatron-LM's
`tools/preprocess_data.py` (core_r0.16.0) writes: one sequence per document (per sentence
for a JSON list value or with --split-sentences), empty documents kept as documents without
sequences, EOD after the last non-empty sentence, uint16 below a vocabulary of 65,500 and
int32 above, `--partitions` order; each `--tokenizer-type` means what it means there
(`megatron_tokenizers`). tests/test_megatron_lm.py checks this against that tool itself.

The main process only reads raw chunks of lines and writes; worker processes parse and encode
whole chunks and send back numpy arrays. Outputs are written under temporary names and renamed
when complete, `.idx` last; an error names the file and line and leaves nothing behind.

Next to each dataset, `<dataset>.meta.json` records the tokenizer's fingerprint and EOD;
`check_dataset_matches_tokenizer` compares them at training start-up.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megatron_code.data.corpus import open_binary, parse_json_line
from megatron_code.data.errors import DataError
from megatron_code.data.megatron_tokenizers import DocumentTokenizer, TokenizerOptions, build_document_tokenizer
from megatron_code.data.tokenizer import Tokenizer, load_tokenizer

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[type[np.number], int] = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                                           np.float64: 6, np.float32: 7, np.uint16: 8}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents + 1
META_FORMAT = 1


def optimal_dtype(vocab_size: int) -> type[np.integer]:
    """Megatron's choice of token dtype for a vocabulary size."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_prefix(output_prefix: Path | str, key: str, level: str = "document") -> Path:
    """Megatron's name for one JSON key's dataset: `<output_prefix>_<key>_<level>`, where the
    level is "sentence" with --split-sentences."""
    return Path(f"{output_prefix}_{key}_{level}")


# --------------------------------------------------------------------------- indexed datasets


@dataclass
class IndexedData:
    """A Megatron indexed dataset read back: the index arrays and the tokens (memory-mapped)."""

    prefix: Path
    dtype: np.dtype
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (all its sequences)."""
        first, last = self.document_indices[i], self.document_indices[i + 1]
        if first == last:
            return self.tokens[:0]
        start = self.sequence_pointers[first] // self.dtype.itemsize
        return self.tokens[start: start + int(self.sequence_lengths[first:last].sum())]


def read_indexed(prefix: Path | str) -> IndexedData:
    """Open `<prefix>.idx/.bin`, checking the header and that both files are complete."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for p in (idx_path, bin_path):
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    raw = np.memmap(idx_path, np.uint8, mode="r") if idx_path.stat().st_size else b""
    if len(raw) < _HEADER.size or bytes(raw[:9]) != INDEX_MAGIC:
        raise DataError(f"{idx_path}: not a Megatron index file (bad magic)")
    _, version, code, n_seq, n_doc = _HEADER.unpack_from(raw)
    codes = {c: t for t, c in DTYPE_CODES.items()}
    if version != INDEX_VERSION or code not in codes:
        raise DataError(f"{idx_path}: unsupported index (version {version}, dtype code {code})")
    expected = _HEADER.size + 12 * n_seq + 8 * n_doc
    if len(raw) not in (expected, expected + n_seq):  # + one mode byte per sequence when multimodal
        raise DataError(f"{idx_path}: {len(raw)} bytes but its header describes {expected} (truncated?)")
    dtype = np.dtype(codes[code])
    lengths = np.frombuffer(raw, np.int32, n_seq, _HEADER.size)
    pointers = np.frombuffer(raw, np.int64, n_seq, _HEADER.size + 4 * n_seq)
    documents = np.frombuffer(raw, np.int64, n_doc, _HEADER.size + 12 * n_seq)
    bin_bytes = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if n_seq else 0
    if bin_path.stat().st_size != bin_bytes:
        raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes but {idx_path.name} describes {bin_bytes} "
                        "(truncated, or the two files come from different runs)")
    tokens = np.memmap(bin_path, dtype, mode="r") if bin_bytes else np.empty(0, dtype)
    return IndexedData(Path(prefix), dtype, lengths, pointers, documents, tokens)


def max_token_id(data: IndexedData) -> int:
    """The largest token id in the dataset (-1 when empty). Scanning the .bin takes minutes at
    hundreds of GB, so the answer is kept in the user's cache directory ($MEGATRON_CODE_CACHE,
    else $XDG_CACHE_HOME/megatron_code, else ~/.cache/megatron_code) under the .bin's absolute
    path, size and modification time: a changed file is scanned again."""
    bin_path = Path(f"{data.prefix}.bin").resolve()
    stat = bin_path.stat()
    key = {"path": str(bin_path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    root = os.environ.get("MEGATRON_CODE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                         "megatron_code")
    entry = Path(root, "max_token_id", hashlib.sha256(str(bin_path).encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(entry.read_text())
        if cached["key"] == key:
            return int(cached["max_token_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    high = int(data.tokens.max()) if len(data.tokens) else -1
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "max_token_id": high}))
        os.replace(tmp, entry)
    except OSError:  # a read-only home only costs the next start-up another scan
        pass
    return high


class IndexedWriter:
    """Writes `<prefix>.bin/.idx` under temporary names; `commit` renames them into place
    (the .idx last, so a pair with an .idx is always complete). Use as a context manager:
    an exception removes the temporary files."""

    def __init__(self, prefix: Path | str, dtype: type[np.integer]) -> None:
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = Path(f"{prefix}.bin{tag}")
        self._idx_tmp = Path(f"{prefix}.idx{tag}")
        self._meta_tmp = Path(f"{prefix}.meta.json{tag}")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self._per_document: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray) -> None:
        """Append documents in bulk: their tokens, each sequence's length, and how many
        sequences each document has (0 for an empty document)."""
        self._bin.write(np.ascontiguousarray(tokens, self.dtype).data)
        self._lengths.append(np.asarray(sequence_lengths, np.int32))
        self._per_document.append(np.asarray(sequences_per_document, np.int64))

    def add_document(self, tokens: Sequence[int] | np.ndarray, sequence_lengths: Sequence[int] | None = None) -> None:
        """Append one document; by default it is one sequence (none when empty)."""
        tokens = np.asarray(tokens, self.dtype)
        lengths = [len(tokens)] if sequence_lengths is None and len(tokens) else list(sequence_lengths or [])
        self.add(tokens, np.asarray(lengths, np.int32), np.asarray([len(lengths)], np.int64))

    @property
    def documents(self) -> int:
        return sum(len(d) for d in self._per_document)

    def commit(self, meta: dict[str, Any] | None = None) -> Path:
        """Write the index and move everything into place; returns the prefix."""
        self._bin.close()
        lengths = np.concatenate([np.zeros(0, np.int32), *self._lengths])
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.concatenate([[0], np.cumsum(np.concatenate([np.zeros(0, np.int64), *self._per_document]))])
        with open(self._idx_tmp, "wb") as f:
            code = DTYPE_CODES[self.dtype.type]
            f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, code, len(lengths), len(documents)))
            for array in (lengths, pointers, documents.astype(np.int64)):
                f.write(array.data)
        if meta is not None:
            self._meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        final_idx, final_meta = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.meta.json")
        final_idx.unlink(missing_ok=True)  # from here on, the old pair no longer looks complete
        final_meta.unlink(missing_ok=True)
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        if meta is not None:
            os.replace(self._meta_tmp, final_meta)
        os.replace(self._idx_tmp, final_idx)
        return self.prefix

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp, self._meta_tmp):
            p.unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


# ---------------------------------------------------------------------------------- encoding


@dataclass
class _Chunk:
    """One chunk of input lines, encoded: per JSON key (tokens, sequence lengths,
    sequences per document), plus counts for progress."""

    arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    documents: int
    bytes: int


@dataclass(frozen=True)
class _Task:
    """Whole lines of one input file; with `partition` (p, P), only the lines whose index over
    all inputs is p modulo P are documents of this pass."""

    source: str
    first_line: int
    """Line number of the first line in its file (from 1)."""
    first_index: int
    """Index of the first line over all input files (from 0)."""
    raw: bytes
    partition: tuple[int, int] | None = None


class _ChunkEncoder:
    """Parses and encodes chunks of JSONL lines (runs in each worker process)."""

    def __init__(self, tokenizer: DocumentTokenizer, json_keys: Sequence[str], append_eod: bool,
                 splitter: Callable[[str], list[str]] | None = None) -> None:
        self.tokenizer, self.json_keys, self.splitter = tokenizer, tuple(json_keys), splitter
        if append_eod and tokenizer.eod is None:
            raise DataError(f"{tokenizer.name} has no end-of-document token; run without --append-eod")
        self.eod = tokenizer.eod if append_eod else None
        self.vocab_size = tokenizer.vocab_size
        self.dtype = optimal_dtype(self.vocab_size)

    def __call__(self, task: _Task) -> _Chunk:
        objects, line_numbers = [], []
        for k, line in enumerate(task.raw.split(b"\n")):
            if task.partition and (task.first_index + k) % task.partition[1] != task.partition[0]:
                continue
            if line.strip():  # Megatron fails on blank lines; skipping them keeps the same documents
                objects.append(parse_json_line(line, task.source, task.first_line + k))
                line_numbers.append(task.first_line + k)
        arrays = {key: self._encode_key(objects, task.source, line_numbers, key) for key in self.json_keys}
        return _Chunk(arrays, len(objects), len(task.raw))

    def _encode_key(self, objects: list[dict], source: str, line_numbers: list[int],
                    key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        texts: list[str] = []
        sentences = np.ones(len(objects), np.int64)  # sentences per document: 1 unless a list
        for i, obj in enumerate(objects):
            value = obj.get(key)
            where = f"{source}:{line_numbers[i]}"
            if isinstance(value, str) and self.splitter is not None:
                value = self.splitter(value)
            elif isinstance(value, list) and self.splitter is not None:
                raise DataError(f"{where}: key {key!r} holds a list; --split-sentences splits strings")
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list) and all(isinstance(s, str) for s in value):
                texts += value  # pre-split sentences, as Megatron's --split-sentences writes them
                sentences[i] = len(value)
            elif key not in obj:
                present = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
                raise DataError(f"{where}: missing key {key!r} (keys present: {present})")
            else:
                raise DataError(f"{where}: key {key!r} holds {type(value).__name__}, "
                                "expected a string or a list of strings")
        try:
            tokens, lengths = self.tokenizer.encode_flat(texts)
        except Exception:  # find the text that fails, and name its line
            document = np.repeat(np.arange(len(objects)), sentences)
            for text, i in zip(texts, document):
                self._encode_one(text, f"{source}:{line_numbers[i]}", key)
            raise
        self._check_ids(tokens, lengths, sentences, source, line_numbers)
        return self._megatron_layout(tokens, lengths, sentences)

    def _encode_one(self, text: str, where: str, key: str) -> None:
        try:
            self.tokenizer.encode_flat([text])
        except Exception as e:
            if (bad := _LONE_SURROGATE.search(text)) is not None:
                raise DataError(f"{where}: key {key!r} holds a lone surrogate (U+{ord(bad.group()):04X} at character "
                                f"{bad.start()}), which is not Unicode text; Megatron-LM's tool stops here "
                                "too") from None
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise DataError(f"{where}: key {key!r}: {self.tokenizer.name} cannot tokenize it "
                            f"({type(e).__name__}: {reason})") from None

    def _megatron_layout(self, tokens: np.ndarray, lengths: np.ndarray,
                         sentences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Megatron's rules: empty sentences are dropped, EOD follows the last non-empty
        sentence of a non-empty document, a document with no tokens has no sequences."""
        document = np.repeat(np.arange(len(sentences)), sentences)
        kept = lengths > 0
        kept_document = document[kept]
        per_document = np.bincount(kept_document, minlength=len(sentences))
        lengths = lengths[kept].astype(np.int32)
        if self.eod is not None and len(lengths):
            last = np.flatnonzero(np.append(kept_document[1:] != kept_document[:-1], True))
            tokens = np.insert(tokens, np.cumsum(lengths)[last], self.eod)
            lengths[last] += 1
        return tokens.astype(self.dtype), lengths, per_document

    def _check_ids(self, tokens: np.ndarray, lengths: np.ndarray, sentences: np.ndarray, source: str,
                   line_numbers: list[int]) -> None:
        if not len(tokens) or (0 <= int(tokens.min()) and int(tokens.max()) < self.vocab_size):
            return
        first = int(np.argmax((tokens < 0) | (tokens >= self.vocab_size)))
        text = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
        document = int(np.searchsorted(np.cumsum(sentences), text, side="right"))
        raise DataError(f"{source}:{line_numbers[document]}: token id {tokens[first]} does not fit: "
                        f"{self.tokenizer.name} has ids 0 .. {self.vocab_size - 1:,} and the dataset dtype is "
                        f"{np.dtype(self.dtype).name}")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_WORKER: _ChunkEncoder | None = None
"""The encoder a forked pool worker inherits from the parent."""


def _encode_in_worker(task: _Task) -> _Chunk:
    assert _WORKER is not None
    return _WORKER(task)


def _encoded_chunks(encoder: _ChunkEncoder, tasks: Iterator[_Task], workers: int) -> Iterator[_Chunk]:
    """Encoded chunks in input order, using `workers` processes."""
    global _WORKER
    if workers <= 1:
        yield from map(encoder, tasks)
        return
    _WORKER = encoder  # workers are forked and inherit the loaded tokenizer
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:  # leaving terminates it
            yield from pool.imap(_encode_in_worker, tasks)
    finally:
        _WORKER = None


class _ChunkReader:
    """Yields a _Task of about chunk_bytes of whole lines at a time, over all inputs and, with
    `partitions` P > 1, over all inputs once per partition (Megatron-LM's round-robin split:
    line i of the inputs goes to partition i mod P, and partitions are concatenated in order).

    With `in_flight`, at most that many chunks are out at once (`done` returns a slot):
    Pool.imap would otherwise read the whole input into its task queue."""

    def __init__(self, paths: Sequence[Path], chunk_bytes: int, partitions: int = 1,
                 in_flight: int | None = None) -> None:
        self.paths, self.chunk_bytes, self.partitions = list(paths), chunk_bytes, partitions
        self._slots = threading.Semaphore(in_flight) if in_flight else None
        self._stopped = False

    def __iter__(self) -> Iterator[_Task]:
        for p in range(self.partitions):
            partition = (p, self.partitions) if self.partitions > 1 else None
            before = 0  # lines in the inputs before this one
            for path in self.paths:
                lines = 0
                for first_line, raw in self._chunks(path):
                    if not self._wait():
                        return
                    yield _Task(str(path), first_line, before + first_line - 1, raw, partition)
                    lines = first_line - 1 + raw.count(b"\n") + (not raw.endswith(b"\n"))
                before += lines

    def _chunks(self, path: Path) -> Iterator[tuple[int, bytes]]:
        line = 1
        with open_binary(path) as f:
            rest = b""
            while block := f.read(self.chunk_bytes):
                block = rest + block
                cut = block.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a chunk: keep reading
                    rest = block
                    continue
                rest = block[cut:]
                yield line, block[:cut]
                line += block.count(b"\n", 0, cut)
            if rest:
                yield line, rest

    def _wait(self) -> bool:
        if self._slots is not None:
            self._slots.acquire()
        return not self._stopped

    def done(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def stop(self) -> None:
        """Unblock and end the iteration (so a pool's feeder thread can exit)."""
        self._stopped = True
        if self._slots is not None:
            for _ in range(1 << 10):
                self._slots.release()


def preprocess(inputs: Path | str | Sequence[Path | str], output_prefix: Path | str,
               tokenizer: DocumentTokenizer | Path | str, json_keys: Sequence[str] = ("text",),
               append_eod: bool = True, workers: int = 1, chunk_bytes: int | None = None, partitions: int = 1,
               splitter: Callable[[str], list[str]] | None = None, log_interval: int = 0,
               progress: bool = True) -> dict[str, Any]:
    """Tokenize JSONL files (plain or .gz) into one Megatron dataset per JSON key.

    `tokenizer` is built by `build_document_tokenizer`, or a path: a SentencePiece .model
    (megatron-core's SentencePieceTokenizer) or a Hugging Face folder (its HuggingFaceTokenizer).
    `partitions` > 1 orders documents as Megatron-LM's `--partitions` does (round robin over the
    lines of all inputs, partitions concatenated); `splitter` cuts each text into sentences
    (one sequence each, `<prefix>_<key>_sentence` files). Every `log_interval` documents a line
    reports progress. Returns a summary: the input (its path, or the list of them), documents,
    tokens per key, bytes, seconds, the encoding method, and `outputs` mapping each key to its
    dataset prefix (without .bin/.idx); `<dataset>.meta.json` records the same.
    `chunk_bytes` (input per task) defaults to 1 MiB, less for small inputs so that every
    worker gets several chunks.
    """
    started = time.perf_counter()
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    if not paths or not json_keys:
        raise DataError("preprocess: no input files" if not paths else "preprocess: no JSON keys given")
    if not isinstance(tokenizer, DocumentTokenizer):
        if not Path(tokenizer).exists():
            raise DataError(f"{tokenizer}: no such tokenizer file or folder")
        kind = "HuggingFaceTokenizer" if Path(tokenizer).is_dir() else "SentencePieceTokenizer"
        tokenizer = build_document_tokenizer(TokenizerOptions(kind, str(tokenizer)))
    encoder = _ChunkEncoder(tokenizer, json_keys, append_eod, splitter)
    if workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from worker processes
    name = paths[0].name if len(paths) == 1 else f"{len(paths)} files"
    named = str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]  # "input" in the summary and metadata
    size = None if any(p.suffix == ".gz" for p in paths) else sum(p.stat().st_size for p in paths)
    if chunk_bytes is None:
        chunk_bytes = min(1 << 20, max(1 << 16, (size or 1 << 30) // (8 * workers)))
    reader = _ChunkReader(paths, chunk_bytes, partitions, in_flight=2 * workers + 2 if workers > 1 else None)
    level = "sentence" if splitter is not None else "document"
    writers = {key: IndexedWriter(dataset_prefix(output_prefix, key, level), encoder.dtype) for key in json_keys}
    tokens = dict.fromkeys(json_keys, 0)
    documents = total_bytes = 0
    if progress:
        print(f"preprocess: {tokenizer.name}; {tokenizer.method}", file=sys.stderr)
    chunks = _encoded_chunks(encoder, iter(reader), workers)
    bar = tqdm(total=size and size * partitions, unit="B", unit_scale=True, desc=f"preprocess {name}",
               disable=not progress)
    try:
        for chunk in chunks:
            reader.done()
            for key, (chunk_tokens, lengths, per_document) in chunk.arrays.items():
                writers[key].add(chunk_tokens, lengths, per_document)
                tokens[key] += len(chunk_tokens)
            done, documents = documents, documents + chunk.documents
            total_bytes += chunk.bytes
            if log_interval and documents // log_interval > done // log_interval:  # as Megatron-LM's tool logs
                elapsed = time.perf_counter() - started
                bar.write(f"processed {documents:,} documents ({documents / elapsed:,.0f} docs/s, "
                          f"{total_bytes / elapsed / 1e6:.2f} MB/s)", file=sys.stderr)
            bar.update(chunk.bytes)
            bar.set_postfix_str(f"{documents / max(bar.format_dict['elapsed'], 1e-9):,.0f} docs/s", refresh=False)
        if documents == 0:
            raise DataError(f"{', '.join(map(str, paths))}: no documents (no non-blank line)")
        tokenizer_meta = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod,
                          "fingerprint": tokenizer.fingerprint}
        outputs = {key: writer.commit({"format": META_FORMAT, "input": named, "json_key": key,
                                       "append_eod": append_eod, "partitions": partitions,
                                       "split_sentences": splitter is not None, "documents": documents,
                                       "tokens": tokens[key], "dtype": writer.dtype.name, "tokenizer": tokenizer_meta})
                   for key, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        reader.stop()
        chunks.close()
        bar.close()
    seconds = time.perf_counter() - started
    if progress:
        print(f"preprocess: {documents:,} documents, {sum(tokens.values()):,} tokens, {total_bytes / 1e6:.1f} MB in "
              f"{seconds:.1f} s ({total_bytes / 1e6 / seconds:.1f} MB/s, {documents / seconds:,.0f} docs/s) -> "
              + ", ".join(f"{p}.{{bin,idx}}" for p in outputs.values()), file=sys.stderr)
    return {"input": named, "documents": documents, "tokens": tokens, "bytes": total_bytes,
            "seconds": seconds, "workers": workers, "method": tokenizer.method, "outputs": outputs}


def check_dataset_matches_tokenizer(prefix: Path | str, tokenizer: Tokenizer) -> None:
    """Fail (DataError) when the dataset at `prefix` was not made with `tokenizer`.

    With the `.meta.json` sidecar preprocess writes, the vocabularies' fingerprints and the EOD
    ids must match; without one (files from Megatron-LM), every token id must be below the
    tokenizer's vocab size: the largest id is read once per .bin and remembered by its path,
    size and modification time (`max_token_id`), so later start-ups cost milliseconds. Also
    fails on missing or truncated files.
    """
    data = read_indexed(prefix)
    meta_path = Path(f"{prefix}.meta.json")
    if meta_path.exists():
        try:
            made_with = json.loads(meta_path.read_text())["tokenizer"]
            fingerprint, eod = made_with["fingerprint"], made_with.get("eod_id")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{meta_path}: unreadable ({type(e).__name__}: {e}); "
                            "delete it to check the dataset by its token ids") from None
        made_by = made_with.get("name") or made_with.get("path")
        if fingerprint != tokenizer.fingerprint:
            raise DataError(f"{prefix}: tokenized with {made_by} (vocab {made_with['vocab_size']:,}) but the "
                            f"tokenizer is {tokenizer.path} (vocab {tokenizer.vocab_size:,}), a different vocabulary; "
                            "re-run tools/preprocess_data.py with it")
        if eod is not None and eod != tokenizer.eod_id:
            raise DataError(f"{prefix}: documents end with id {eod} ({made_by}) but {tokenizer.path} ends them with "
                            f"{tokenizer.eod_id}; preprocess with a tokenizer type whose EOD is the model's eos")
        return
    if (high := max_token_id(data)) >= tokenizer.vocab_size:
        raise DataError(f"{prefix}.bin: holds token id {high} but the tokenizer {tokenizer.path} has only "
                        f"{tokenizer.vocab_size:,} ids; the dataset was made with another tokenizer")


def dataset_is_current(prefix: Path | str, input_path: Path, tokenizer_path: Path) -> bool:
    """The dataset at `prefix` was made from `input_path` with this tokenizer, after both last
    changed, and its files are complete (so a rebuild can be skipped)."""
    meta, idx = Path(f"{prefix}.meta.json"), Path(f"{prefix}.idx")
    if not (meta.is_file() and idx.is_file()):
        return False
    if json.loads(meta.read_text()).get("input") != str(input_path):
        return False
    if idx.stat().st_mtime_ns < max(input_path.stat().st_mtime_ns, tokenizer_path.stat().st_mtime_ns):
        return False
    try:
        check_dataset_matches_tokenizer(prefix, load_tokenizer(tokenizer_path))
    except DataError:
        return False
    return True
