"""Megatron-LM's `--tokenizer-type`s for preprocessing: for each one, the ids a document gets,
the id that ends it, and the vocabulary size that picks the .bin dtype, exactly as Megatron-LM's
`tools/preprocess_data.py` (core_r0.16.0) builds its tokenizer from the same command line.

That tool builds megatron-core's tokenizers by default and its older `megatron.training`
wrappers with `--legacy-tokenizer`; for the types that work offline they differ like this:

    type                        default (megatron-core)               --legacy-tokenizer
    SentencePieceTokenizer      encode(text); EOD = the model's eos   literal <CLS> <SEP> <EOD> <MASK> and the
                                                                      pad/bos/eos pieces become their ids; <EOD>
                                                                      (added after the pieces if missing) ends
    GPTSentencePieceTokenizer   as above                              encode(text); EOD = eos
    Llama2Tokenizer             as above                              [bos] + encode(text); EOD = eos
    HuggingFaceTokenizer        tokenize(text) -> ids, no BOS/EOS     tokenizer(text).input_ids (BOS/EOS as the
                                (--tokenizer-hf-include-special-      tokenizer adds them); fast tokenizer
                                tokens: tokenizer(text).input_ids)
    GPT2BPETokenizer            downloads "gpt2" from the HF hub      byte-level BPE of --vocab-file and
                                                                      --merge-file; <|endoftext|> ends documents
    NullTokenizer               int(x) for x in text.split(' '); EOD = --vocab-size, vocab = --vocab-size + 1

Ids never depend on which texts share a batch. `method` says which code path encodes: the
plain one (the library calls Megatron-LM makes, per document) or a batch path whose equality
with it is argued where it is chosen: `sentencepiece_words` for SentencePiece BPE models,
`_exact_backend` for Hugging Face tokenizers, `_gpt2_tokenizer`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_code.data.errors import DataError
from megatron_code.data.sentencepiece_words import WordCachedEncoder
from megatron_code.data.tokenizer import SentencePieceTokenizer, flatten_ids, vocabulary_fingerprint

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer")
"""The types Megatron-LM's tool accepts that need no network (GPT2BPETokenizer: with --legacy-tokenizer)."""
_LEGACY_SENTENCEPIECE_SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")
_GPT2_EOD = "<|endoftext|>"
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's word pattern (OpenAI's encoder), which Megatron-LM's GPT-2 tokenizer runs with `regex`."""


@dataclass(frozen=True)
class TokenizerOptions:
    """The tokenizer flags of Megatron-LM's preprocess_data.py."""

    type: str = "SentencePieceTokenizer"
    model: str | None = None
    """--tokenizer-model: a SentencePiece .model file or a Hugging Face tokenizer folder."""
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    """--vocab-size (NullTokenizer: ids are below it, and it is the EOD id)."""
    legacy: bool = False
    """--legacy-tokenizer: Megatron-LM's megatron.training wrappers instead of megatron-core's."""
    hf_use_fast: bool = False
    """--tokenizer-hf-use-fast (megatron-core's HuggingFaceTokenizer loads the slow one by default)."""
    hf_include_special_tokens: bool = False
    """--tokenizer-hf-include-special-tokens: ids as tokenizer(text).input_ids (BOS/EOS included)."""
    trust_remote_code: bool = False


class DocumentTokenizer:
    """Texts -> ids the way one Megatron-LM tokenizer makes them."""

    name: str
    """What it is, for messages: the type and where it was loaded from."""
    vocab_size: int
    """Megatron-LM's vocab_size for it (the .bin dtype follows from it)."""
    eod: int | None
    """The id Megatron-LM appends to every non-empty document with --append-eod (None: it has none)."""
    method: str
    """The code path that encodes, e.g. "plain: ... per document" or "batch: ..."."""
    fingerprint: str
    """Of the vocabulary in id order, as `Tokenizer.fingerprint`."""

    def __init__(self, name: str, vocab_size: int, eod: int | None, method: str, fingerprint: str,
                 encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]) -> None:
        self.name, self.vocab_size, self.eod, self.method, self.fingerprint = name, vocab_size, eod, method, fingerprint
        self._encode = encode

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int32) and each text's number of ids (int64)."""
        return self._encode(list(texts))


def build_document_tokenizer(options: TokenizerOptions) -> DocumentTokenizer:
    """The tokenizer Megatron-LM's tool would build from these flags; DataError naming the flag
    for what it cannot build offline."""
    kind = options.type
    if kind not in TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type {kind}: not supported here (supported: {', '.join(TOKENIZER_TYPES)})")
    if kind == "NullTokenizer":
        if options.vocab_size is None or options.vocab_size < 1:
            raise DataError("--tokenizer-type NullTokenizer needs --vocab-size (a positive number)")
        return _null_tokenizer(options.vocab_size)
    if kind == "GPT2BPETokenizer":
        if not options.legacy:
            raise DataError("--tokenizer-type GPT2BPETokenizer: without --legacy-tokenizer Megatron-LM downloads "
                            "'gpt2' from the Hugging Face hub (and uses --vocab-file as the merge file); add "
                            "--legacy-tokenizer for its offline GPT-2 BPE from --vocab-file and --merge-file")
        if not options.vocab_file or not options.merge_file:
            raise DataError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        return _gpt2_tokenizer(Path(options.vocab_file), Path(options.merge_file))
    if not options.model:
        raise DataError(f"--tokenizer-type {kind} needs --tokenizer-model")
    if kind == "HuggingFaceTokenizer":
        return _hf_tokenizer(options)
    if not Path(options.model).is_file():
        raise DataError(f"--tokenizer-model {options.model}: no such SentencePiece model file")
    return _sentencepiece_tokenizer(SentencePieceTokenizer(options.model), kind if options.legacy else None)


# ------------------------------------------------------------------------------- SentencePiece


def _sentencepiece_tokenizer(tok: SentencePieceTokenizer, legacy_kind: str | None) -> DocumentTokenizer:
    """megatron-core's wrapper (legacy_kind None) or one of the legacy megatron.training ones.
    All encode texts with `SentencePieceProcessor.encode`; for BPE models whose vocabulary
    allows it, `WordCachedEncoder` gives the same ids with each distinct word encoded once."""
    sp, name = tok.sp, f"{legacy_kind or 'SentencePieceTokenizer'} {tok.path}"
    tok.num_threads = 1  # parallelism comes from worker processes
    words = WordCachedEncoder.for_model(tok)
    encode = words.encode_flat if words is not None else tok.encode_flat
    method = ("batch: normalize, then each distinct word encoded once by the model with normalization off "
              "(sentencepiece_words)" if words is not None else
              "batch: SentencePieceProcessor.encode over a list of texts (the per-text encode, looped in C++)")
    if legacy_kind == "Llama2Tokenizer":
        def with_bos(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            tokens, lengths = encode(texts)
            return np.insert(tokens, np.cumsum(lengths) - lengths, sp.bos_id()), lengths + 1
        return DocumentTokenizer(f"{name} (legacy)", tok.vocab_size, sp.eos_id(), method + ", BOS first",
                                 tok.fingerprint, with_bos)
    if legacy_kind == "SentencePieceTokenizer":
        return _legacy_sentencepiece(tok, encode, name, method)
    return DocumentTokenizer(name, tok.vocab_size, sp.eos_id(), method, tok.fingerprint, encode)


def _legacy_sentencepiece(tok: SentencePieceTokenizer, encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
                          name: str, method: str) -> DocumentTokenizer:
    """Megatron-LM's legacy `_SentencePieceTokenizer`: the special tokens below are matched as
    literal strings in the text (leftmost first; at equal positions the first in this order) and
    the text between them is encoded piece by piece; missing ones get ids after the vocabulary."""
    sp = tok.sp
    vocab = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    added: list[str] = []
    specials: dict[str, int] = {}

    def piece_or(token_id: int, default: str) -> str:
        return tok.id_to_token(token_id) if 0 <= token_id < tok.vocab_size else default

    for token in (*_LEGACY_SENTENCEPIECE_SPECIALS, piece_or(sp.pad_id(), "<PAD>"),
                  piece_or(sp.bos_id(), "<BOS>"), piece_or(sp.eos_id(), "<EOS>")):
        if token not in vocab:
            vocab[token] = len(vocab)
            added.append(token)
        specials[token] = vocab[token]
    # A regex alternation finds the leftmost match and, there, the first alternative that matches.
    splitter = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    def encode_with_specials(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [splitter.split(t) for t in texts]  # text, special, text, ..., text
        tokens, lengths = encode([p for split in parts for p in split[::2]])
        segments = iter(np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else [])
        pieces, doc_lengths = [], np.zeros(len(texts), np.int64)
        for i, split in enumerate(parts):
            doc = [next(segments)]
            for special in split[1::2]:
                doc += [np.array([specials[special]], np.int32), next(segments)]
            pieces += doc
            doc_lengths[i] = sum(map(len, doc))
        return np.concatenate(pieces) if pieces else tokens, doc_lengths

    pieces = [tok.id_to_token(i) for i in range(tok.vocab_size)] + added
    return DocumentTokenizer(f"{name} (legacy)", len(vocab), specials["<EOD>"],
                             method + f", pieces between literal {', '.join(specials)}",
                             vocabulary_fingerprint(pieces), encode_with_specials)


# ------------------------------------------------------------------------------- Hugging Face


def _hf_tokenizer(options: TokenizerOptions) -> DocumentTokenizer:
    """megatron-core's HuggingFaceTokenizer, or with --legacy-tokenizer Megatron-LM's older
    `_HuggingFaceTokenizer` (AutoTokenizer with its defaults, `tokenizer(text).input_ids`)."""
    try:
        import transformers
    except ImportError:
        raise DataError("--tokenizer-type HuggingFaceTokenizer needs transformers: pip install transformers") from None
    folder = options.model
    if not Path(folder).exists() and (Path(folder).is_absolute() or folder.startswith((".", "~"))):
        raise DataError(f"--tokenizer-model {folder}: no such folder")
    try:
        if options.legacy:
            hf = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
        else:
            hf = transformers.AutoTokenizer.from_pretrained(folder, use_fast=options.hf_use_fast,
                                                            trust_remote_code=options.trust_remote_code)
    except Exception as e:  # a missing folder, a hub id offline, a broken file: all end the same way
        reason = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"--tokenizer-model {folder}: not loadable by transformers.AutoTokenizer "
                        f"({type(e).__name__}: {reason})") from None
    with_specials = options.legacy or options.hf_include_special_tokens
    if not options.legacy:
        _register_like_megatron_core(hf)
    eos = hf.eos_token_id if options.legacy else (
        hf.convert_tokens_to_ids(hf.eos_token) if hf.eos_token is not None else None)
    if with_specials:
        def plain(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            return flatten_ids([hf(t).input_ids for t in texts])
        method = "plain: tokenizer(text).input_ids per document"
    else:
        def plain(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            return flatten_ids([hf.convert_tokens_to_ids(hf.tokenize(t)) for t in texts])
        method = "plain: convert_tokens_to_ids(tokenize(text)) per document"
    backend = _exact_backend(hf, with_specials)
    if backend is not None:
        def batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            return flatten_ids([e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=with_specials)])
        method = "batch: the tokenizers backend's encode_batch_fast (see _exact_backend)"
    tokens = hf.convert_ids_to_tokens(list(range(len(hf))))
    return DocumentTokenizer(f"HuggingFaceTokenizer {folder}{' (legacy)' if options.legacy else ''}", len(hf), eos,
                             method, vocabulary_fingerprint(tokens), batch if backend is not None else plain)


def _register_like_megatron_core(hf) -> None:
    """megatron-core's wrapper registers eos as sep (or sep as eos) and bos as cls (or cls as bos)
    when one of a pair is missing; registering a token as special makes its literal string in a
    text encode to its id, so the same is done here."""
    special: dict[str, object] = {}
    if hf.sep_token is None and hf.eos_token:
        special["sep_token"] = hf.eos_token
    elif hf.eos_token is None and hf.sep_token:
        special["eos_token"] = hf.sep_token
    if hf.bos_token is None and hf.cls_token:
        special["bos_token"] = hf.cls_token
    if hf.cls_token is None and hf.bos_token:
        special["cls_token"] = hf.bos_token
    special["additional_special_tokens"] = []
    hf.add_special_tokens(special)


def _exact_backend(hf, with_specials: bool):
    """The Rust tokenizer behind `hf` when one batch call to it provably gives the plain path's ids, else None.

    In transformers 5, `TokenizersBackend.tokenize(text)` is `_encode_plus(text,
    add_special_tokens=False).tokens()`, and `tokenizer(text)` is `_encode_plus(text)`:
    both set the backend's `encode_special_tokens` and truncation/padding (off), then call its
    `encode_batch` on the text alone. Calling `tokenize` once leaves the backend in that state,
    so `encode_batch_fast` then encodes each text as they do. `convert_tokens_to_ids` looks each
    token up in the vocabulary; when every id has its own token string, that gives back the ids
    of the encoding. A subclass that overrides any of these, another transformers major version,
    or a vocabulary with two ids for one string gets the plain path."""
    import transformers

    base = getattr(transformers, "TokenizersBackend", None)
    if base is None or not transformers.__version__.startswith("5.") or not isinstance(hf, base):
        return None
    own = ("tokenize", "_encode_plus", "__call__", "convert_tokens_to_ids", "_convert_token_to_id_with_added_voc")
    if any(getattr(type(hf), m) is not getattr(base, m) for m in own) or hasattr(hf, "_switch_to_input_mode"):
        return None
    backend = hf.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(backend.get_vocab_size(with_added_tokens=True))):
        return None
    hf("") if with_specials else hf.tokenize("")
    return backend


# --------------------------------------------------------------------------------------- GPT-2


def _gpt2_tokenizer(vocab_file: Path, merge_file: Path) -> DocumentTokenizer:
    """Megatron-LM's legacy GPT-2 BPE: GPT-2's pattern splits a text into words with Python's
    `regex` module, as there, and the `tokenizers` library runs byte-level BPE on each word.

    Files are read as Megatron-LM reads them: the merges file loses its first line (the
    "#version" header) and whatever follows its last newline, and a pair listed twice keeps its
    last rank. Literal special-token strings are plain text. The words are split by the same
    pattern and regex engine (the library's own engine knows an older Unicode: it takes letters
    added since, such as U+0558, for punctuation). BPE: the library merges the lowest-ranked pair
    one occurrence at a time, leftmost first; GPT-2's loop merges all occurrences of the
    lowest-ranked pair, left to right, then looks again. The two agree unless a merge creates a
    token that a lower-ranked pair contains, which a BPE trainer never writes (it learns a merge
    only after its parts); such files are refused."""
    try:
        import regex
        from tokenizers import Tokenizer, pre_tokenizers
        from tokenizers.models import BPE
    except ImportError:
        raise DataError("--tokenizer-type GPT2BPETokenizer needs regex and tokenizers: pip install regex tokenizers") \
            from None
    for path in (vocab_file, merge_file):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merge_file.read_text(encoding="utf-8").split("\n")[1:-1]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{vocab_file} / {merge_file}: unreadable ({type(e).__name__}: {e})") from None
    if _GPT2_EOD not in vocab:
        raise DataError(f"{vocab_file}: no {_GPT2_EOD} entry (Megatron-LM's GPT-2 tokenizer ends documents with it)")
    missing = sorted(set(pre_tokenizers.ByteLevel.alphabet()) - set(vocab))
    if missing:
        raise DataError(f"{vocab_file}: lacks {len(missing)} of the 256 byte symbols of a GPT-2 vocabulary "
                        f"(first: {missing[0]!r})")
    ranks: dict[tuple[str, ...], int] = {}
    for rank, line in enumerate(lines):
        ranks[tuple(line.split())] = rank
    merges = [pair for pair in sorted(ranks, key=ranks.__getitem__) if len(pair) == 2]
    _check_merges(merges, vocab, merge_file)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # bytes -> symbols only
    words = regex.compile(_GPT2_PATTERN)

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        split = [words.findall(t) for t in texts]
        encoded = tok.encode_batch_fast(split, is_pretokenized=True, add_special_tokens=False)
        return flatten_ids([e.ids for e in encoded])

    tokens = sorted(vocab, key=vocab.__getitem__)
    return DocumentTokenizer(f"GPT2BPETokenizer {vocab_file} (legacy)", len(vocab), vocab[_GPT2_EOD],
                             "batch: regex words, then tokenizers' byte-level BPE encode_batch_fast",
                             vocabulary_fingerprint(tokens), encode)


def _check_merges(merges: list[tuple[str, str]], vocab: dict[str, int], merge_file: Path) -> None:
    """Refuse merges whose ids could differ between the two BPE loops (see _gpt2_tokenizer)."""
    created_last: dict[str, int] = {}
    used_first: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        if a + b not in vocab:
            raise DataError(f"{merge_file}: merge {rank + 2} makes {a + b!r}, which the vocab file lacks")
        created_last[a + b] = rank
        for part in (a, b):
            used_first.setdefault(part, rank)
    for token, rank in created_last.items():
        if used_first.get(token, len(merges)) < rank:
            raise DataError(f"{merge_file}: {token!r} is used by a merge ranked before the one that makes it; "
                            "not a BPE trainer's merge order, so Megatron-LM's ids cannot be guaranteed")


# ---------------------------------------------------------------------------------------- Null


def _null_tokenizer(vocab_size: int) -> DocumentTokenizer:
    """Documents are ids written as text, separated by single spaces; EOD is vocab_size."""
    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return flatten_ids([[int(x) for x in t.split(" ")] for t in texts])
    return DocumentTokenizer(f"NullTokenizer (vocab {vocab_size:,} + EOD)", vocab_size + 1, vocab_size,
                             "plain: int(x) for x in text.split(' ') per document",
                             vocabulary_fingerprint([f"null:{vocab_size}"]), encode)
