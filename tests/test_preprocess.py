"""preprocess: Megatron's .bin/.idx format, byte identity with Megatron-LM's algorithm, errors."""
from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from megatron_code.data.errors import DataError
from megatron_code.data.preprocess import (IndexedWriter, check_dataset_matches_tokenizer, dataset_prefix,
                                           preprocess, read_indexed)
from megatron_code.data.tokenizer import load_tokenizer

with warnings.catch_warnings():  # megatron-core warns about Transformer Engine / apex on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_data = load_tool("preprocess_data")


def megatron_reference(jsonl: Path, prefix: Path, model: Path, keys=("text",), append_eod=True) -> None:
    """An independent reference written from Megatron-LM's tools/preprocess_data.py: one
    document per line, SentencePiece ids per sentence, EOD after the last non-empty one, fed
    document by document to megatron-core's own builder."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    builders = {k: IndexedDatasetBuilder(f"{prefix}_{k}_document.bin", dtype=DType.optimal_dtype(sp.get_piece_size()))
                for k in keys}
    for line in open(jsonl, encoding="utf-8"):
        data = json.loads(line)
        for key in keys:
            sentences = data[key] if isinstance(data[key], list) else [data[key]]
            ids, lengths = [], []
            for sentence in sentences:
                sentence_ids = sp.encode_as_ids(sentence)
                if sentence_ids:
                    ids += sentence_ids
                    lengths.append(len(sentence_ids))
            if ids and append_eod:
                ids.append(sp.eos_id())
                lengths[-1] += 1
            builders[key].add_document(ids, lengths)
    for key, builder in builders.items():
        builder.finalize(f"{prefix}_{key}_document.idx")


def same_files(a: Path | str, b: Path | str) -> bool:
    return all(Path(f"{a}.{ext}").read_bytes() == Path(f"{b}.{ext}").read_bytes() for ext in ("bin", "idx"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


TRICKY = [
    {"text": "def f(x):\n\tif x:\n        return  x\n\n\n", "other": "b"},
    {"text": "", "other": "empty text is a document with no sequence"},
    {"text": "unicode: héllo, 日本語, 😀, ▁ and a NUL \x00 inside", "other": ""},
    {"text": ["pre-split ", "", "sentences", ""], "other": "list values are sentences"},
    {"text": [], "other": "an empty list"},
    {"text": "   leading and trailing spaces   ", "other": "x"},
]


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


@pytest.mark.parametrize("source", ["text", "code"])
def test_byte_identical_to_megatron_and_readable_by_megatron_core(tiny_corpus, tmp_path: Path, source: str) -> None:
    jsonl = getattr(tiny_corpus, source)
    megatron_reference(jsonl, tmp_path / "ref", tiny_corpus.tokenizer)
    summary = preprocess(jsonl, tmp_path / "ours", tiny_corpus.tokenizer, workers=2, chunk_bytes=20_000,
                         progress=False)
    ours = summary["outputs"]["text"]
    assert ours == dataset_prefix(tmp_path / "ours", "text")
    assert same_files(ours, tmp_path / "ref_text_document")

    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    texts = [json.loads(line)["text"] for line in open(jsonl, encoding="utf-8")]
    dataset = IndexedDataset(str(ours))
    assert len(dataset) == len(texts) == summary["documents"]
    for i in (0, len(texts) // 2, len(texts) - 1):
        assert dataset[i].tolist() == tokenizer.encode(texts[i]) + [tokenizer.eod_id]
    check_dataset_matches_tokenizer(ours, tokenizer)


@pytest.mark.parametrize("append_eod", [True, False])
def test_edge_cases_match_megatron(tiny_corpus, tmp_path: Path, append_eod: bool) -> None:
    """Empty documents, sentence lists with empty sentences, unicode and NUL, two JSON keys."""
    jsonl = write_jsonl(tmp_path / "tricky.jsonl", TRICKY * 3)
    megatron_reference(jsonl, tmp_path / "ref", tiny_corpus.tokenizer, keys=("text", "other"), append_eod=append_eod)
    summary = preprocess(jsonl, tmp_path / "ours", tiny_corpus.tokenizer, json_keys=("text", "other"),
                         append_eod=append_eod, workers=2, chunk_bytes=300, progress=False)
    for key in ("text", "other"):
        assert same_files(summary["outputs"][key], tmp_path / f"ref_{key}_document")
    data = read_indexed(summary["outputs"]["text"])
    assert len(data) == len(TRICKY) * 3
    assert len(data.document(1)) == 0 and len(data.document(4)) == 0


def test_gzip_and_hf_tokenizer_give_the_same_bytes(tiny_corpus, tmp_path: Path) -> None:
    plain = preprocess(tiny_corpus.text, tmp_path / "plain", tiny_corpus.tokenizer, progress=False)
    gz = tmp_path / "text.jsonl.gz"
    gz.write_bytes(gzip.compress(tiny_corpus.text.read_bytes()))
    zipped = preprocess(gz, tmp_path / "gz", tiny_corpus.tokenizer, progress=False)
    hf = preprocess(tiny_corpus.text, tmp_path / "hf", tiny_corpus.hf_tokenizer, progress=False)
    assert same_files(plain["outputs"]["text"], zipped["outputs"]["text"])
    assert same_files(plain["outputs"]["text"], hf["outputs"]["text"])


def test_reads_files_written_by_megatron_core(tiny_corpus, tmp_path: Path) -> None:
    documents = [[5, 6, 7], [], [8], list(range(100, 400))]
    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for doc in documents:
        builder.add_document(doc, [len(doc)] if doc else [])
    builder.finalize(str(tmp_path / "mc.idx"))
    data = read_indexed(tmp_path / "mc")
    assert [data.document(i).tolist() for i in range(len(data))] == documents
    check_dataset_matches_tokenizer(tmp_path / "mc", load_tokenizer(tiny_corpus.tokenizer))  # ids < 1024


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
    ([], r"bad\.jsonl: no documents"),
])
def test_bad_input_names_file_and_line(tiny_corpus, tmp_path: Path, rows, message: str, workers: int) -> None:
    jsonl = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        preprocess(jsonl, tmp_path / "out", tiny_corpus.tokenizer, workers=workers, progress=False)
    assert not list(tmp_path.glob("out*")), "a failed run leaves no output or temporary files"


def test_missing_input_and_tokenizer(tiny_corpus, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        preprocess(tmp_path / "nope.jsonl", tmp_path / "out", tiny_corpus.tokenizer, progress=False)
    jsonl = write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"missing\.model: no such tokenizer"):
        preprocess(jsonl, tmp_path / "out", tmp_path / "missing.model", progress=False)


def test_ids_that_do_not_fit_name_the_line(tiny_corpus, tmp_path: Path, monkeypatch) -> None:
    from megatron_code.data import tokenizer as tokenizer_module

    jsonl = write_jsonl(tmp_path / "big.jsonl", [{"text": ""}, {"text": "a rather long line of prose"}])
    monkeypatch.setattr(tokenizer_module.SentencePieceTokenizer, "vocab_size", property(lambda self: 300))
    with pytest.raises(DataError, match=r"big\.jsonl:2: token id \d+ does not fit: .* has ids 0 .. 299 .* uint16"):
        preprocess(jsonl, tmp_path / "out", tiny_corpus.tokenizer, progress=False)


class _OtherTokenizer:
    path, vocab_size, fingerprint = "other.model", 100, "0" * 64


def test_dataset_tokenizer_mismatch(tiny_corpus, tmp_path: Path) -> None:
    summary = preprocess(tiny_corpus.code, tmp_path / "code", tiny_corpus.tokenizer, progress=False)
    prefix = summary["outputs"]["text"]
    check_dataset_matches_tokenizer(prefix, load_tokenizer(tiny_corpus.hf_tokenizer))  # same vocabulary
    with pytest.raises(DataError, match=r"tokenized with .*spm\.model \(vocab 1,024\) but the tokenizer is other"):
        check_dataset_matches_tokenizer(prefix, _OtherTokenizer())
    Path(f"{prefix}.meta.json").unlink()  # as from Megatron-LM: the id scan decides
    with pytest.raises(DataError, match=r"code_text_document\.bin: holds token id \d+ but .* has only 100 ids"):
        check_dataset_matches_tokenizer(prefix, _OtherTokenizer())
    Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"\.bin: \d+ bytes but .*\.idx describes"):
        check_dataset_matches_tokenizer(prefix, load_tokenizer(tiny_corpus.tokenizer))


def test_cli_takes_megatron_flags(tiny_corpus, tmp_path: Path, capsys) -> None:
    argv = ["--input", str(tiny_corpus.text), "--output-prefix", str(tmp_path / "cli"), "--json-keys", "text",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tiny_corpus.tokenizer),
            "--append-eod", "--workers", "2", "--partitions", "1", "--log-interval", "100", "--dataset-impl", "mmap",
            "--vocab-file", "unused", "--merge-file", "unused"]
    assert preprocess_data.main(argv) == 0
    assert "documents" in capsys.readouterr().err
    megatron_reference(tiny_corpus.text, tmp_path / "ref", tiny_corpus.tokenizer)
    assert same_files(tmp_path / "cli_text_document", tmp_path / "ref_text_document")


def test_cli_error_is_one_line(tiny_corpus, tmp_path: Path, capsys) -> None:
    jsonl = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "{oops"])
    argv = ["--input", str(jsonl), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model",
            str(tiny_corpus.tokenizer), "--workers", "1", "--quiet"]
    assert preprocess_data.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{jsonl}:2: invalid JSON" in err
