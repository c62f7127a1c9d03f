"""Shared test set-up. Triton kernels run on CPU through the interpreter, which must be switched
on before anything imports triton (kernels are bound to interpreter or compiler at import)."""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

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
