"""Benchmark preprocess_data against Megatron-LM's algorithm on the same corpus, tokenizer and cores.

The baseline below reproduces what Megatron-LM's `tools/preprocess_data.py` does for
SentencePiece models without sentence splitting: a multiprocessing.Pool whose workers get the
input one line at a time (`imap`, chunksize 32), each running json.loads, the tokenizer
(megatron-core's own SentencePiece wrapper, as Megatron-LM builds it) and appending EOD, and
a main process that feeds every document to megatron-core's IndexedDatasetBuilder. It was
written for this benchmark from reading that script; no code was copied.

    python tools/bench_preprocess.py                        # built-in corpus, 4 MB per source
    python tools/bench_preprocess.py --input a.jsonl --tokenizer spm.model --workers 2 --repeat 3

Prints MB/s and docs/s for both, the speed-up, and whether both wrote identical bytes.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from megatron_code.data.corpus import QUICKSTART_MAX_BYTES_PER_SOURCE, prepare_builtin_corpus
from megatron_code.data.preprocess import dataset_prefix, preprocess
from megatron_code.data.tokenizer import train_tokenizer


class _MegatronStyleEncoder:
    """Per-worker state of the baseline: the tokenizer is built once per worker process."""

    tokenizer = None

    def __init__(self, tokenizer_model: str, key: str) -> None:
        self.tokenizer_model, self.key = tokenizer_model, key

    def initializer(self) -> None:
        _MegatronStyleEncoder.tokenizer = _megatron_tokenizer(self.tokenizer_model)

    def encode(self, json_line: str) -> tuple[list[int], list[int], int]:
        text = json.loads(json_line)[self.key]
        ids = self.tokenizer.tokenize(text)
        lengths = [len(ids)] if ids else []
        if ids:
            ids.append(self.tokenizer.eod)
            lengths[-1] += 1
        return ids, lengths, len(json_line)


def _megatron_tokenizer(model: str):
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=model, metadata_path={"library": "sentencepiece"})


def megatron_baseline(input_path: Path, output_prefix: Path, tokenizer_model: str, workers: int) -> int:
    """Megatron-LM's preprocessing loop (see the module docstring); returns documents written."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encoder = _MegatronStyleEncoder(tokenizer_model, "text")
    vocab_size = _megatron_tokenizer(tokenizer_model).vocab_size
    builder = IndexedDatasetBuilder(f"{output_prefix}.bin", dtype=DType.optimal_dtype(vocab_size))
    documents = 0
    with (open(input_path, encoding="utf-8") as fin,
          multiprocessing.Pool(workers, initializer=encoder.initializer) as pool):
        for ids, lengths, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(ids, lengths)
            documents += 1
        pool.close()
        pool.join()
    builder.finalize(f"{output_prefix}.idx")
    return documents


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children)."""
    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    wall, used = time.perf_counter(), cpu()
    fn(*args)
    return time.perf_counter() - wall, cpu() - used


def bench(inputs: list[Path], tokenizer: Path, workers: int, repeat: int, out_dir: Path) -> bool:
    """Run both pipelines `repeat` times, interleaved; print medians; True when outputs match."""
    all_identical = True
    for path in inputs:
        megabytes = path.stat().st_size / 1e6
        documents = sum(1 for line in open(path, "rb") if line.strip())
        ours_prefix, theirs_prefix = out_dir / f"ours_{path.stem}", out_dir / f"megatron_{path.stem}"
        runs: dict[str, list[tuple[float, float]]] = {"megatron-lm": [], "megatron_code": []}
        for _ in range(repeat):
            runs["megatron-lm"].append(_timed(megatron_baseline, path, theirs_prefix, str(tokenizer), workers))
            runs["megatron_code"].append(_timed(lambda: preprocess(path, ours_prefix, tokenizer, workers=workers,
                                                                   progress=False)))
        identical = all(filecmp.cmp(f"{theirs_prefix}.{ext}", f"{dataset_prefix(ours_prefix, 'text')}.{ext}",
                                    shallow=False) for ext in ("bin", "idx"))
        all_identical &= identical
        print(f"\n{path.name}: {megabytes:.2f} MB, {documents:,} documents, {workers} workers, "
              f"median of {repeat} (CPU s = all processes)")
        for name, times in runs.items():
            wall = statistics.median(t for t, _ in times)
            cpu = statistics.median(c for _, c in times)
            print(f"  {name:14s} {wall:6.2f} s  {megabytes / wall:6.2f} MB/s  {documents / wall:8,.0f} docs/s"
                  f"  {cpu:6.2f} CPU s")
        ratio = (statistics.median(t for t, _ in runs["megatron-lm"])
                 / statistics.median(t for t, _ in runs["megatron_code"]))
        cpu_ratio = (statistics.median(c for _, c in runs["megatron-lm"])
                     / statistics.median(c for _, c in runs["megatron_code"]))
        print(f"  speed-up {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU; .bin/.idx byte-identical: {identical}")
    return all_identical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, nargs="*",
                        help="JSONL files with a 'text' key (default: the built-in corpus)")
    parser.add_argument("--tokenizer", type=Path, help="SentencePiece .model (default: trained on the inputs)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-bytes-per-source", type=int, default=QUICKSTART_MAX_BYTES_PER_SOURCE,
                        help="cap of the built-in corpus")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "megatron_code_bench_preprocess")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # megatron-core warns about Transformer Engine / apex on import

    args.out_dir.mkdir(parents=True, exist_ok=True)
    inputs = args.input or list(prepare_builtin_corpus(args.out_dir / "corpus",
                                                       max_bytes_per_source=args.max_bytes_per_source).values())
    tokenizer = args.tokenizer or train_tokenizer(inputs, args.out_dir / "tokenizer" / "spm",
                                                  vocab_size=args.vocab_size)
    _megatron_tokenizer(str(tokenizer))  # import megatron-core before timing, as its script does at start-up
    return 0 if bench(inputs, tokenizer, args.workers, args.repeat, args.out_dir) else 1


if __name__ == "__main__":
    sys.exit(main())
