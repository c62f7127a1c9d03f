"""sentencepiece_words: the word-cached encoder against SentencePiece's own encode, on strings
made of what its argument does not rely on being rare: characters normalization rewrites or
removes, whitespace of every kind, controls, literal "▁", unknown characters and bytes."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from tokenizer_zoo import LONE_SURROGATE, TRICKY_TEXTS, zoo  # noqa: F401  (zoo is a fixture)

from megatron_code.data.sentencepiece_words import WordCachedEncoder
from megatron_code.data.tokenizer import SentencePieceTokenizer

ALPHABET = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2009", "\u200b", "▁", "▁▁", "\x00", "\x07",
            "\x1f", "\x7f", "ＡＢＣ", "ﬁ", "e\u0301", "\u00b4", "①", "½", "™", "Å", "ǅ", "ß", "İ", "a", "the", "def",
            "x_1", "42", "3.14", "'s", "--", "{", "}", "日本", "😀", "👨‍👩‍👧", "\U0001e900", "\u0558", "ꙮ", "<s>", "</s>"]


def fuzz(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 30))) for _ in range(n)] + TRICKY_TEXTS


@pytest.fixture(scope="module")
def models(zoo, tiny_corpus, tmp_path_factory) -> dict[str, Path]:
    """BPE models the encoder takes, plus two it must refuse."""
    root = tmp_path_factory.mktemp("sp_words")
    lines = [s for path in (tiny_corpus.text, tiny_corpus.code) for line in path.read_text().splitlines()
             for s in json.loads(line)["text"].splitlines() if s.strip()]
    options = {"bpe_no_byte_fallback": {"model_type": "bpe"},
               "bpe_user_symbols": {"model_type": "bpe", "byte_fallback": True,
                                    "user_defined_symbols": ["▁▁", "<tag>"]},
               "bpe_pieces_across_spaces": {"model_type": "bpe", "split_by_whitespace": False}}
    for name, extra in options.items():
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(root / name), vocab_size=800,
                                       minloglevel=2, num_threads=2, **extra)
    return {"llama": zoo.sp_llama, "own": zoo.sp_own, "default_unigram": zoo.sp_default,
            **{name: root / f"{name}.model" for name in options}}


@pytest.mark.parametrize("name", ["llama", "own", "bpe_no_byte_fallback", "bpe_user_symbols"])
def test_same_ids_as_sentencepiece(models, tiny_corpus, name: str) -> None:
    tok = SentencePieceTokenizer(models[name])
    encoder = WordCachedEncoder.for_model(tok)
    assert encoder is not None
    texts = fuzz(400, seed=3) + [json.loads(line)["text"] for line in tiny_corpus.code.read_text().splitlines()[:30]]
    expected = [tok.sp.encode(t) for t in texts]
    for batch in (1, 13, len(texts)):  # cold and warm caches
        got = []
        for i in range(0, len(texts), batch):
            tokens, lengths = encoder.encode_flat(texts[i:i + batch])
            got += [a.tolist() for a in np.split(tokens, np.cumsum(lengths)[:-1])]
        assert got == expected


@pytest.mark.parametrize("name", ["default_unigram", "bpe_pieces_across_spaces"])
def test_models_outside_the_argument_are_refused(models, name: str) -> None:
    """A unigram model, and a BPE model with pieces that hold "▁" after another character."""
    tok = SentencePieceTokenizer(models[name])
    if name == "bpe_pieces_across_spaces":
        assert any("▁" in p[1:].lstrip("▁") for p in map(tok.id_to_token, range(tok.vocab_size)))
    assert WordCachedEncoder.for_model(tok) is None


def test_a_failed_call_leaves_the_cache_as_it_was_and_memory_is_bounded(models) -> None:
    tok = SentencePieceTokenizer(models["llama"])
    encoder = WordCachedEncoder.for_model(tok)
    texts = fuzz(200, seed=4)
    expected = [tok.sp.encode(t) for t in texts]
    encoder.encode_flat(texts[:100])
    before = (dict(encoder.row), encoder.size)
    with pytest.raises(Exception):  # fails in normalization, before the cache is touched
        encoder.encode_flat(texts[100:150] + [LONE_SURROGATE])
    assert (encoder.row, encoder.size) == before

    class Interrupted:  # fails after the new words got their provisional rows
        def encode(self, *args, **kwargs):
            raise KeyboardInterrupt

    copy, encoder.copy = encoder.copy, Interrupted()
    with pytest.raises(KeyboardInterrupt):
        encoder.encode_flat(texts[100:150])
    assert (encoder.row, encoder.size) == before
    encoder.copy = copy
    tokens, lengths = encoder.encode_flat(texts)
    assert [a.tolist() for a in np.split(tokens, np.cumsum(lengths)[:-1])] == expected
    encoder.max_tokens = 300  # the next call empties the cache and refills it with its own words only
    tokens, lengths = encoder.encode_flat(texts[150:])
    assert [a.tolist() for a in np.split(tokens, np.cumsum(lengths)[:-1])] == expected[150:]
    assert set(before[0]) - set(encoder.row) and encoder.size <= lengths.sum()
