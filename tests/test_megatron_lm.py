"""Byte identity with Megatron-LM's own tools/preprocess_data.py, run as a subprocess on the
same documents with the same flags, over every tokenizer kind it accepts offline; and checkpoints
both ways: what Megatron-LM's save_checkpoint writes (torch, torch_dist, torch_dcp) imports with
its logits, and Megatron-LM's load_checkpoint reads our exports with ours
(tests/megatron_lm_driver.py drives its checkpointing on one CPU process).

Opt-in, because it needs a Megatron-LM checkout (branch core_r0.16.0):

    MEGATRON_LM_DIR=/path/to/Megatron-LM python -m pytest -q tests/test_megatron_lm.py

MEGATRON_LM_PYTHON names the interpreter that runs it (default: this one); it needs torch,
megatron-core's dependencies and `six regex pyyaml pydantic`. The tool is run from a temporary
directory with the checkout first on PYTHONPATH; nothing of it is imported here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizer_zoo import LONE_SURROGATE, corpus_rows, write_jsonl, write_punkt_model, zoo  # noqa: F401
from tool_modules import load_tool

MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
MEGATRON_LM_PYTHON = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
pytestmark = pytest.mark.skipif(
    not MEGATRON_LM_DIR, reason="set MEGATRON_LM_DIR to a Megatron-LM checkout (core_r0.16.0) to compare "
                                "with its tools/preprocess_data.py")


@pytest.fixture(scope="module")
def megatron_lm() -> Path:
    root = Path(MEGATRON_LM_DIR)
    if not (root / "tools" / "preprocess_data.py").is_file():
        pytest.fail(f"MEGATRON_LM_DIR={root}: no tools/preprocess_data.py there")
    probe = subprocess.run([MEGATRON_LM_PYTHON, "-c", "import six, regex, yaml, pydantic, torch"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.fail(f"{MEGATRON_LM_PYTHON} cannot run Megatron-LM's tool: {probe.stderr.strip().splitlines()[-1]} "
                    "(pip install six regex pyyaml pydantic torch there, or set MEGATRON_LM_PYTHON)")
    return root


def run_megatron(root: Path, cwd: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([MEGATRON_LM_PYTHON, str(root / "tools" / "preprocess_data.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def flags(zoo, case: str) -> list[str]:
    """The tokenizer flags of each case, by name."""
    sp = {"default": zoo.sp_default, "llama": zoo.sp_llama, "own": zoo.sp_own}
    kind, _, rest = case.partition(":")
    legacy = ["--legacy-tokenizer"] if rest.endswith("legacy") else []
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        return ["--tokenizer-type", kind, "--tokenizer-model", str(sp[rest.split("-")[0]]), *legacy]
    if kind == "HuggingFaceTokenizer":
        folder = zoo.hf_own if rest.startswith("own") else zoo.hf_gpt2
        return ["--tokenizer-type", kind, "--tokenizer-model", str(folder), *legacy]
    if kind == "GPT2BPETokenizer":
        return ["--tokenizer-type", kind, "--vocab-file", str(zoo.gpt2_vocab), "--merge-file", str(zoo.gpt2_merges),
                "--legacy-tokenizer"]
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", "5000"]


CASES = [  # tokenizer case, workers, other flags
    ("SentencePieceTokenizer:default", 2, []),
    ("SentencePieceTokenizer:default", 1, []),
    ("SentencePieceTokenizer:llama", 2, []),
    ("SentencePieceTokenizer:llama", 2, ["--partitions", "2"]),
    ("SentencePieceTokenizer:own", 2, ["--partitions", "2", "--keep-sequential-samples"]),
    ("SentencePieceTokenizer:own", 1, []),
    ("SentencePieceTokenizer:llama-legacy", 2, []),
    ("SentencePieceTokenizer:own-legacy", 2, []),
    ("GPTSentencePieceTokenizer:default-legacy", 2, []),
    ("Llama2Tokenizer:llama-legacy", 2, []),
    ("Llama2Tokenizer:default", 2, []),
    ("HuggingFaceTokenizer:own", 2, []),
    ("HuggingFaceTokenizer:gpt2", 2, []),
    ("HuggingFaceTokenizer:gpt2-legacy", 2, []),
    ("GPT2BPETokenizer:legacy", 2, []),
    ("NullTokenizer", 2, []),
]


@pytest.mark.parametrize("case, workers, extra", CASES, ids=[f"{c}-w{w}{''.join(e)}" for c, w, e in CASES])
def test_same_bytes_as_megatron_lm(megatron_lm, zoo, tiny_corpus, tmp_path: Path, case: str, workers: int,
                                   extra: list[str]) -> None:
    if case == "NullTokenizer":
        rows = [{"text": " ".join(str((7 * i + j) % 5000) for j in range(i % 50 + 1))} for i in range(300)]
    else:
        rows = corpus_rows(tiny_corpus)
    (tmp_path / "mlm").mkdir()
    jsonl = write_jsonl(tmp_path / "mlm" / "docs.jsonl", rows)
    assert_same_bytes(megatron_lm, tmp_path, ["--input", str(jsonl), "--json-keys", "text", "--append-eod",
                                              "--workers", str(workers), *flags(zoo, case), *extra])


def assert_same_bytes(megatron_lm: Path, tmp_path: Path, argv: list[str], level: str = "document",
                      megatron_runs: int = 1) -> None:
    """Run Megatron-LM's tool (in tmp_path/mlm, next to the input) and ours with the same flags;
    their `<prefix>_text_<level>.bin/.idx` must be equal."""
    for _ in range(megatron_runs):
        done = run_megatron(megatron_lm, tmp_path / "mlm", [*argv, "--output-prefix", str(tmp_path / "mlm" / "out")])
    theirs = tmp_path / "mlm" / f"out_text_{level}"
    assert Path(f"{theirs}.idx").exists(), f"Megatron-LM's tool failed:\n{done.stderr[-3000:]}"
    assert load_tool("preprocess_data").main([*argv, "--output-prefix", str(tmp_path / "ours"), "--quiet"]) == 0
    for ext in ("bin", "idx"):
        assert Path(f"{tmp_path}/ours_text_{level}.{ext}").read_bytes() == Path(f"{theirs}.{ext}").read_bytes(), ext


def test_lone_surrogate_stops_both(megatron_lm, zoo, tiny_corpus, tmp_path: Path, capsys) -> None:
    """Megatron-LM's tool crashes on it and writes no .idx; ours says which line, and writes nothing."""
    rows = corpus_rows(tiny_corpus, 5)
    rows.insert(7, {"text": LONE_SURROGATE})
    jsonl = write_jsonl(tmp_path / "docs.jsonl", rows)
    argv = ["--input", str(jsonl), "--append-eod", "--workers", "2", *flags(zoo, "SentencePieceTokenizer:llama")]
    done = run_megatron(megatron_lm, tmp_path, [*argv, "--output-prefix", str(tmp_path / "mlm")])
    assert not Path(f"{tmp_path}/mlm_text_document.idx").exists() and "Error" in done.stderr
    assert load_tool("preprocess_data").main([*argv, "--output-prefix", str(tmp_path / "ours"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{jsonl}:8: key 'text' holds a lone surrogate (U+D800" in err
    assert not list(tmp_path.glob("ours*"))


@pytest.mark.parametrize("extra", [["--partitions", "2"], ["--keep-newlines"]])
def test_split_sentences_same_bytes(megatron_lm, zoo, tiny_corpus, tmp_path: Path, monkeypatch, extra) -> None:
    """--split-sentences with a punkt model trained here. Megatron-LM loads punkt pickles, which
    NLTK 3.9 and later refuse, so both interpreters need NLTK < 3.9. With one partition its tool
    only writes the split sentences on a first run and encodes them on a second."""
    nltk = pytest.importorskip("nltk")
    if hasattr(nltk.tokenize.punkt, "PunktTokenizer"):
        pytest.skip("needs NLTK < 3.9 here (Megatron-LM's tool loads punkt pickles, which later NLTK refuses)")
    monkeypatch.setenv("NLTK_DATA", str(write_punkt_model(tiny_corpus, tmp_path / "nltk_data")))
    (tmp_path / "mlm").mkdir()
    rows = [r for r in corpus_rows(tiny_corpus) if isinstance(r["text"], str)]
    jsonl = write_jsonl(tmp_path / "mlm" / "docs.jsonl", rows)
    argv = ["--input", str(jsonl), "--append-eod", "--workers", "2", "--split-sentences",
            *flags(zoo, "SentencePieceTokenizer:llama"), *extra]
    assert_same_bytes(megatron_lm, tmp_path, argv, level="sentence", megatron_runs=1 if "--partitions" in extra else 2)


# ------------------------------------------------------------------------- checkpoints, both ways

DRIVER = Path(__file__).resolve().parent / "megatron_lm_driver.py"
# Megatron-LM flags of a small Llama-style GPT on CPU: no fused kernels, no dropout, fp32
RUN_FLAGS = ["--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "10",
             "--lr", "1e-4", "--save-interval", "5", "--transformer-impl", "local", "--use-cpu-initialization",
             "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
             "--no-gradient-accumulation-fusion", "--tokenizer-type", "GPTSentencePieceTokenizer"]
MODEL_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
               "--group-query-attention", "--num-query-groups", "2", "--max-position-embeddings", "64",
               "--position-embedding-type", "rope", "--rotary-base", "5000", "--normalization", "RMSNorm", "--swiglu",
               "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
               "--hidden-dropout", "0", "--init-method-std", "0.1", "--make-vocab-size-divisible-by", "96"]


def run_driver(root: Path, cwd: Path, mode: str, flags: list[str], env: dict | None = None) -> torch.Tensor:
    """Megatron-LM's save_checkpoint or load_checkpoint through tests/megatron_lm_driver.py; its logits."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    done = subprocess.run([MEGATRON_LM_PYTHON, str(DRIVER), mode, "logits.pt", "tokens.pt", "--", *flags], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"Megatron-LM's {mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "load_return" not in done.stdout, "Megatron-LM fell back to a non-strict load:\n" + done.stdout[-3000:]
    return torch.load(cwd / "logits.pt")


def our_logits(run: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_code.training.weights import load_model

    model, _ = load_model(run)
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module")
def saved_by_megatron_lm(megatron_lm, tiny_corpus, tmp_path_factory):
    """A save folder per format written by Megatron-LM's own save_checkpoint, and its logits.
    Megatron-LM validates --ckpt-format torch_dcp only with --use-torch-fsdp2, whose wrapper needs
    CUDA: the driver switches the format after validation, so save_checkpoint's own torch_dcp
    branch writes the unwrapped model, the full tensors FSDP2 saves at tensor-parallel size 1."""
    work = tmp_path_factory.mktemp("megatron_lm_saves")
    tokens = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, work / "tokens.pt")
    logits = {}
    for fmt in ("torch", "torch_dist", "torch_dcp"):
        flags = [*RUN_FLAGS, *MODEL_FLAGS, "--tokenizer-model", str(tiny_corpus.tokenizer), "--save", str(work / fmt),
                 "--ckpt-format", "torch" if fmt == "torch_dcp" else fmt, "--no-save-optim"]
        logits[fmt] = run_driver(megatron_lm, work, "save", flags, {"DRIVER_CKPT_FORMAT": "torch_dcp"} if fmt == "torch_dcp" else {})
    return work, tokens, logits


@pytest.mark.parametrize("fmt", ["torch", "torch_dist", "torch_dcp"])
def test_import_of_megatron_lm_save_checkpoint(saved_by_megatron_lm, convert_tool, fmt, tmp_path, capsys):
    """No --tokenizer: the run's own --tokenizer-model is taken."""
    work, tokens, logits = saved_by_megatron_lm
    assert convert_tool.main(["import", "--megatron-lm", str(work / fmt), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert f"({fmt}, iteration 5, tensor 1 x pipeline 1, float32)" in printed and "32 tokens: identical" in printed
    assert (our_logits(tmp_path / "run", tokens) - logits[fmt]).abs().max() <= 1e-4


def test_megatron_lm_loads_our_export(saved_by_megatron_lm, megatron_lm, convert_tool, tiny_corpus, tmp_path):
    """Megatron-LM's load_checkpoint (strict) reads our legacy and torch_dist exports with our
    logits, and with --use-checkpoint-args rebuilds the model from the args the export records."""
    work, tokens, _ = saved_by_megatron_lm
    convert = convert_tool
    assert convert.main(["import", "--megatron-lm", str(work / "torch"), "--out", str(tmp_path / "run"),
                         "--no-verify"]) == 0
    ours = our_logits(tmp_path / "run", tokens)
    torch.save(tokens, tmp_path / "tokens.pt")
    load_flags = [*RUN_FLAGS, "--tokenizer-model", str(tiny_corpus.tokenizer), "--no-load-optim", "--no-load-rng",
                  "--make-vocab-size-divisible-by", "96"]
    for fmt in ("torch", "torch_dist"):
        out = tmp_path / f"back_{fmt}"
        assert convert.main(["export", "--format", "megatron-lm", "--load", str(tmp_path / "run"), "--out", str(out),
                             "--ckpt-format", fmt, "--transformer-impl", "local"]) == 0
        logits = run_driver(megatron_lm, tmp_path, "load", [*load_flags, *MODEL_FLAGS, "--load", str(out)])
        assert (logits - ours).abs().max() <= 1e-4, fmt
    logits = run_driver(megatron_lm, tmp_path, "load", [*load_flags, "--load", str(tmp_path / "back_torch"),
                                                        "--use-checkpoint-args"])
    assert (logits - ours).abs().max() <= 1e-4
