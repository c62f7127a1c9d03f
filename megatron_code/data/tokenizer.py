"""Tokenizers: train a SentencePiece BPE model for text + code, export it as Hugging Face
tokenizer files, and load either form behind one `Tokenizer` interface.

The model keeps every byte of its input: identity normalization, no dummy prefix, runs of
spaces as pieces, "\\n" and "\\t" as pieces, byte fallback for anything unseen, digits split.
Special tokens are control symbols at fixed ids, so text never turns into them (a source file
that contains "<|user|>" stays plain text); code that needs them inserts their ids:

    0 <unk>  1 <BOS>  2 <EOD>  3 <PAD>  4 <|system|>  5 <|user|>  6 <|assistant|>  7 <|end|>
    8 <CLS>  9 <SEP>  10 <MASK>

<EOD> is SentencePiece's eos, which is the end-of-document id Megatron-LM's SentencePiece
wrappers use. <CLS>, <SEP> and <MASK> are reserved because Megatron's legacy wrapper appends
them when missing: with them in the model, its vocab size equals ours.

Batch encoding (`encode_flat`, `encode_batch`) returns exactly SentencePiece's ids, 2-3x
faster: texts are cut where no vocabulary piece can span the cut, and the ids of each
distinct segment are computed once (see `_SegmentCache`).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import numpy as np

from megatron_code.data.corpus import get_text, open_binary, parse_json_line
from megatron_code.data.errors import DataError

UNK, BOS, EOD, PAD = "<unk>", "<BOS>", "<EOD>", "<PAD>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MEGATRON_RESERVED = ("<CLS>", "<SEP>", "<MASK>")
SPECIAL_TOKENS = (UNK, BOS, EOD, PAD) + CHAT_TOKENS + MEGATRON_RESERVED
"""All special tokens, in id order (token i has id i)."""

FORMAT_VERSION = 1
TRAINER_OPTIONS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "required_chars": "\n\t",
    "character_coverage": 0.9999,
    "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3,
    "unk_piece": UNK, "bos_piece": BOS, "eos_piece": EOD, "pad_piece": PAD,
    "control_symbols": list(CHAT_TOKENS + MEGATRON_RESERVED),
}
"""SentencePiece trainer settings (recorded in the tokenizer's metadata)."""
_SENTENCE_CHARS = 8192
"""Documents are cut into training sentences of at most this many characters at line ends:
SentencePiece skips longer sentences instead of using them."""


class Tokenizer(ABC):
    """What the pipeline needs from a tokenizer; `load_tokenizer` builds one."""

    path: str
    """Where it was loaded from (a .model file, a folder or a hub name)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (ids are 0 .. vocab_size - 1)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; never adds BOS/EOD and never produces special ids."""

    @abstractmethod
    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts encoded and concatenated (int32) plus each text's number of ids (int64)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens appear as their names."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, None if it is not one."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        tokens, lengths = self.encode_flat(texts)
        return [a.tolist() for a in np.split(tokens, np.cumsum(lengths)[:-1])] if len(texts) else []

    def _special(self, *names: str) -> int:
        for name in names:
            if (i := self.token_to_id(name)) is not None:
                return i
        raise DataError(f"tokenizer {self.path} has no {names[0]} token; "
                        "train one with tools/train_tokenizer.py")

    @property
    def eod_id(self) -> int:
        return self._special(EOD, "</s>", "<|endoftext|>", "<|end_of_text|>")

    @property
    def pad_id(self) -> int:
        return self._special(PAD, "<pad>")

    @property
    def bos_id(self) -> int:
        return self._special(BOS, "<s>", "<|begin_of_text|>")

    @property
    def system_id(self) -> int:
        return self._special(CHAT_TOKENS[0])

    @property
    def user_id(self) -> int:
        return self._special(CHAT_TOKENS[1])

    @property
    def assistant_id(self) -> int:
        return self._special(CHAT_TOKENS[2])

    @property
    def end_id(self) -> int:
        return self._special(CHAT_TOKENS[3])

    @property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary in id order: equal for a .model and its HF export."""
        pieces = [self.id_to_token(i) for i in range(self.vocab_size)]
        return hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


# ------------------------------------------------------------------------------- SentencePiece

_SPACES = " \u2581"  # SentencePiece writes a space as U+2581 and reads U+2581 as a space
# Both regexes cut every text into segments and keep NUL apart: NUL joins a batch of texts
# into one string (one regex call, one SentencePiece call) and marks where each text ends.
_COARSE = re.compile(r"\x00|[ \u2581]*[^ \u2581\x00]+|[ \u2581]+")
_FINE = re.compile(r"\x00|[ \u2581]*(?:[^\W\d_]+|\d|(?:[^\w \u2581\x00]|_)+)|[ \u2581]+")
# The same cuts spelled for ASCII-only text, which Python's re matches about twice as fast.
_COARSE_ASCII = re.compile(r"\x00| *[^ \x00]+| +")
_FINE_ASCII = re.compile(r"\x00| *(?:[A-Za-z]+|[0-9]|[^A-Za-z0-9 \x00]+)| +")
_DIGIT, _LETTER = re.compile(r"\d"), re.compile(r"[^\W\d_]")
_SKIP_BATCHES = 3
_COARSE_MIN_HIT_RATE = 0.75
"""Tuned on the built-in corpus (cold caches) and 40 MB of library code (warm caches)."""
_SEGMENT_BATCH_CHARS = 1 << 15
"""SentencePiece gets slower per character on longer inputs; batches of texts are joined
into strings of about this many characters."""


def _char_class(c: str) -> str:
    """The classes _FINE cuts between: space, digit, letter, other."""
    return "S" if c in _SPACES else "D" if _DIGIT.match(c) else "L" if _LETTER.match(c) else "O"


def _class_pairs(pieces: Sequence[str]) -> set[tuple[str, str]]:
    """The (_char_class, _char_class) of every pair of adjacent characters inside the pieces."""
    joined = "\x00".join(pieces)  # spelled in classes, pieces apart: every adjacent pair in one string
    classes = joined.translate({ord(c): _char_class(c) for c in set(joined) - {"\x00"}})
    return {(a, b) for a in "SDLO" for b in "SDLO" if a + b in classes}


def _cuts_are_safe(pieces: Sequence[str] | set[tuple[str, str]], allowed: Callable[[str, str], bool]) -> bool:
    """True when every pair of adjacent characters inside every piece is `allowed`: a regex
    that cuts text only between pairs that are not allowed then never separates characters
    one BPE merge could join, so each segment encodes alone exactly as inside the text.
    `pieces` may also be their `_class_pairs`."""
    pairs = pieces if isinstance(pieces, set) else _class_pairs(pieces)
    return all(allowed(a, b) for a, b in pairs)


def _no_tokens() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, np.int32), np.empty(0, np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) over (s, n): where each output item comes from."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def _merge(parts: Sequence[tuple[list[int], tuple[np.ndarray, np.ndarray]]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodings of disjoint subsets of n texts, (text indices, (tokens, lengths)), put back in order."""
    lengths = np.zeros(n, np.int64)
    for index, (_, part_lengths) in parts:
        lengths[index] = part_lengths
    starts = np.cumsum(lengths) - lengths
    tokens = np.empty(int(lengths.sum()), np.int32)
    for index, (part_tokens, part_lengths) in parts:
        tokens[_ranges(starts[index], part_lengths)] = part_tokens
    return tokens, lengths


def _split_at(tokens: np.ndarray, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of NUL-joined texts -> (tokens without the separators, tokens per text)."""
    is_sep = tokens == sep
    return tokens[~is_sep], np.diff(np.flatnonzero(is_sep), prepend=-1, append=len(tokens)) - 1


class _Growable:
    """A numpy array with amortized appends."""

    def __init__(self, dtype: type) -> None:
        self.data, self.size = np.empty(1024, dtype), 0

    def extend(self, values: np.ndarray) -> None:
        need = self.size + len(values)
        if need > len(self.data):
            grown = np.empty(max(need, 2 * len(self.data)), self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size: need] = values
        self.size = need

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class _SegmentCache:
    """Encodes texts by cutting them with a regex and looking each segment up in a cache;
    segments seen for the first time go to `lower` together. Text repeats at the segment
    level (identifiers, indentation, words), so most of it is never encoded twice.

    SentencePiece's BPE merges adjacent symbols into vocabulary pieces; when no piece holds
    the two characters on either side of a cut, no merge crosses it, and each segment encodes
    alone to exactly the ids it gets inside the text (`_cuts_are_safe` checks the vocabulary
    before a cache is used)."""

    def __init__(self, regexes: tuple[re.Pattern[str], re.Pattern[str]],
                 lower: Callable[[list[str]], tuple[np.ndarray, np.ndarray]], nul_id: int,
                 min_hit_rate: float = 0.0, max_tokens: int = 1 << 24) -> None:
        """`regexes`: the cuts for any text and the same cuts for ASCII-only text. When fewer
        than `min_hit_rate` of a batch's segments were cached, the next batches go straight
        to `lower` (this level costs more than it saves until its cache has warmed up)."""
        self.regex, self.ascii_regex = regexes
        # ASCII-only text is cut as bytes: Python's re finds the same segments about twice as
        # fast in bytes, and the cache keeps them as bytes (decoded only when first seen).
        self.bytes_regex = re.compile(self.ascii_regex.pattern.encode("ascii"))
        self.lower, self.nul_id, self.min_hit_rate, self.max_tokens = lower, nul_id, min_hit_rate, max_tokens
        self._skip = 0
        self._reset()

    def _reset(self) -> None:
        self.index: dict[str | bytes, int] = {"\x00": 0, b"\x00": 0}
        self.starts, self.lengths, self.tokens = _Growable(np.int64), _Growable(np.int64), _Growable(np.int32)
        self.starts.extend(np.zeros(1, np.int64))
        self.lengths.extend(np.ones(1, np.int64))
        self.tokens.extend(np.full(1, self.nul_id, np.int32))

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts must not contain NUL (the caller routes those elsewhere)."""
        if not texts:
            return _no_tokens()
        if self._skip:
            self._skip -= 1
            return self.lower(list(texts))
        if self.tokens.size > self.max_tokens:
            self._reset()  # bounds memory on corpora with an endless tail of rare segments
        ascii_texts = [i for i, t in enumerate(texts) if t.isascii()]
        if len(ascii_texts) in (0, len(texts)):
            return self._encode(texts, self.ascii_regex if ascii_texts else self.regex)
        other = sorted(set(range(len(texts))).difference(ascii_texts))
        return _merge([(ascii_texts, self._encode([texts[i] for i in ascii_texts], self.ascii_regex)),
                       (other, self._encode([texts[i] for i in other], self.regex))], len(texts))

    def _encode(self, texts: Sequence[str], regex: re.Pattern[str]) -> tuple[np.ndarray, np.ndarray]:
        as_bytes = regex is self.ascii_regex
        if as_bytes:
            segments = self.bytes_regex.findall("\x00".join(texts).encode("ascii"))
        else:
            segments = regex.findall("\x00".join(texts))
        # One C-level pass looks every segment up and gives each unseen one a provisional
        # row (first + its position); unseen segments then get consecutive rows.
        first = self.starts.size
        rows = np.fromiter(map(self.index.setdefault, segments, range(first, first + len(segments))),
                           np.int64, len(segments))
        unseen = rows >= first
        if unseen.any():
            positions = np.unique(rows[unseen]) - first
            new = [segments[p] for p in positions.tolist()]
            final = np.empty(len(segments), np.int64)
            final[positions] = np.arange(first, first + len(new))
            rows[unseen] = final[rows[unseen] - first]
            if len(new) > (1 - self.min_hit_rate) * len(segments):
                self._skip = _SKIP_BATCHES
            self.index.update(zip(new, range(first, first + len(new))))
            tokens, lengths = self.lower([b.decode("ascii") for b in new] if as_bytes else new)
            self.starts.extend(self.tokens.size + np.cumsum(lengths) - lengths)
            self.lengths.extend(lengths)
            self.tokens.extend(tokens)
        gather = _ranges(self.starts.view()[rows], self.lengths.view()[rows])
        return _split_at(self.tokens.view()[gather], self.nul_id)


def _for_ids(method: Callable[[Any], Any], ids: list[int]) -> list[Any]:
    """`method` applied to each id: in one call where SentencePiece takes a list (one C++
    loop instead of a Python call per id), else id by id."""
    if not ids:
        return []
    try:
        out = method(ids)
    except TypeError:  # an old SentencePiece without list arguments
        return [method(i) for i in ids]
    return list(out)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; batch encoding is exactly `SentencePieceProcessor.encode`."""

    def __init__(self, model_file: Path | str) -> None:
        import sentencepiece as spm

        self.path = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: not a SentencePiece model ({e})") from None
        n = self.sp.get_piece_size()
        ids = list(range(n))
        self._pieces = _for_ids(self.sp.id_to_piece, ids)
        self._ids = {p: i for i, p in enumerate(self._pieces)}
        control = _for_ids(self.sp.is_control, ids)
        self._control = {i for i in ids if control[i]}
        self._not_learned = [a or b or c for a, b, c in zip(control, _for_ids(self.sp.is_byte, ids),
                                                             _for_ids(self.sp.is_unknown, ids))]
        self.num_threads = os.cpu_count() or 1
        """Threads SentencePiece may use per call (preprocess workers set 1)."""
        self._encoder = self._build_encoder()

    def _build_encoder(self) -> Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]:
        """The fastest exact encoder this vocabulary allows (see _cuts_are_safe)."""
        learned = [p for p, skip in zip(self._pieces, self._not_learned) if not skip]
        # Several texts become one by joining them with NUL when no piece holds NUL and NUL
        # encodes to its own byte id, which then marks where each text's ids end.
        nul = self._ids.get("<0x00>")
        self._nul = nul if nul is not None and not any("\x00" in p for p in learned) else None
        encoder = self._encode_exact
        if self._nul is None or not self._is_verbatim():
            return encoder
        pairs = _class_pairs(learned)
        if _cuts_are_safe(pairs, lambda a, b: a == "S" or a == b != "D"):
            encoder = _SegmentCache((_FINE, _FINE_ASCII), encoder, self._nul).encode
        if _cuts_are_safe(pairs, lambda a, b: a == "S" or b != "S"):
            encoder = _SegmentCache((_COARSE, _COARSE_ASCII), encoder, self._nul, _COARSE_MIN_HIT_RATE).encode
        return encoder

    def _is_verbatim(self) -> bool:
        """Segments encode alone as in context only without a dummy prefix and without
        normalization (no whitespace folding, no NFKC joining a letter and its accent)."""
        probe = "  x  \u00a0e\u0301\uff21\t\n  "
        return (self.sp.decode(self.sp.encode(probe)) == probe
                and not self.sp.encode("x", out_type=str)[0].startswith("\u2581"))

    def _encode_exact(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return _no_tokens()
        if self._nul is None or any("\x00" in t for t in texts):
            out = self.sp.encode(list(texts), num_threads=self.num_threads)
            lengths = np.fromiter(map(len, out), np.int64, len(out))
            return np.fromiter(chain.from_iterable(out), np.int32, int(lengths.sum())), lengths
        groups, members, size = [], [], 0
        for text in texts:
            members.append(text)
            size += len(text) + 1
            if size > _SEGMENT_BATCH_CHARS:
                groups.append("\x00".join(members))
                members, size = [], 0
        if members:
            groups.append("\x00".join(members))
        out = self.sp.encode(groups, num_threads=self.num_threads)
        flat = np.fromiter(chain.from_iterable(chain.from_iterable(zip(out, repeat((self._nul,))))), np.int32)
        return _split_at(flat[:-1], self._nul)

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def eod_id(self) -> int:
        # Megatron's SentencePiece wrappers end documents with the model's eos
        return self.sp.eos_id() if self.sp.eos_id() >= 0 else super().eod_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return _no_tokens()
        with_nul = [i for i, t in enumerate(texts) if "\x00" in t] if self._nul is not None else []
        if not with_nul:
            return self._encoder(texts)
        # NUL separates texts inside the fast encoders: texts holding NUL are encoded plainly
        rest = sorted(set(range(len(texts))).difference(with_nul))
        return _merge([(with_nul, self._encode_exact([texts[i] for i in with_nul])),
                       (rest, self._encoder([texts[i] for i in rest]))], len(texts))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        parts, start = [], 0
        for k, i in enumerate(ids):  # SentencePiece drops control tokens; show them instead
            if i in self._control:
                parts += [self.sp.decode(ids[start:k]), self._pieces[i]]
                start = k + 1
        return "".join(parts) + self.sp.decode(ids[start:])

    def id_to_token(self, token_id: int) -> str:
        return self._pieces[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)


# -------------------------------------------------------------------------------- Hugging Face


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (tokenizer.json), run through the `tokenizers` library."""

    def __init__(self, folder: Path | str, name: str | None = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(folder)
        self.path = name or str(folder)
        try:
            self.tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise DataError(f"{folder / 'tokenizer.json'}: not a Hugging Face tokenizer ({e})") from None
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        # Special names may be strings or AddedToken dicts.
        self._names = {k: v["content"] if isinstance(v, dict) else v
                       for k, v in config.items() if k.endswith("_token") and v}
        self.tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._vocab = self.tok.get_vocab(with_added_tokens=True)
        self._pieces = {i: p for p, i in self._vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_names(self) -> dict[str, str]:
        """tokenizer_config.json's special tokens by key (bos_token, eos_token, ...), as chat
        templates refer to them."""
        return dict(self._names)

    def _named(self, key: str, *fallbacks: str) -> int:
        return self._special(*([self._names[key]] if key in self._names else []), *fallbacks)

    @property
    def eod_id(self) -> int:
        return self._named("eos_token", EOD, "</s>", "<|endoftext|>", "<|end_of_text|>")

    @property
    def pad_id(self) -> int:
        return self._named("pad_token", PAD, "<pad>")

    @property
    def bos_id(self) -> int:
        return self._named("bos_token", BOS, "<s>", "<|begin_of_text|>")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        out = [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]
        lengths = np.fromiter(map(len, out), np.int64, len(out))
        return np.fromiter(chain.from_iterable(out), np.int32, int(lengths.sum())), lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self._pieces[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_tokenizer(path: Path | str) -> Tokenizer:
    """A SentencePiece `.model` file, a folder with a Hugging Face `tokenizer.json` (or with a
    single `.model`), or a Hugging Face hub id (downloaded through transformers)."""
    p = Path(path).expanduser()
    if p.is_file():
        return SentencePieceTokenizer(p)
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            return HFTokenizer(p)
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer(models[0])
        raise DataError(f"{p}: no tokenizer.json and not exactly one .model file in this folder")
    if _HUB_ID.fullmatch(str(path)) and p.suffix not in (".model", ".json"):
        return _load_from_hub(str(path))
    raise DataError(f"{path}: no such tokenizer file or folder")


def _load_from_hub(name: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
        folder = Path(tempfile.mkdtemp(prefix="megatron_code_tokenizer_"))
        tok.save_pretrained(folder)
    except Exception as e:  # offline, unknown id, gated repository: all end the same way
        reason = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{name}: no such tokenizer file or folder, and not loadable from the Hugging Face "
                        f"hub ({type(e).__name__}: {reason})") from None
    if not (folder / "tokenizer.json").exists():
        raise DataError(f"{name}: the hub tokenizer has no tokenizer.json (only fast tokenizers are supported)")
    return HFTokenizer(folder, name=name)


# ---------------------------------------------------------------------------------- training


def hf_tokenizer_dir(model_path: Path) -> Path:
    """The Hugging Face folder train_tokenizer writes next to `<prefix>.model`: `<prefix>_hf`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + "_hf")


def train_tokenizer(inputs: Sequence[Path], output_prefix: Path, vocab_size: int = 8192,
                    sample_docs: int = 10_000, seed: int = 1234, text_key: str = "text",
                    force: bool = False, progress: bool = True) -> Path:
    """Train a SentencePiece BPE model on a seeded sample of JSONL documents.

    Each input contributes up to `sample_docs / len(inputs)` documents (reservoir sampling),
    so a small prose corpus is not drowned by a large code one. Writes `<prefix>.model`,
    `<prefix>.vocab`, the Hugging Face folder `<prefix>_hf/` and `<prefix>.meta.json`;
    returns the .model path. Returns at once when the metadata shows the same inputs and
    parameters, unless `force`.
    """
    import sentencepiece as spm

    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise DataError("train_tokenizer: no input files")
    output_prefix = Path(output_prefix)
    model_path = output_prefix.with_name(output_prefix.name + ".model")
    meta_path = output_prefix.with_name(output_prefix.name + ".meta.json")
    for p in inputs:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    params = {"format": FORMAT_VERSION, "vocab_size": vocab_size, "sample_docs": sample_docs, "seed": seed,
              "text_key": text_key, "trainer": TRAINER_OPTIONS, "sentencepiece": spm.__version__,
              "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                         for p in inputs]}
    if (not force and meta_path.exists() and model_path.exists() and hf_tokenizer_dir(model_path).is_dir()
            and json.loads(meta_path.read_text()).get("params") == params):
        if progress:
            print(f"tokenizer: {model_path} is up to date", file=sys.stderr)
        return model_path

    started = time.perf_counter()
    per_input = math.ceil(sample_docs / len(inputs))
    docs = [text for i, p in enumerate(inputs) for text in _sample_documents(p, per_input, seed + i, text_key)]
    if not docs:
        raise DataError(f"{', '.join(map(str, inputs))}: no documents to train the tokenizer on")
    sentences = [s for doc in docs for s in _sentences(doc, _SENTENCE_CHARS)]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            max_sentence_length=4 * _SENTENCE_CHARS, num_threads=os.cpu_count() or 1,
            minloglevel=2, **TRAINER_OPTIONS)
    except RuntimeError as e:
        raise DataError(f"tokenizer training failed on {len(docs):,} documents: {e}") from None

    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes_atomic(model_path, model.getvalue())
    tok = SentencePieceTokenizer(model_path)
    got = [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))]
    if got != list(SPECIAL_TOKENS):  # ids are part of the contract (SFT, Megatron's eod)
        raise DataError(f"{model_path}: special tokens came out as {got}, expected {list(SPECIAL_TOKENS)}")
    vocab = "".join(f"{tok.id_to_token(i)}\t{tok.sp.get_score(i):g}\n" for i in range(tok.vocab_size))
    _write_bytes_atomic(model_path.with_suffix(".vocab"), vocab.encode("utf-8", "surrogatepass"))
    export_hf_tokenizer(model_path, hf_tokenizer_dir(model_path), probe=[d[:4096] for d in docs[:50]])
    meta = {"params": params, "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint,
            "documents": len(docs), "sentences": len(sentences), "seconds": round(time.perf_counter() - started, 2)}
    _write_bytes_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    if progress:
        print(f"tokenizer: {model_path} (vocab {tok.vocab_size:,}, {len(docs):,} documents, "
              f"{meta['seconds']:.1f} s) and {hf_tokenizer_dir(model_path)}/", file=sys.stderr)
    return model_path


def _sample_documents(path: Path, k: int, seed: int, key: str) -> list[str]:
    """Up to k documents of a JSONL file, chosen uniformly with a seeded reservoir; only the
    chosen lines are parsed."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, bytes]] = []
    seen = 0
    with open_binary(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            seen += 1
            if len(reservoir) < k:
                reservoir.append((line_no, line))
            elif (j := rng.randrange(seen)) < k:
                reservoir[j] = (line_no, line)
    return [get_text(parse_json_line(line, path, n), key, path, n) for n, line in sorted(reservoir)]


def _sentences(text: str, limit: int) -> Iterator[str]:
    """Cut a document at line ends into pieces of at most `limit` characters."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if buf and size + len(line) > limit:
            yield "".join(buf)
            buf, size = [], 0
        while len(line) > limit:
            yield line[:limit]
            line = line[limit:]
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


# ------------------------------------------------------------------------- Hugging Face export

_PROBE = ("def f(x):\n\tif x:\n        return  {'a': [1, 2.5e-3]}\n\n\n  \n"
          "Prose with unicode: héllo wörld, 日本語, emoji 😀, quotes “x”.\r\n\x00\x7f")


def export_hf_tokenizer(model_path: Path, out_dir: Path, probe: Sequence[str] = ()) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for a model
    trained by train_tokenizer, so `transformers.AutoTokenizer.from_pretrained(out_dir)` loads
    it. The export is checked to encode `probe` texts (and a built-in one) identically."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE

    sp_tok = SentencePieceTokenizer(model_path)
    sp = sp_tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    # BPE merges from the vocabulary: every way to split a learned piece into two pieces,
    # ranked by the piece's id (SentencePiece merges the best-scoring = lowest-id piece first).
    merges = sorted((i, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:])
                    for p, i in vocab.items() if not (i in special or sp.is_byte(i))
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    tok = RustTokenizer(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=UNK,
                            byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    tok.encode_special_tokens = True
    for text in (_PROBE, *probe):
        if tok.encode(text, add_special_tokens=False).ids != sp.encode(text):
            raise DataError(f"{model_path}: the Hugging Face export encodes differently from SentencePiece "
                            "(only models trained by train_tokenizer can be exported)")

    names = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
             "pad_token": sp.id_to_piece(sp.pad_id()), "unk_token": sp.id_to_piece(sp.unk_id())}
    extra = [sp.id_to_piece(i) for i in special if sp.id_to_piece(i) not in names.values()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "additional_special_tokens": extra,
        "add_bos_token": False,
        "add_eos_token": False,
        # decode must give back the exact text; special-token strings in text stay text, as in SentencePiece
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": 1_000_000_000,
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared
    try:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({**names, "additional_special_tokens": extra}, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
