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
def datasets(tiny_corpus, tmp_path_factory) -> dict[str, str]:
    """The tiny corpus's text and code sources as indexed datasets: {name: prefix}."""
    from megatron_code.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("indexed")
    prefixes = {}
    for name in ("text", "code"):
        summary = preprocess(getattr(tiny_corpus, name), out / name, tiny_corpus.tokenizer, progress=False)
        prefixes[name] = str(summary["outputs"]["text"])
    return prefixes
