"""Benchmark the mixture sampler and the full data path.

    python tools/bench_sampler.py [--data runs/quickstart] [--megatron]

1. Start-up for a run of 10^9 planned samples (a four-phase schedule with a ramp): resolving
   the schedule, building the sampler and choosing the first global batch, with the process's
   peak memory before and after. `--megatron` also times megatron-core's blending index, which
   holds one entry per planned sample, at 10^8.
2. Sampler samples/s (choosing sources only) for 2 and 7 sources, in a constant phase and a ramp;
   memory after drawing 10^6 samples (flat: the state is a few counts per source).
3. Full data path samples/s: DataPipeline.next_step() on the quickstart's indexed data (build it
   with `python -m megatron_code.quickstart`), seq 256, global batch 64, with and without the
   prefetching thread.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_code.data.mixture import MixtureSampler  # noqa: E402
from megatron_code.data.schedule import resolve  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def startup(planned: int, batch: int) -> None:
    before = peak_mib()
    start = time.perf_counter()
    steps = planned // batch
    phases = resolve([{"start": 0, "weights": {"text": 7, "code": 3}}, {"start": 0.25, "weights": {"text": 6, "code": 4}},
                      {"start": 0.5, "weights": {"text": 5, "code": 5}, "ramp": 0.1},
                      {"start": 0.9, "weights": {"text": 8, "code": 2}}], ["text", "code"], {}, steps)
    sampler = MixtureSampler(["text", "code"], phases)
    sampler.take(0, batch)
    seconds = time.perf_counter() - start
    print(f"start-up, {planned:.0e} planned samples ({steps:,} steps of {batch}): {seconds * 1e3:.2f} ms, "
          f"peak memory {before:.0f} -> {peak_mib():.0f} MiB")


def megatron_blending(planned: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    before = peak_mib()
    start = time.perf_counter()
    dataset_index = np.zeros(planned, dtype=np.int16)
    sample_index = np.zeros(planned, dtype=np.int64)
    helpers_cpp.build_blending_indices(dataset_index, sample_index, np.array([0.7, 0.3]), 2, planned, False)
    print(f"megatron-core blending index, {planned:.0e} samples: {time.perf_counter() - start:.2f} s, "
          f"peak memory {before:.0f} -> {peak_mib():.0f} MiB")


def sampler_rate(sources: int, ramp: bool, samples: int, batch: int = 1024) -> None:
    names = [f"s{i}" for i in range(sources)]
    rng = np.random.default_rng(0)
    raw = [{"start": 0, "weights": {n: float(w) for n, w in zip(names, rng.random(sources) + 0.1)}}]
    if ramp:
        raw.append({"start": 1, "weights": {n: float(w) for n, w in zip(names, rng.random(sources) + 0.1)},
                    "ramp": 10 ** 9 - 1})  # to the end of the run
    sampler = MixtureSampler(names, resolve(raw, names, {}, 10 ** 9))
    sampler.take(0, batch)
    before = peak_mib()
    start = time.perf_counter()
    for step in range(1, samples // batch + 1):
        sampler.take(step, batch)
    rate = samples / (time.perf_counter() - start)
    print(f"sampler, {sources} sources, {'ramp' if ramp else 'constant'}: {rate:,.0f} samples/s "
          f"(peak memory {before:.0f} -> {peak_mib():.0f} MiB over {samples:.0e} samples)")


def data_path_rate(data: Path, steps: int, prefetch: int) -> None:
    from megatron_code.config import load_config
    from megatron_code.data.pipeline import DataPipeline
    from megatron_code.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as out:
        sources = ", ".join(f"{{name: {n}, prefix: '{data / 'data' / f'{n}_text_document'}', weight: {w}}}"
                            for n, w in (("text", 2), ("code", 1)))
        config = load_config(None, [f"--data.sources=[{sources}]", f"--data.tokenizer={data / 'tokenizer' / 'spm.model'}",
                                    "--data.seq_length=256", "--train.global_batch_size=64",
                                    "--train.micro_batch_size=8", f"--train.steps={steps}",
                                    f"--data.prefetch={prefetch}", f"--train.output_dir={out}"])
        pipeline = DataPipeline(config, load_tokenizer(config.data.tokenizer), log=lambda _: None)
        pipeline.next_step()
        start = time.perf_counter()
        for _ in range(steps - 1):
            pipeline.next_step()
        rate = (steps - 1) * 64 / (time.perf_counter() - start)
        pipeline.close()
    print(f"full data path (read, collate, 64 x 256 tokens per step), prefetch={prefetch}: {rate:,.0f} samples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/quickstart"), help="the quickstart's output folder")
    parser.add_argument("--megatron", action="store_true", help="also time megatron-core's blending index at 1e8")
    args = parser.parse_args()
    startup(10 ** 9, 1024)
    for sources in (2, 7):
        for ramp in (False, True):
            sampler_rate(sources, ramp, 10 ** 6)
    if (args.data / "tokenizer" / "spm.model").is_file():
        for prefetch in (0, 2):
            data_path_rate(args.data, 200, prefetch)
    else:
        print(f"full data path: skipped, {args.data} has no quickstart data (python -m megatron_code.quickstart)")
    if args.megatron:  # last: its memory would hide ours
        megatron_blending(10 ** 8)


if __name__ == "__main__":
    main()
