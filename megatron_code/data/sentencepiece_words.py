"""Exact SentencePiece BPE encoding for bulk preprocessing, with each distinct word encoded once.

Why the ids are exactly `SentencePieceProcessor.encode(text)`:

1. SentencePiece encodes in two steps: its normalizer N rewrites the text (the model's
   character rules, whitespace as "▁", runs of whitespace folded, a dummy "▁" prefix), then
   the model segments N(text) and nothing else. `SentencePieceProcessor.normalize` is N. A copy
   of the model whose normalizer is switched off (no rules, no dummy prefix, no whitespace
   handling; `_verbatim_copy`) gives its model N(text) unchanged, so
   `copy.encode(N(text)) == encode(text)`.
2. BPE starts from single characters and repeatedly joins the adjacent pair whose join is a
   vocabulary piece with the best score (the leftmost on equal scores); what it cannot find
   becomes bytes or <unk>, symbol by symbol. If no piece holds a "▁" right after another
   character, no symbol ever spans a place in N(text) where "▁" follows a character other
   than "▁". Cut there, N(text) falls into words ("▁▁def", "▁name", ...): the pairs inside one
   word, and their order by score and position, are the same in the whole text as in the word
   alone, so BPE makes the same joins in it (user-defined symbols are pieces too, matched
   whole). Hence `copy.encode(N(text))` is the concatenation of `copy.encode(word)` over its
   words, and a word's ids can be remembered.
3. Conditions, checked when a model is loaded (`WordCachedEncoder.for_model` returns None
   otherwise and the caller encodes texts whole): the model is BPE (a unigram model picks
   the best-scoring segmentation by summing floats; cutting changes those sums, and with
   them which of two near-equal segmentations wins), "▁" is a piece, and no piece holds a
   "▁" after another character.

tests/test_sentencepiece_words.py compares it with `encode` on random strings of characters
that normalization rewrites, merges across spaces, controls and bytes, for BPE models with
SentencePiece's default normalization (with and without byte fallback, with user-defined
symbols) and tools/train_tokenizer.py's, and checks that a unigram model and a BPE model whose
pieces cross spaces are refused.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np

from megatron_code.data.tokenizer import SentencePieceTokenizer, flatten_ids

_WORD = re.compile("\u2581*[^\u2581]+|\u2581+")
"""The words of a normalized text: cut wherever "▁" follows another character."""
_BPE = 2
"""TrainerSpec.model_type of a BPE model (sentencepiece_model.proto)."""


class WordCachedEncoder:
    """`encode_flat` for a SentencePiece BPE model: normalize, cut into words, encode the words
    not seen before with the verbatim copy, and gather each text's ids from the cache. A call
    that fails leaves the cache as it was."""

    def __init__(self, tok: SentencePieceTokenizer, copy, max_tokens: int = 1 << 24) -> None:
        self.sp, self.copy, self.max_tokens = tok.sp, copy, max_tokens
        self._clear()

    @classmethod
    def for_model(cls, tok: SentencePieceTokenizer) -> WordCachedEncoder | None:
        """The encoder when the conditions in the module docstring hold, else None."""
        proto = tok.sp.serialized_model_proto()
        if _field(_field(proto, 2, b""), 3, 1) != _BPE or tok.token_to_id("\u2581") is None:
            return None
        if any(re.search("[^\u2581]\u2581", tok.id_to_token(i)) for i in range(tok.vocab_size)):
            return None
        return cls(tok, _verbatim_copy(proto))

    def _clear(self) -> None:
        self.row: dict[str, int] = {}
        """Each word's row in `starts` and `lengths`: where its ids are in `tokens`."""
        self.starts, self.lengths, self.tokens = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
        self.size = 0
        """Ids held in `tokens` (the arrays have room to grow)."""

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        words = [_WORD.findall(text) for text in self.sp.normalize(list(texts))]
        flat = [w for text_words in words for w in text_words]
        if self.size > self.max_tokens:  # bounds memory on an endless tail of rare words
            self._clear()
        # One pass looks every word up; a new one gets a provisional row (first + its position),
        # then consecutive rows once it is encoded. A failure anywhere takes the new words out.
        first, size = len(self.row), self.size
        try:
            rows = np.fromiter(map(self.row.setdefault, flat, range(first, first + len(flat))), np.int64, len(flat))
            unseen = rows >= first
            if unseen.any():
                positions = np.unique(rows[unseen]) - first
                new = [flat[p] for p in positions.tolist()]
                new_tokens, new_lengths = flatten_ids(self.copy.encode(new, num_threads=1))
                final = np.empty(len(flat), np.int64)
                final[positions] = np.arange(first, first + len(new))
                rows[unseen] = final[rows[unseen] - first]
                self.starts = _put(self.starts, first, size + np.cumsum(new_lengths) - new_lengths)
                self.lengths = _put(self.lengths, first, new_lengths)
                self.tokens = _put(self.tokens, size, new_tokens)
                self.row.update(zip(new, range(first, first + len(new))))
                self.size = size + len(new_tokens)
        except BaseException:
            for word in [w for w, row in self.row.items() if row >= first]:
                del self.row[word]
            self.size = size
            raise
        word_lengths = self.lengths[rows]
        ends = np.cumsum(word_lengths)
        gather = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(self.starts[rows] - ends + word_lengths,
                                                                          word_lengths)
        text_of_word = np.repeat(np.arange(len(words)), [len(w) for w in words])
        return self.tokens[gather], np.bincount(text_of_word, word_lengths, len(words)).astype(np.int64)


def _put(array: np.ndarray, at: int, values: np.ndarray) -> np.ndarray:
    """`array` with `values` written from `at` on, grown (doubled) when too short."""
    if at + len(values) > len(array):
        grown = np.empty(max(2 * len(array), at + len(values), 1024), array.dtype)
        grown[:at] = array[:at]
        array = grown
    array[at:at + len(values)] = values
    return array


# ---------------------------------------------------------------------- the model's protobuf


def _fields(message: bytes) -> Iterator[tuple[int, bytes, int | bytes]]:
    """(field number, the field's raw bytes, its varint value or payload) for each field of a
    protobuf message: enough to read and rewrite a SentencePiece model without protobuf."""
    i = 0
    while i < len(message):
        start = i
        key, i = _varint(message, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(message, i)
        elif wire == 2:
            size, i = _varint(message, i)
            value, i = message[i:i + size], i + size
        elif wire in (1, 5):
            value, i = message[i:i + (8 if wire == 1 else 4)], i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, message[start:i], value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _field(message: bytes, number: int, default: int | bytes) -> int | bytes:
    """The last value of field `number`, or `default` when absent."""
    return next((value for field, _, value in reversed(list(_fields(message))) if field == number), default)


def _verbatim_copy(proto: bytes):
    """The model with its normalizer switched off: ModelProto without self-test data (field 4),
    whose samples would no longer normalize as recorded, and with NormalizerSpec (field 3)
    {name: "identity", add_dummy_prefix: false, remove_extra_whitespaces: false,
    escape_whitespaces: false} and no character rules."""
    import sentencepiece as spm

    spec = b"\x0a\x08identity\x18\x00\x20\x00\x28\x00"
    kept = b"".join(raw for field, raw, _ in _fields(proto) if field not in (3, 4))
    copy = spm.SentencePieceProcessor()
    copy.LoadFromSerializedProto(kept + b"\x1a" + bytes([len(spec)]) + spec)
    return copy
