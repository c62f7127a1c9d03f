"""The built-in data every Python installation can make, with no network: the standard
library's prose and code as a corpus, a tokenizer trained on it, and their indexed datasets.
Each step reuses what an earlier call built when it is still current. Used by the quickstart
and the studies."""
from __future__ import annotations

import sys
from pathlib import Path


def build_builtin_data(out: Path, vocab_size: int, max_bytes: int, workers: int) -> tuple[Path, dict[str, str]]:
    """Corpus under `out/corpus`, tokenizer under `out/tokenizer`, datasets under `out/data`;
    returns the tokenizer's path and each source's dataset prefix."""
    from megatron_code.data.corpus import prepare_builtin_corpus
    from megatron_code.data.preprocess import dataset_is_current, dataset_prefix, preprocess
    from megatron_code.data.tokenizer import train_tokenizer

    corpus = prepare_builtin_corpus(out / "corpus", max_bytes_per_source=max_bytes)
    tokenizer = train_tokenizer([corpus["text"], corpus["code"]], out / "tokenizer" / "spm", vocab_size=vocab_size)
    prefixes = {}
    for name, path in corpus.items():
        prefix = dataset_prefix(out / "data" / name, "text")
        if dataset_is_current(prefix, path, tokenizer):
            print(f"preprocess: {prefix}.{{bin,idx}} is up to date", file=sys.stderr)
        else:
            preprocess(path, out / "data" / name, tokenizer, json_keys=("text",), append_eod=True, workers=workers)
        prefixes[name] = str(prefix)
    return tokenizer, prefixes
