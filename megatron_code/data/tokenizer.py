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

`pad_id` is the model's own pad token when it has one that is not also its EOD, else
NO_PAD (-1), which no text ever encodes to: megatron-core's GPTDataset pads short samples with
it and masks their loss, so tokenizers without a pad token (GPT-2, Llama-3 style) train too.
"""
from __future__ import annotations

import functools
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
from itertools import chain
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
NO_PAD = -1
"""`pad_id` of a tokenizer without its own pad token (megatron-core's own choice for that case)."""

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
        """The pad token's id, or NO_PAD when there is none (or it is the EOD token, whose
        loss must not be masked)."""
        pad = next((i for name in (PAD, "<pad>") if (i := self.token_to_id(name)) is not None), NO_PAD)
        return NO_PAD if pad == self.eod_id else pad

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

    @functools.cached_property
    def fingerprint(self) -> str:
        """Of the vocabulary in id order: equal for a .model and its HF export (computed once)."""
        return vocabulary_fingerprint([self.id_to_token(i) for i in range(self.vocab_size)])


def vocabulary_fingerprint(tokens: Sequence[str]) -> str:
    """sha256 of the token strings in id order."""
    return hashlib.sha256(json.dumps(list(tokens), ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


# ------------------------------------------------------------------------------- SentencePiece


def flatten_ids(encoded: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (all ids concatenated as int32, each list's length as int64)."""
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return np.fromiter(chain.from_iterable(encoded), np.int32, int(lengths.sum())), lengths


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
    """A SentencePiece model. Every text is encoded on its own by `SentencePieceProcessor.encode`
    (a batch is one call that loops over the texts in C++), so ids never depend on which other
    texts share a batch: models with a dummy prefix give each text its leading "▁"."""

    def __init__(self, model_file: Path | str) -> None:
        import sentencepiece as spm

        self.path = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: not a SentencePiece model ({e})") from None
        ids = list(range(self.sp.get_piece_size()))
        self._pieces = _for_ids(self.sp.id_to_piece, ids)
        self._ids = {p: i for i, p in enumerate(self._pieces)}
        self._control = {i for i, c in zip(ids, _for_ids(self.sp.is_control, ids)) if c}
        self.num_threads = os.cpu_count() or 1
        """Threads SentencePiece may use per call (preprocess workers set 1)."""

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def eod_id(self) -> int:
        # Megatron's SentencePiece wrappers end documents with the model's eos
        return self.sp.eos_id() if self.sp.eos_id() >= 0 else super().eod_id

    @property
    def pad_id(self) -> int:
        pad = self.sp.pad_id()
        return pad if pad >= 0 and pad != self.eod_id else super().pad_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return flatten_ids(self.sp.encode(list(texts), num_threads=self.num_threads) if texts else [])

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
        pad = self.token_to_id(self._names["pad_token"]) if "pad_token" in self._names else None
        return pad if pad is not None and pad != self.eod_id else super().pad_id

    @property
    def bos_id(self) -> int:
        return self._named("bos_token", BOS, "<s>", "<|begin_of_text|>")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return flatten_ids([e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)])

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
