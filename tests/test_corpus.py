"""prepare_corpus: built-in sources, determinism, dedup, caps, source kinds and their errors."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from megatron_code.data.corpus import (parse_source, prepare_builtin_corpus, prepare_corpus)
from megatron_code.data.errors import DataError
from tool_modules import load_tool


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_builtin_corpus_is_deterministic_capped_and_clean(tiny_corpus, tmp_path: Path) -> None:
    again = prepare_builtin_corpus(tmp_path / "again", max_bytes_per_source=256_000, progress=False)
    assert again["text"].read_bytes() == tiny_corpus.text.read_bytes()
    assert again["code"].read_bytes() == tiny_corpus.code.read_bytes()
    other = prepare_builtin_corpus(tmp_path / "other", seed=7, max_bytes_per_source=256_000, progress=False)
    assert other["code"].read_bytes() != tiny_corpus.code.read_bytes()

    code, text = read(tiny_corpus.code), read(tiny_corpus.text)
    assert 0 < tiny_corpus.code.stat().st_size <= 256_000 and 0 < tiny_corpus.text.stat().st_size <= 256_000
    assert all(d["source"] == "code" and d["path"].endswith(".py") and d["lang"] == "python" for d in code)
    assert not any(part in ("test", "tests", "site-packages") for d in code for part in d["path"].split("/"))
    assert all(d["source"] == "text" and d["id"] and d["text"].strip() for d in text)
    for docs in (code, text):
        assert len({d["text"] for d in docs}) == len(docs)


def test_rerun_with_same_parameters_is_skipped(tmp_path: Path, capsys) -> None:
    first = prepare_builtin_corpus(tmp_path, max_bytes_per_source=50_000)
    stamps = {name: path.stat().st_mtime_ns for name, path in first.items()}
    capsys.readouterr()
    prepare_builtin_corpus(tmp_path, max_bytes_per_source=50_000)
    assert "up to date" in capsys.readouterr().err
    assert {name: path.stat().st_mtime_ns for name, path in first.items()} == stamps
    prepare_builtin_corpus(tmp_path, max_bytes_per_source=60_000, progress=False)
    assert first["code"].stat().st_mtime_ns != stamps["code"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["code"]["params"]["max_bytes"] == 60_000 and manifest["code"]["bytes"] <= 60_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_directory_source_dedups_and_skips_binary_and_excluded(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg" / "tests").mkdir(parents=True)
    (repo / "node_modules").mkdir()
    (repo / "a.py").write_text("print('a')\n")
    (repo / "pkg" / "b.py").write_text("print('a')\n")  # same text as a.py: dropped
    (repo / "pkg" / "c.py").write_text("def c():\n\treturn 1\n")
    (repo / "pkg" / "tests" / "test_c.py").write_text("assert True\n")
    (repo / "node_modules" / "x.py").write_text("ignored = 1\n")
    (repo / "blob.py").write_bytes(b"\xff\xfe\x00binary")
    (repo / "notes.md").write_text("not matched\n")
    spec = parse_source(f"code=dir:{repo}?glob=*.py&exclude=tests")
    out = prepare_corpus([spec], tmp_path / "out", progress=False)["code"]
    docs = read(out)
    assert sorted(d["text"] for d in docs) == ["def c():\n\treturn 1\n", "print('a')\n"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["code"]
    assert (manifest["documents"], manifest["duplicates"], manifest["skipped"]) == (2, 1, 1)


def test_jsonl_source_plain_and_gz(tmp_path: Path) -> None:
    rows = [{"content": f"document {i}", "meta": i} for i in range(20)] + [{"content": "document 3"}]
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    out = prepare_corpus([parse_source(f"web=jsonl:{gz}?key=content")], tmp_path / "out", progress=False)["web"]
    docs = read(out)
    assert sorted(d["text"] for d in docs) == sorted(f"document {i}" for i in range(20))
    assert all(d["source"] == "web" and d["id"].startswith("in.jsonl.gz:") for d in docs)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing key 'content'"):
        prepare_corpus([parse_source(f"web=jsonl:{bad}?key=content")], tmp_path / "out2", progress=False)


def test_hf_source_without_datasets_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when it is not installed
    with pytest.raises(DataError, match=r"source 'wiki': .*need the `datasets` package"):
        prepare_corpus([parse_source("wiki=hf:wikitext?config=wikitext-2-raw-v1")], tmp_path, progress=False)


@pytest.mark.parametrize("spec, message", [
    ("code", "expected NAME=KIND:LOCATION"),
    ("code=ftp:/x", "unknown kind 'ftp'"),
    ("code=dir:/x?colour=red", r"unknown option\(s\) colour for dir"),
    ("code=stdlib:docs", "stdlib:code or stdlib:text"),
    ("a b=dir:/x", "the name may use only"),
])
def test_bad_source_specs(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_source(spec)


def test_missing_directory_and_empty_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: not a directory \(source 'code'\)"):
        prepare_corpus([parse_source(f"code=dir:{tmp_path / 'nowhere'}")], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="produced no documents"):
        prepare_corpus([parse_source(f"code=dir:{tmp_path / 'empty'}")], tmp_path / "out", progress=False)


def test_cli(tmp_path: Path, capsys) -> None:
    cli = load_tool("prepare_corpus")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    assert cli.main(["--out-dir", str(tmp_path / "out"), "--source", f"code=dir:{tmp_path / 'src'}?glob=*.py",
                     "--max-bytes-per-source", "1M", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"code\t{tmp_path / 'out' / 'code.jsonl'}"
    assert cli.parse_size("4MiB") == 4 << 20 and cli.parse_size("0") is None
    assert cli.main(["--out-dir", str(tmp_path / "out"), "--source", "oops"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
