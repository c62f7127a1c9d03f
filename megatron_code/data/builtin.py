"""The built-in data every Python installation can make, with no network: the standard
library's prose and code as a corpus, a tokenizer trained on it, and their indexed datasets.
Each step reuses what an earlier call built when it is still current. Used by the quickstart
and the studies."""
from __future__ import annotations

import sys
from pathlib import Path

SOURCES = ("text", "code")


def builtin_data_paths(out: Path) -> tuple[Path, dict[str, str]]:
    """Where build_builtin_data puts the tokenizer model and each source's dataset prefix, known
    before anything is built (so a run's config can be checked first)."""
    from megatron_code.data.preprocess import dataset_prefix

    return out / "tokenizer" / "spm.model", {name: str(dataset_prefix(out / "data" / name, "text"))
                                             for name in SOURCES}


def build_builtin_data(out: Path, vocab_size: int, max_bytes: int, workers: int,
                       progress: bool = True) -> tuple[Path, dict[str, str]]:
    """Corpus under `out/corpus`, tokenizer under `out/tokenizer`, datasets under `out/data`;
    returns the tokenizer's path and each source's dataset prefix."""
    from megatron_code.data.corpus import prepare_builtin_corpus
    from megatron_code.data.preprocess import dataset_is_current, preprocess
    from megatron_code.data.tokenizer import train_tokenizer

    corpus = prepare_builtin_corpus(out / "corpus", max_bytes_per_source=max_bytes, progress=progress)
    tokenizer = train_tokenizer([corpus["text"], corpus["code"]], out / "tokenizer" / "spm", vocab_size=vocab_size,
                                progress=progress)
    prefixes = builtin_data_paths(out)[1]
    for name, path in corpus.items():
        prefix = Path(prefixes[name])
        if dataset_is_current(prefix, path, tokenizer):
            print(f"preprocess: {prefix}.{{bin,idx}} is up to date", file=sys.stderr)
        else:
            preprocess(path, out / "data" / name, tokenizer, json_keys=("text",), append_eod=True, workers=workers,
                       progress=progress)
    return tokenizer, prefixes
