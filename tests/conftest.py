"""Shared test set-up. Triton kernels run on CPU through the interpreter, which must be switched
on before anything imports triton (kernels are bound to interpreter or compiler at import)."""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tool_modules import load_tool

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass(frozen=True)
class TinyCorpus:
    text: Path
    """JSONL of built-in English prose, about 256 KB."""
    code: Path
    """JSONL of built-in Python code, about 256 KB."""
    tokenizer: Path
    """SentencePiece .model trained on both, vocab 1024."""
    hf_tokenizer: Path
    """Its Hugging Face tokenizer folder."""


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> TinyCorpus:
    """The built-in corpus capped at 256 KB per source plus a 1024-token tokenizer, built once
    per test session (a few seconds)."""
    from megatron_code.data.corpus import prepare_builtin_corpus
    from megatron_code.data.tokenizer import hf_tokenizer_dir, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_corpus")
    corpus = prepare_builtin_corpus(root / "corpus", max_bytes_per_source=256_000, progress=False)
    model = train_tokenizer([corpus["text"], corpus["code"]], root / "tokenizer" / "spm", vocab_size=1024,
                            progress=False)
    return TinyCorpus(corpus["text"], corpus["code"], model, hf_tokenizer_dir(model))


@pytest.fixture(scope="session")
def tiny_indexed(tiny_corpus, tmp_path_factory) -> dict[str, str]:
    """The tiny corpus preprocessed: {"text": prefix, "code": prefix} of Megatron .bin/.idx."""
    from megatron_code.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("indexed")
    return {name: str(preprocess(getattr(tiny_corpus, name), out / name, tiny_corpus.tokenizer,
                                 progress=False)["outputs"]["text"])
            for name in ("text", "code")}


@pytest.fixture(scope="session")
def code_shards(tiny_corpus, tmp_path_factory) -> dict[str, str]:
    """The code corpus as two files: `small` holds its 3 shortest documents (with
    data.split=80,20,0: 2 to train on, 1 to validate), `large` the other 10."""
    from megatron_code.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("shards")
    lines = tiny_corpus.code.read_text().splitlines(True)
    shortest = set(sorted(range(len(lines)), key=lambda i: len(lines[i]))[:3])
    out = {}
    for name, keep in (("large", lambda i: i not in shortest), ("small", lambda i: i in shortest)):
        (root / f"{name}.jsonl").write_text("".join(line for i, line in enumerate(lines) if keep(i)))
        out[name] = str(preprocess(root / f"{name}.jsonl", root / name, tiny_corpus.tokenizer,
                                   progress=False)["outputs"]["text"])
    return out


@pytest.fixture(scope="session")
def train_args(tiny_corpus, tiny_indexed):
    """`train_args(out_dir, *overrides)`: the tiny preset (tied embeddings, GQA) in fp32 on the
    text and code sources, 8 samples of 64 tokens per step, one per micro batch, 5 steps with
    validation at the end; index caches shared by every run under the same parent directory."""
    def make(out_dir, *extra) -> list[str]:
        sources = ", ".join(f"{{name: {n}, prefix: '{p}', weight: {w}}}"
                            for (n, p), w in zip(tiny_indexed.items(), (2, 1)))
        return ["--model.preset=tiny", f"--data.sources=[{sources}]", f"--data.tokenizer={tiny_corpus.tokenizer}",
                "--data.seq_length=64", "--data.split=80,20,0", f"--data.cache_dir={Path(out_dir).parent / 'cache'}",
                "--train.micro_batch_size=1", "--train.global_batch_size=8", "--train.steps=5",
                "--train.eval_interval=5", "--train.eval_batches=2", "--train.progress=false",
                "--optim.warmup_steps=2", "--optim.lr=3e-3", f"--train.output_dir={out_dir}", *extra]
    return make


@pytest.fixture(scope="session")
def eval_task_dir(tmp_path_factory) -> Path:
    """The built-in evaluation task files (arithmetic, logic, python_functions)."""
    from megatron_code.evaluation.tasks import write_builtin_tasks

    out = tmp_path_factory.mktemp("eval_tasks")
    write_builtin_tasks(out)
    return out


@pytest.fixture(scope="session")
def trained_run(train_args, eval_task_dir, tmp_path_factory) -> Path:
    """A run directory: `train_args`' model trained 16 steps of 4 samples with its embedding
    padded past the tokenizer's 1024 tokens to 1100 rows, scoring 50 items of the arithmetic
    task at every validation (steps 8 and 16)."""
    from megatron_code.config import load_config
    from megatron_code.training.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_dir.mkdir()
    arithmetic = run_dir / "arithmetic_50.jsonl"
    arithmetic.write_text("".join((eval_task_dir / "arithmetic.jsonl").read_text().splitlines(True)[:50]))
    Trainer(load_config(None, train_args(
        run_dir, "--model.vocab_size=1100", "--train.steps=16", "--train.micro_batch_size=4",
        "--train.global_batch_size=4", "--train.eval_interval=8", "--train.eval_batches=1",
        f"--train.eval_tasks=[{arithmetic}]"))).train()
    return run_dir


@pytest.fixture(scope="session")
def convert_tool():
    return load_tool("convert_checkpoint")


@pytest.fixture(scope="session")
def evaluate_tool():
    return load_tool("evaluate")


@pytest.fixture(scope="session")
def exported(trained_run, convert_tool, tmp_path_factory) -> Path:
    """`trained_run` exported by tools/convert_checkpoint.py (fp32, one safetensors shard per tensor)."""
    out = tmp_path_factory.mktemp("export") / "hf"
    assert convert_tool.main(["export", "--load", str(trained_run), "--out", str(out), "--shard-mb", "0"]) == 0
    return out
