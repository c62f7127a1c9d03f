"""preprocess: Megatron's .bin/.idx format, byte identity with a reference built on megatron-core's
own tokenizer classes and IndexedDatasetBuilder, partitions, errors, and the start-up check.
(tests/test_megatron_lm.py compares with Megatron-LM's tool itself when a checkout is given.)"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import struct
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import sentencepiece as spm
from tokenizer_zoo import LONE_SURROGATE, corpus_rows, write_jsonl, write_punkt_model, zoo  # noqa: F401

from megatron_code.data.errors import DataError
from megatron_code.data.megatron_tokenizers import TokenizerOptions, build_document_tokenizer
from megatron_code.data.preprocess import (IndexedWriter, check_dataset_matches_tokenizer, dataset_prefix,
                                           preprocess, read_indexed)
from megatron_code.data.tokenizer import NO_PAD, load_tokenizer
from tool_modules import load_tool

with warnings.catch_warnings():  # megatron-core warns about Transformer Engine / apex on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
    from megatron.core.tokenizers import MegatronTokenizer
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer


preprocess_data = load_tool("preprocess_data")


class Reference(NamedTuple):
    tokenize: object
    eod: int
    vocab_size: int


def megatron_core_args(**kw) -> argparse.Namespace:
    """The tokenizer flags of Megatron-LM's tool, at their defaults."""
    defaults = dict(tokenizer_type=None, tokenizer_model=None, vocab_file=None, merge_file=None, vocab_size=None,
                    tokenizer_special_tokens=None, tokenizer_metadata=None, tokenizer_sentencepiece_legacy=False,
                    tokenizer_hf_use_fast=False, tokenizer_hf_include_special_tokens=False, trust_remote_code=False)
    return argparse.Namespace(**{**defaults, **kw})


def reference_tokenizer(zoo, case: str) -> Reference:
    """The tokenizer of each case built by megatron-core's own classes: its build_tokenizer for
    what Megatron-LM builds by default; its SentencePiece class in legacy mode (no separator
    trimming) with the legacy wrapper's special tokens; transformers' GPT-2 tokenizer (kept
    from splitting special strings) where megatron-core has no offline class."""
    models = {"default": zoo.sp_default, "llama": zoo.sp_llama, "own": zoo.sp_own}
    kind, _, model = case.partition(":")
    if kind == "legacy-sp":
        sp = spm.SentencePieceProcessor(model_file=str(models[model]))
        piece = [sp.id_to_piece(i) if i >= 0 else d for i, d in ((sp.pad_id(), "<PAD>"), (sp.bos_id(), "<BOS>"),
                                                                   (sp.eos_id(), "<EOS>"))]
        tok = MegatronTokenizer.from_pretrained(
            str(models[model]), metadata_path={"library": "sentencepiece"}, legacy=True,
            special_tokens=["<CLS>", "<SEP>", "<EOD>", "<MASK>", *piece], trim_spm_separator_after_special_token=False)
        return Reference(tok.tokenize, tok._tokenizer.token_to_id("<EOD>"), tok.vocab_size)
    if kind == "legacy-llama2":
        tok = build_tokenizer(megatron_core_args(tokenizer_type="Llama2Tokenizer", tokenizer_model=str(models[model])))
        return Reference(lambda text: [tok.bos] + tok.tokenize(text), tok.eod, tok.vocab_size)
    if kind == "legacy-gpt2":
        return gpt2_reference(zoo)
    if kind == "NullTokenizer":
        tok = build_tokenizer(megatron_core_args(tokenizer_type=kind, vocab_size=5000))
    elif kind == "HuggingFaceTokenizer":
        tok = build_tokenizer(megatron_core_args(tokenizer_type=kind, tokenizer_model=str(
            zoo.hf_own if model == "own" else zoo.hf_gpt2)))
    else:
        tok = build_tokenizer(megatron_core_args(tokenizer_type=kind, tokenizer_model=str(models[model])))
    return Reference(tok.tokenize, tok.eod, tok.vocab_size)


def gpt2_reference(zoo) -> Reference:
    """GPT-2 as Megatron-LM's legacy tokenizer runs it: words by GPT-2's pattern in Python's
    `regex`, each word's UTF-8 bytes as byte symbols, BPE on each word, here by the model
    transformers' GPT2Tokenizer loads from the vocab.json and merges.txt."""
    import regex
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    gpt2 = GPT2Tokenizer.from_pretrained(zoo.gpt2_vocab.parent)
    words = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def tokenize(text: str) -> list[int]:
        return [t.id for word in words.findall(text) for symbols, _ in to_bytes.pre_tokenize_str(word)
                for t in gpt2.backend_tokenizer.model.tokenize(symbols)]
    return Reference(tokenize, gpt2.convert_tokens_to_ids("<|endoftext|>"), len(gpt2))


def our_options(zoo, case: str) -> TokenizerOptions:
    models = {"default": zoo.sp_default, "llama": zoo.sp_llama, "own": zoo.sp_own}
    kind, _, model = case.partition(":")
    if kind == "legacy-sp":
        return TokenizerOptions("SentencePieceTokenizer", str(models[model]), legacy=True)
    if kind == "legacy-llama2":
        return TokenizerOptions("Llama2Tokenizer", str(models[model]), legacy=True)
    if kind == "legacy-gpt2":
        return TokenizerOptions("GPT2BPETokenizer", vocab_file=str(zoo.gpt2_vocab), merge_file=str(zoo.gpt2_merges),
                                legacy=True)
    if kind == "NullTokenizer":
        return TokenizerOptions(kind, vocab_size=5000)
    if kind == "HuggingFaceTokenizer":
        return TokenizerOptions(kind, str(zoo.hf_own if model == "own" else zoo.hf_gpt2))
    return TokenizerOptions(kind, str(models[model]))


def megatron_reference(jsonl: Path, prefix: Path, ref: Reference, keys=("text",), append_eod=True,
                       partitions: int = 1) -> None:
    """Megatron-LM's preprocessing loop as its tools/preprocess_data.py documents it, written
    for this test: each line is a document; each sentence (the text, or each string of a JSON
    list) is tokenized and kept when not empty; EOD follows the last one; documents go to
    megatron-core's IndexedDatasetBuilder, partitions (line i in partition i mod P) one after
    the other."""
    lines = list(open(jsonl, encoding="utf-8"))
    lines = [line for p in range(partitions) for line in lines[p::partitions]]
    builders = {k: IndexedDatasetBuilder(f"{prefix}_{k}_document.bin", dtype=DType.optimal_dtype(ref.vocab_size))
                for k in keys}
    for line in lines:
        data = json.loads(line)
        for key in keys:
            sentences = data[key] if isinstance(data[key], list) else [data[key]]
            ids, lengths = [], []
            for sentence in sentences:
                if sentence_ids := ref.tokenize(sentence):
                    ids += sentence_ids
                    lengths.append(len(sentence_ids))
            if ids and append_eod:
                ids.append(ref.eod)
                lengths[-1] += 1
            builders[key].add_document(ids, lengths)
    for key, builder in builders.items():
        builder.finalize(f"{prefix}_{key}_document.idx")


def same_files(a: Path | str, b: Path | str) -> bool:
    return all(Path(f"{a}.{ext}").read_bytes() == Path(f"{b}.{ext}").read_bytes() for ext in ("bin", "idx"))


TRICKY = [
    {"text": "def f(x):\n\tif x:\n        return  x\n\n\n", "other": "b"},
    {"text": "", "other": "empty text is a document with no sequence"},
    {"text": "unicode: héllo, 日本語, 😀, ▁ and a NUL \x00 inside", "other": ""},
    {"text": ["pre-split ", "", "sentences", ""], "other": "list values are sentences"},
    {"text": [], "other": "an empty list"},
    {"text": "   leading and trailing spaces   ", "other": "x"},
]
CASES = ["SentencePieceTokenizer:default", "SentencePieceTokenizer:llama", "GPTSentencePieceTokenizer:own",
         "Llama2Tokenizer:llama", "legacy-sp:llama", "legacy-sp:own", "legacy-llama2:default",
         "HuggingFaceTokenizer:own", "HuggingFaceTokenizer:gpt2", "legacy-gpt2", "NullTokenizer"]


def null_rows() -> list[dict]:
    return [{"text": " ".join(str((7 * i + j) % 5000) for j in range(i % 50 + 1))} for i in range(300)]


@pytest.mark.parametrize("case", CASES)
def test_same_bytes_as_megatron_core_reference(zoo, tiny_corpus, tmp_path: Path, case: str) -> None:
    """Every tokenizer kind on text, code and hard documents (special-token strings, NUL, CRLF,
    tabs, whitespace runs, CJK, emoji, sentence lists), 2 workers, many chunks."""
    jsonl = write_jsonl(tmp_path / "docs.jsonl", null_rows() if case == "NullTokenizer" else corpus_rows(tiny_corpus))
    megatron_reference(jsonl, tmp_path / "ref", reference_tokenizer(zoo, case))
    tokenizer = build_document_tokenizer(our_options(zoo, case))
    summary = preprocess(jsonl, tmp_path / "ours", tokenizer, workers=2, chunk_bytes=20_000, progress=False)
    assert summary["outputs"]["text"] == dataset_prefix(tmp_path / "ours", "text")
    assert same_files(summary["outputs"]["text"], tmp_path / "ref_text_document")
    assert summary["method"].startswith("batch:" if case != "NullTokenizer" else "plain:")


def test_dummy_prefix_models_keep_their_leading_piece(zoo, tiny_corpus, tmp_path: Path) -> None:
    """Each document encodes alone: with a Llama-style model every one starts with "▁..."."""
    rows = corpus_rows(tiny_corpus, 20)
    jsonl = write_jsonl(tmp_path / "docs.jsonl", rows)
    summary = preprocess(jsonl, tmp_path / "ours", zoo.sp_llama, workers=1, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(zoo.sp_llama))
    dataset = IndexedDataset(str(summary["outputs"]["text"]))
    for i, row in enumerate(rows[:40]):
        assert dataset[i].tolist() == sp.encode(row["text"]) + [sp.eos_id()]
        assert sp.id_to_piece(int(dataset[i][0])).startswith("▁")


@pytest.mark.parametrize("workers", [1, 2])
def test_partitions_order_as_megatron(zoo, tiny_corpus, tmp_path: Path, workers: int) -> None:
    jsonl = write_jsonl(tmp_path / "docs.jsonl", corpus_rows(tiny_corpus, 15))
    ref = reference_tokenizer(zoo, "SentencePieceTokenizer:own")
    megatron_reference(jsonl, tmp_path / "ref", ref, partitions=2)
    summary = preprocess(jsonl, tmp_path / "ours", zoo.sp_own, workers=workers, partitions=2, chunk_bytes=5000,
                         progress=False)
    assert same_files(summary["outputs"]["text"], tmp_path / "ref_text_document")
    argv = ["--input", str(jsonl), "--output-prefix", str(tmp_path / "seq"), "--tokenizer-model", str(zoo.sp_own),
            "--append-eod", "--partitions", "2", "--keep-sequential-samples", "--quiet"]
    assert preprocess_data.main(argv) == 0
    megatron_reference(jsonl, tmp_path / "in_order", ref)
    assert same_files(tmp_path / "seq_text_document", tmp_path / "in_order_text_document")


def test_split_sentences_one_sequence_per_sentence(zoo, tiny_corpus, tmp_path: Path, monkeypatch) -> None:
    """--split-sentences with a punkt model trained here (NLTK < 3.9 loads it as Megatron-LM does):
    `<prefix>_text_sentence` files with one sequence per punkt sentence."""
    nltk = pytest.importorskip("nltk")
    if hasattr(nltk.tokenize.punkt, "PunktTokenizer"):
        pytest.skip("a punkt model can be made offline only for NLTK < 3.9 (later ones refuse pickles)")
    monkeypatch.setenv("NLTK_DATA", str(write_punkt_model(tiny_corpus, tmp_path / "nltk_data")))
    punkt = nltk.load(f"file:{tmp_path}/nltk_data/tokenizers/punkt/english.pickle")
    rows = [{"text": json.loads(line)["text"]} for line in tiny_corpus.text.read_text().splitlines()[:30]]
    write_jsonl(tmp_path / "sentences.jsonl", [{"text": punkt.tokenize(r["text"])} for r in rows])
    own = reference_tokenizer(zoo, "SentencePieceTokenizer:own")
    megatron_reference(tmp_path / "sentences.jsonl", tmp_path / "ref", own)
    argv = ["--input", str(write_jsonl(tmp_path / "docs.jsonl", rows)), "--output-prefix", str(tmp_path / "ours"),
            "--tokenizer-model", str(zoo.sp_own), "--append-eod", "--split-sentences", "--quiet"]
    assert preprocess_data.main(argv) == 0
    assert same_files(tmp_path / "ours_text_sentence", tmp_path / "ref_text_document")
    assert preprocess_data.main([*argv, "--lang", "klingon"]) == 1


def test_golden_index_bytes(tmp_path: Path) -> None:
    """The .idx laid out field by field as in ANCHORS §1, for documents [1 2 3], [], [4 5]."""
    with IndexedWriter(tmp_path / "golden", np.uint16) as writer:
        writer.add_document([1, 2, 3])
        writer.add_document([])
        writer.add_document([4, 5])
        writer.commit()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)  # magic, version, uint16
                + struct.pack("<Q", 2) + struct.pack("<Q", 4)                      # 2 sequences, 3 documents + 1
                + struct.pack("<2i", 3, 2)                                         # sequence lengths
                + struct.pack("<2q", 0, 6)                                         # byte offsets into .bin
                + struct.pack("<4q", 0, 1, 1, 2))                                  # document indices
    assert (tmp_path / "golden.idx").read_bytes() == expected
    assert (tmp_path / "golden.bin").read_bytes() == struct.pack("<5H", 1, 2, 3, 4, 5)
    data = read_indexed(tmp_path / "golden")
    assert [data.document(i).tolist() for i in range(len(data))] == [[1, 2, 3], [], [4, 5]]


def test_readable_by_megatron_core_and_matching_the_tokenizer(tiny_corpus, tmp_path: Path) -> None:
    summary = preprocess(tiny_corpus.code, tmp_path / "ours", tiny_corpus.tokenizer, workers=2, progress=False)
    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    texts = [json.loads(line)["text"] for line in open(tiny_corpus.code, encoding="utf-8")]
    dataset = IndexedDataset(str(summary["outputs"]["text"]))
    assert len(dataset) == len(texts) == summary["documents"]
    for i in (0, len(texts) // 2, len(texts) - 1):
        assert dataset[i].tolist() == tokenizer.encode(texts[i]) + [tokenizer.eod_id]
    check_dataset_matches_tokenizer(summary["outputs"]["text"], tokenizer)


@pytest.mark.parametrize("append_eod", [True, False])
def test_edge_cases_match_megatron(zoo, tmp_path: Path, append_eod: bool) -> None:
    """Empty documents, sentence lists with empty sentences, unicode and NUL, two JSON keys."""
    jsonl = write_jsonl(tmp_path / "tricky.jsonl", TRICKY * 3)
    megatron_reference(jsonl, tmp_path / "ref", reference_tokenizer(zoo, "SentencePieceTokenizer:own"),
                       keys=("text", "other"), append_eod=append_eod)
    summary = preprocess(jsonl, tmp_path / "ours", zoo.sp_own, json_keys=("text", "other"),
                         append_eod=append_eod, workers=2, chunk_bytes=300, progress=False)
    for key in ("text", "other"):
        assert same_files(summary["outputs"][key], tmp_path / f"ref_{key}_document")
    data = read_indexed(summary["outputs"]["text"])
    assert len(data) == len(TRICKY) * 3
    assert len(data.document(1)) == 0 and len(data.document(4)) == 0


def test_gzip_crlf_and_hf_tokenizer_give_the_same_bytes(tiny_corpus, tmp_path: Path) -> None:
    plain = preprocess(tiny_corpus.text, tmp_path / "plain", tiny_corpus.tokenizer, progress=False)
    gz = tmp_path / "text.jsonl.gz"
    gz.write_bytes(gzip.compress(tiny_corpus.text.read_bytes()))
    zipped = preprocess(gz, tmp_path / "gz", tiny_corpus.tokenizer, progress=False)
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(tiny_corpus.text.read_bytes().replace(b"\n", b"\r\n"))
    windows = preprocess(crlf, tmp_path / "crlf", tiny_corpus.tokenizer, progress=False)
    hf = preprocess(tiny_corpus.text, tmp_path / "hf", tiny_corpus.hf_tokenizer, progress=False)
    for other in (zipped, windows, hf):
        assert same_files(plain["outputs"]["text"], other["outputs"]["text"])


def test_reads_files_written_by_megatron_core(tiny_corpus, tmp_path: Path) -> None:
    documents = [[5, 6, 7], [], [8], list(range(100, 400))]
    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for doc in documents:
        builder.add_document(doc, [len(doc)] if doc else [])
    builder.finalize(str(tmp_path / "mc.idx"))
    data = read_indexed(tmp_path / "mc")
    assert [data.document(i).tolist() for i in range(len(data))] == documents


def test_blank_lines_are_skipped_and_line_numbers_kept(tiny_corpus, tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "blank.jsonl", [{"text": "a"}, "", "  ", {"text": "b"}, "{broken"])
    with pytest.raises(DataError, match=r"blank\.jsonl:5: invalid JSON"):
        preprocess(jsonl, tmp_path / "out", tiny_corpus.tokenizer, chunk_bytes=8, progress=False)
    jsonl.write_text(jsonl.read_text().replace("{broken\n", ""))
    assert preprocess(jsonl, tmp_path / "out", tiny_corpus.tokenizer, progress=False)["documents"] == 2


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("rows, message", [
    ([{"text": "ok"}, "{not json", {"text": "ok"}], r"bad\.jsonl:2: invalid JSON: .*column"),
    ([{"text": "ok"}, {"text": "ok"}, {"body": "x", "id": 3}],
     r"bad\.jsonl:3: missing key 'text' \(keys present: 'body', 'id'\)"),
    ([{"text": 7}], r"bad\.jsonl:1: key 'text' holds int"),
    ([[1, 2]], r"bad\.jsonl:1: expected a JSON object, got list"),
    ([{"text": "ok"}] * 3 + [{"text": LONE_SURROGATE}], r"bad\.jsonl:4: key 'text' holds a lone surrogate \(U\+D800 at "
                                                      r"character 27\)"),
    ([{"text": "ok"}, '{"text": "ok\xff"}'], r"bad\.jsonl:2: not valid UTF-8"),
    ([], r"bad\.jsonl: no documents"),
])
def test_bad_input_names_file_and_line(tiny_corpus, tmp_path: Path, rows, message: str, workers: int) -> None:
    jsonl = write_jsonl(tmp_path / "bad.jsonl", rows)
    if any(isinstance(r, str) and "\xff" in r for r in rows):
        jsonl.write_bytes(jsonl.read_bytes().replace("\xff".encode(), b"\xff"))
    with pytest.raises(DataError, match=message):
        preprocess(jsonl, tmp_path / "out", tiny_corpus.tokenizer, workers=workers, progress=False)
    assert not list(tmp_path.glob("out*")), "a failed run leaves no output or temporary files"


@pytest.mark.parametrize("text, message", [
    ("1 2 x", r"ids\.jsonl:2: key 'text': NullTokenizer .* cannot tokenize it \(ValueError: invalid literal"),
    ("1 70000", r"ids\.jsonl:2: token id 70000 does not fit: NullTokenizer .* has ids 0 \.\. 5,000 and the dataset "
                r"dtype is uint16"),
    ("-3", r"ids\.jsonl:2: token id -3 does not fit"),
])
def test_ids_that_do_not_fit_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    jsonl = write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}, {"text": text}])
    with pytest.raises(DataError, match=message):
        null = build_document_tokenizer(TokenizerOptions("NullTokenizer", vocab_size=5000))
        preprocess(jsonl, tmp_path / "out", null, progress=False)
    assert not list(tmp_path.glob("out*"))


class _OtherTokenizer:
    path, vocab_size, fingerprint, eod_id = "other.model", 100, "0" * 64, 2


def test_dataset_tokenizer_mismatch(tiny_corpus, tmp_path: Path) -> None:
    summary = preprocess(tiny_corpus.code, tmp_path / "code", tiny_corpus.tokenizer, progress=False)
    prefix = summary["outputs"]["text"]
    check_dataset_matches_tokenizer(prefix, load_tokenizer(tiny_corpus.hf_tokenizer))  # same vocabulary
    with pytest.raises(DataError, match=r"tokenized with .*spm\.model \(vocab 1,024\) but the tokenizer is other"):
        check_dataset_matches_tokenizer(prefix, _OtherTokenizer())
    meta = Path(f"{prefix}.meta.json")
    made = json.loads(meta.read_text())
    meta.write_text(json.dumps({**made, "tokenizer": {**made["tokenizer"], "eod_id": 1029}}))
    with pytest.raises(DataError, match=r"documents end with id 1029 .* but .*spm\.model ends them with 2"):
        check_dataset_matches_tokenizer(prefix, load_tokenizer(tiny_corpus.tokenizer))
    meta.unlink()  # as from Megatron-LM: the id scan decides
    with pytest.raises(DataError, match=r"code_text_document\.bin: holds token id \d+ but .* has only 100 ids"):
        check_dataset_matches_tokenizer(prefix, _OtherTokenizer())
    Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"\.bin: \d+ bytes but .*\.idx describes"):
        check_dataset_matches_tokenizer(prefix, load_tokenizer(tiny_corpus.tokenizer))


def test_id_scan_is_remembered_until_the_file_changes(tiny_corpus, tmp_path: Path, monkeypatch) -> None:
    """A dataset without our metadata (as Megatron-LM writes it) is scanned once; the answer is
    kept by the .bin's path, size and mtime."""
    monkeypatch.setenv("MEGATRON_CODE_CACHE", str(tmp_path / "cache"))
    prefix = preprocess(tiny_corpus.text, tmp_path / "mlm", tiny_corpus.tokenizer, progress=False)["outputs"]["text"]
    Path(f"{prefix}.meta.json").unlink()
    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    check_dataset_matches_tokenizer(prefix, tokenizer)
    [entry] = (tmp_path / "cache" / "max_token_id").iterdir()
    cached = json.loads(entry.read_text())
    assert cached["max_token_id"] == int(np.fromfile(f"{prefix}.bin", np.uint16).max())
    entry.write_text(json.dumps({**cached, "max_token_id": 5000}))  # the next check believes the cache...
    with pytest.raises(DataError, match="holds token id 5000"):
        check_dataset_matches_tokenizer(prefix, tokenizer)
    Path(f"{prefix}.bin").touch()  # ...until the file changes
    check_dataset_matches_tokenizer(prefix, tokenizer)


def test_hf_tokenizer_without_pad_token_preprocesses_and_trains(zoo, tiny_corpus, tmp_path: Path) -> None:
    """GPT-2 style: an eos and no pad. Training pads with NO_PAD, which megatron-core masks."""
    from megatron_code.config import load_config
    from megatron_code.training.trainer import Trainer

    tokenizer = load_tokenizer(zoo.hf_gpt2)
    assert tokenizer.pad_id == NO_PAD and tokenizer.eod_id == tokenizer.token_to_id("<|endoftext|>")
    argv = ["--input", str(tiny_corpus.text), "--output-prefix", str(tmp_path / "gpt2"), "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", str(zoo.hf_gpt2), "--append-eod", "--quiet"]
    assert preprocess_data.main(argv) == 0
    prefix = tmp_path / "gpt2_text_document"
    config = load_config(None, [
        "--model.preset=tiny", f"--data.sources=[{{name: text, prefix: '{prefix}', weight: 1}}]",
        f"--data.tokenizer={zoo.hf_gpt2}", "--data.seq_length=64", "--data.split=90,10,0",
        "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.steps=2", "--optim.warmup_steps=1",
        "--train.eval_interval=0", "--train.progress=false", f"--train.output_dir={tmp_path / 'run'}",
        "--checkpoint.interval=0"])
    result = Trainer(config).train()
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))


def test_cli_takes_megatron_flags(zoo, tiny_corpus, tmp_path: Path, capsys) -> None:
    argv = ["--input", str(tiny_corpus.text), "--output-prefix", str(tmp_path / "cli"), "--json-keys", "text",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(zoo.sp_own),
            "--append-eod", "--workers", "2", "--partitions", "1", "--log-interval", "20", "--dataset-impl", "mmap",
            "--vocab-file", "unused", "--merge-file", "unused", "--vocab-extra-ids", "3"]
    assert preprocess_data.main(argv) == 0
    err = capsys.readouterr().err
    assert "SentencePieceTokenizer" in err and "(sentencepiece_words)" in err  # the path that ran
    assert len(re.findall(r"processed [\d,]+ documents \([\d,]+ docs/s, [\d.]+ MB/s\)", err)) >= 2  # --log-interval
    assert re.search(r"preprocess: [\d,]+ documents, [\d,]+ tokens", err)  # the summary
    megatron_reference(tiny_corpus.text, tmp_path / "ref", reference_tokenizer(zoo, "SentencePieceTokenizer:own"))
    assert same_files(tmp_path / "cli_text_document", tmp_path / "ref_text_document")


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer-model", "{bad}"], r"^error: .*bad\.jsonl:2: invalid JSON"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json", "--merge-file", "m.txt"],
     r"^error: --tokenizer-type GPT2BPETokenizer: without --legacy-tokenizer Megatron-LM downloads 'gpt2'"),
    (["--tokenizer-type", "NullTokenizer"], r"^error: --tokenizer-type NullTokenizer needs --vocab-size"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "./no/such/folder"],
     r"^error: --tokenizer-model \./no/such/folder: no such folder"),
    (["--tokenizer-model", "{model}", "--split-sentences"],
     r"^error: --split-sentences needs NLTK .* pip install nltk"),
    (["--tokenizer-model", "{model}", "--workers", "0"], r"^error: --workers must be at least 1"),
])
def test_cli_errors_are_one_line(tiny_corpus, tmp_path: Path, capsys, monkeypatch, flags, message) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)  # as where NLTK is not installed
    jsonl = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "{oops"])
    flags = [f.format(bad=tiny_corpus.tokenizer, model=tiny_corpus.tokenizer) for f in flags]
    argv = ["--input", str(jsonl), "--output-prefix", str(tmp_path / "o"), "--workers", "1", "--quiet", *flags]
    assert preprocess_data.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not list(tmp_path.glob("o_*"))
