"""Tokenizer: exact round trips, fixed special ids, pad ids that never collide, the HF export,
batch encoding equal to SentencePiece's own per-text encode."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizer_zoo import zoo  # noqa: F401  (a fixture)
from tool_modules import load_tool

from megatron_code.data.errors import DataError
from megatron_code.data.tokenizer import (CHAT_TOKENS, NO_PAD, SPECIAL_TOKENS, SentencePieceTokenizer,
                                          load_tokenizer, train_tokenizer)

CODE = 'class A:\n\tdef f(self, x):\n\t\treturn {"k": [1, 2.5e-3]}\n\n\n    # four spaces\n        \n\r\nx  =  1\n'
PROSE = "  Leading spaces, trailing ones.  \nUnicode: héllo wörld, naïve café, 日本語, Ελληνικά, emoji 😀 — “quotes”.\n\n"
TRICKY = [CODE, PROSE, "", " ", "\n", "\t\t", "▁ literal U+2581", "NUL \x00 and \x7f", "12345 67.89", "<|user|> <EOD>"]


def corpus_texts(tiny_corpus, limit: int = 40) -> list[str]:
    return [json.loads(line)["text"] for path in (tiny_corpus.text, tiny_corpus.code)
            for line in open(path, encoding="utf-8").readlines()[:limit]]


def test_round_trip_keeps_every_character(tiny_corpus) -> None:
    tok = load_tokenizer(tiny_corpus.tokenizer)
    for text in TRICKY + corpus_texts(tiny_corpus, 10):
        if "▁" in text:  # SentencePiece reads U+2581 as a space: the one character that cannot survive
            assert tok.decode(tok.encode(text)) == text.replace("▁", " ")
        else:
            assert tok.decode(tok.encode(text)) == text
    assert tok.token_to_id("\n") is not None and tok.token_to_id("\t") is not None


def test_special_tokens_have_fixed_ids_and_never_come_from_text(tiny_corpus) -> None:
    tok = load_tokenizer(tiny_corpus.tokenizer)
    assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert (tok.eod_id, tok.pad_id, tok.bos_id) == (2, 3, 1)
    assert (tok.system_id, tok.user_id, tok.assistant_id, tok.end_id) == (4, 5, 6, 7)
    assert tok.vocab_size == 1024
    ids = tok.encode("<|user|> hi <EOD><PAD>")
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode([tok.user_id, *tok.encode("hi"), tok.end_id, tok.eod_id]) == "<|user|>hi<|end|><EOD>"


@pytest.mark.parametrize("model", ["sp_default", "sp_llama", "sp_own"])
def test_batch_encoding_is_sentencepiece_per_text(zoo, tiny_corpus, model: str) -> None:
    """Any text, any batch: exactly `SentencePieceProcessor.encode(text)`, so models with a dummy
    prefix keep each text's leading "▁" however texts are batched."""
    import sentencepiece as spm

    path = getattr(zoo, model)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    rng = random.Random(0)
    atoms = ["def", " ", "  ", "    ", "\t", "\n", "x_1", "__init__", "(self)", "é", "日本", "😀", "▁", "\x00", "42",
             "3.14", "'s", "--", "Ünïcode", "\r\n", "", "{", "}", "<EOD>", "</s>"]
    fuzz = ["".join(rng.choice(atoms) for _ in range(rng.randrange(0, 60))) for _ in range(300)]
    texts = corpus_texts(tiny_corpus) + fuzz + TRICKY
    rng.shuffle(texts)
    reference = [sp.encode(t) for t in texts]
    tok = SentencePieceTokenizer(path)
    for batch in (1, 7, len(texts)):
        assert [ids for i in range(0, len(texts), batch) for ids in tok.encode_batch(texts[i:i + batch])] == reference
    tokens, lengths = tok.encode_flat(texts)
    assert tokens.dtype == np.int32 and lengths.tolist() == [len(r) for r in reference]


def test_pad_id_is_the_models_own_or_one_no_text_encodes_to(zoo, tiny_corpus) -> None:
    """megatron-core masks the loss where labels equal the pad id, so it must not be a real token
    that text or EOD produces: tokenizers without a pad token get NO_PAD (-1)."""
    assert load_tokenizer(tiny_corpus.tokenizer).pad_id == 3  # <PAD>
    assert load_tokenizer(tiny_corpus.hf_tokenizer).pad_id == 3
    assert load_tokenizer(zoo.sp_default).pad_id == NO_PAD  # SentencePiece's default: no pad piece
    gpt2 = load_tokenizer(zoo.hf_gpt2)  # eos, no pad
    assert gpt2.pad_id == NO_PAD and gpt2.eod_id == gpt2.token_to_id("<|endoftext|>")


def test_hf_folder_loads_in_transformers_and_encodes_identically(tiny_corpus) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_corpus.hf_tokenizer))
    ours = load_tokenizer(tiny_corpus.hf_tokenizer)
    sp = load_tokenizer(tiny_corpus.tokenizer)
    assert len(hf) == ours.vocab_size == sp.vocab_size and ours.fingerprint == sp.fingerprint
    assert hf.eos_token_id == ours.eod_id == sp.eod_id and hf.pad_token_id == sp.pad_id
    assert hf.convert_tokens_to_ids(list(CHAT_TOKENS)) == [sp.system_id, sp.user_id, sp.assistant_id, sp.end_id]
    for text in TRICKY + corpus_texts(tiny_corpus, 15):
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids == hf(text)["input_ids"]
        assert ours.encode(text) == ids
        assert hf.decode(ids) == sp.decode(ids)


def test_load_tokenizer_forms_and_errors(tiny_corpus, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tiny_corpus.tokenizer.parent / "spm.model"), SentencePieceTokenizer)
    with pytest.raises(DataError, match=r"nothing\.model: no such tokenizer"):
        load_tokenizer(tmp_path / "nothing.model")
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"bad\.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


def test_training_is_deterministic_and_skips_when_built(tiny_corpus, tmp_path: Path) -> None:
    a = train_tokenizer([tiny_corpus.code], tmp_path / "a", vocab_size=400, progress=False)
    b = train_tokenizer([tiny_corpus.code], tmp_path / "b", vocab_size=400, progress=False)
    assert a.read_bytes() == b.read_bytes()
    stamp = a.stat().st_mtime_ns
    assert train_tokenizer([tiny_corpus.code], tmp_path / "a", vocab_size=400, progress=False) == a
    assert a.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "a.meta.json").read_text())["params"]["vocab_size"] == 400


def test_training_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no documents"):
        train_tokenizer([empty], tmp_path / "t", progress=False)
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "tiny corpus"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"small\.jsonl:2: missing key 'text'"):
        train_tokenizer([small], tmp_path / "t", progress=False)
    small.write_text(json.dumps({"text": "tiny corpus"}) + "\n")
    with pytest.raises(DataError, match="tokenizer training failed"):
        train_tokenizer([small], tmp_path / "t", vocab_size=5000, progress=False)
    with pytest.raises(DataError, match=r"absent\.jsonl: no such file"):
        train_tokenizer([tmp_path / "absent.jsonl"], tmp_path / "t", progress=False)


def test_cli(tiny_corpus, tmp_path: Path, capsys) -> None:
    cli = load_tool("train_tokenizer")
    assert cli.main(["--input", str(tiny_corpus.text), "--output-prefix", str(tmp_path / "cli"),
                     "--vocab-size", "400", "--quiet"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "cli.model"), str(tmp_path / "cli_hf")]
    assert cli.main(["--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.jsonl'}: no such file"
