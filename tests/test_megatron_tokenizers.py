"""megatron_tokenizers: each batch path against the per-document calls Megatron-LM makes, on
inputs none of them was written for; stateless after a failure; files and flags refused with
a reason."""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from tokenizer_zoo import LONE_SURROGATE, SPECIAL_STRINGS, TRICKY_TEXTS, zoo  # noqa: F401  (zoo is a fixture)

from megatron_code.data.errors import DataError
from megatron_code.data.megatron_tokenizers import DocumentTokenizer, TokenizerOptions, build_document_tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.tokenizers import MegatronTokenizer

ATOMS = ["def", " ", "  ", "    ", "\t", "\n", "\r\n", "x_1", "__init__", "(self)", "é", "e\u0301", "日本", "😀", "▁",
         "\x00", "42", "3.14", "'s", "'ll", "--", "Ünïcode", "ﬁ", "\u3000", "\u00a0", "{", "}", "a\u0558b",
         *SPECIAL_STRINGS.split(), "<", ">", "<EOD", "s>", "</", "<<EOD>>", "</s><s>", "<EOD<EOD>"]


def fuzz(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(ATOMS) for _ in range(rng.randrange(0, 40))) for _ in range(n)]
    return texts + TRICKY_TEXTS


def split(tok: DocumentTokenizer, texts: list[str]) -> list[list[int]]:
    tokens, lengths = tok.encode_flat(texts)
    return [a.tolist() for a in np.split(tokens, np.cumsum(lengths)[:-1])] if texts else []


@pytest.mark.parametrize("folder", ["hf_own", "hf_gpt2"])
@pytest.mark.parametrize("mode", ["default", "include-special-tokens", "legacy"])
def test_hf_batch_path_is_transformers_per_document(zoo, folder: str, mode: str) -> None:
    """The Rust batch call against the calls megatron-core (or Megatron-LM's legacy wrapper)
    makes through transformers for each document."""
    from transformers import AutoTokenizer

    path = str(getattr(zoo, folder))
    options = TokenizerOptions("HuggingFaceTokenizer", path, legacy=mode == "legacy",
                               hf_include_special_tokens=mode == "include-special-tokens")
    ours = build_document_tokenizer(options)
    assert ours.method.startswith("batch:")
    texts = fuzz()
    if mode == "legacy":
        hf = AutoTokenizer.from_pretrained(path)
        expected = [hf(t).input_ids for t in texts]
    else:
        reference = MegatronTokenizer.from_pretrained(path, metadata_path={"library": "huggingface"},
                                                      include_special_tokens=mode != "default")
        expected = [reference.tokenize(t) for t in texts]
        assert (ours.vocab_size, ours.eod) == (reference.vocab_size, reference.eod)
    assert split(ours, texts) == expected


def test_hf_tokenizer_with_its_own_tokenize_gets_the_plain_path(zoo, monkeypatch) -> None:
    import transformers

    class Shouting(transformers.TokenizersBackend):  # a subclass that changes what tokenize does
        def tokenize(self, text, **kwargs):
            return super().tokenize(text.upper(), **kwargs)

    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: Shouting(tokenizer_object=real(*a, **k).backend_tokenizer, eos_token="<EOD>"))
    ours = build_document_tokenizer(TokenizerOptions("HuggingFaceTokenizer", str(zoo.hf_own)))
    assert ours.method == "plain: convert_tokens_to_ids(tokenize(text)) per document"
    hf = real(str(zoo.hf_own))
    assert split(ours, ["shout this"]) == [hf.convert_tokens_to_ids(hf.tokenize("SHOUT THIS"))]


@pytest.mark.parametrize("model", ["sp_default", "sp_llama", "sp_own"])
def test_legacy_sentencepiece_specials_as_megatron_core_legacy_mode(zoo, model: str) -> None:
    """Literal special strings anywhere, overlapping and glued: megatron-core's SentencePiece
    class in legacy mode (without its separator trimming) with the legacy wrapper's tokens."""
    import sentencepiece as spm

    path = str(getattr(zoo, model))
    sp = spm.SentencePieceProcessor(model_file=path)
    named = [sp.id_to_piece(i) if i >= 0 else d for i, d in ((sp.pad_id(), "<PAD>"), (sp.bos_id(), "<BOS>"),
                                                              (sp.eos_id(), "<EOS>"))]
    reference = MegatronTokenizer.from_pretrained(path, metadata_path={"library": "sentencepiece"}, legacy=True,
                                                  special_tokens=["<CLS>", "<SEP>", "<EOD>", "<MASK>", *named],
                                                  trim_spm_separator_after_special_token=False)
    ours = build_document_tokenizer(TokenizerOptions("SentencePieceTokenizer", path, legacy=True))
    texts = fuzz(seed=1)
    assert split(ours, texts) == [reference.tokenize(t) for t in texts]
    assert (ours.vocab_size, ours.eod) == (reference.vocab_size, reference._tokenizer.token_to_id("<EOD>"))


@pytest.mark.parametrize("case", ["sp_llama", "legacy-sp", "hf_gpt2", "gpt2"])
def test_ids_do_not_depend_on_the_batch_and_survive_a_failure(zoo, case: str) -> None:
    """A text's ids are the same alone, in any batch, and after a batch that failed (the old
    segment cache returned other texts' ids after a failing call)."""
    options = {"sp_llama": TokenizerOptions("SentencePieceTokenizer", str(zoo.sp_llama)),
               "legacy-sp": TokenizerOptions("SentencePieceTokenizer", str(zoo.sp_llama), legacy=True),
               "hf_gpt2": TokenizerOptions("HuggingFaceTokenizer", str(zoo.hf_gpt2)),
               "gpt2": TokenizerOptions("GPT2BPETokenizer", vocab_file=str(zoo.gpt2_vocab),
                                        merge_file=str(zoo.gpt2_merges), legacy=True)}[case]
    tok = build_document_tokenizer(options)
    texts = fuzz(60, seed=2)
    alone = [split(tok, [t])[0] for t in texts]
    assert split(tok, texts) == alone and split(tok, texts[::-1]) == alone[::-1]
    with pytest.raises(Exception):
        tok.encode_flat(texts[:30] + [LONE_SURROGATE] + texts[30:])
    assert split(tok, texts) == alone


def write_gpt2_files(root: Path, merges: list[str], extra_vocab: list[str]) -> tuple[str, str]:
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + extra_vocab + ["<|endoftext|>"]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
    return str(root / "vocab.json"), str(root / "merges.txt")


def test_gpt2_words_are_split_by_pythons_regex(tmp_path: Path) -> None:
    """U+0558 is a letter to Python's `regex` (Unicode 11+) and to Megatron-LM's GPT-2
    tokenizer, so "a\u0558" is one word and a merge of "a" with its bytes applies; the
    `tokenizers` library's own pre-tokenizer would cut the word there."""
    vocab, merges = write_gpt2_files(tmp_path, ["a Õ", "aÕ ĺ"], ["aÕ", "aÕĺ"])
    tok = build_document_tokenizer(TokenizerOptions("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges,
                                                    legacy=True))
    assert split(tok, ["a\u0558"]) == [[tok.vocab_size - 2]]  # the id of "aÕĺ"


@pytest.mark.parametrize("merges, extra, message", [
    (["Ġ t", "t h", "Ġt h"], ["Ġt", "th", "Ġth"], None),
    (["Ġt h", "Ġ t"], ["Ġt", "Ġth"], r"'Ġt' is used by a merge ranked before the one that makes it"),
    (["Ġ t"], [], r"merge 2 makes 'Ġt', which the vocab file lacks"),
])
def test_gpt2_merge_files_out_of_training_order_are_refused(tmp_path: Path, merges, extra, message) -> None:
    vocab, merges_file = write_gpt2_files(tmp_path, merges, extra)
    options = TokenizerOptions("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges_file, legacy=True)
    if message is None:  # a trainer's order: " th" ends as the single token "Ġth" (id 258)
        assert split(build_document_tokenizer(options), [" th"]) == [[258]]
        return
    with pytest.raises(DataError, match=message):
        build_document_tokenizer(options)


@pytest.mark.parametrize("options, message", [
    (TokenizerOptions("TikTokenizer", "x"), r"--tokenizer-type TikTokenizer: not supported here \(supported: "),
    (TokenizerOptions("SentencePieceTokenizer"), r"needs --tokenizer-model"),
    (TokenizerOptions("Llama2Tokenizer", "/nope.model"), r"--tokenizer-model /nope\.model: no such SentencePiece"),
    (TokenizerOptions("GPT2BPETokenizer", legacy=True), r"needs --vocab-file and --merge-file"),
    (TokenizerOptions("NullTokenizer", vocab_size=0), r"needs --vocab-size \(a positive number\)"),
])
def test_what_cannot_be_built_says_why(options: TokenizerOptions, message: str) -> None:
    with pytest.raises(DataError, match=message):
        build_document_tokenizer(options)
