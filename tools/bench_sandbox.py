"""Benchmark the code sandbox against an earlier version of it, in one process, interleaved, so
that machine load falls on both alike and cancels in their ratio.

    git show b91e899:megatron_code/evaluation/sandbox.py > /tmp/sandbox_before.py
    python tools/bench_sandbox.py --before /tmp/sandbox_before.py

1. Per-sample overhead: wall time of `run_python` on a trivial program (`x = 1`, then
   `assert x == 1`), one sample of each version in turn; the median of each and their ratio.
2. A pass@1 run of 500 samples: 250 python_functions items from the train split, each once with
   its reference solution and once with a wrong one, run by two workers as score_code runs them;
   the versions take turns in blocks of 50 samples; total seconds of each and their ratio, and
   whether both gave the same verdicts.

The load average is printed before and after (2 cores: above 2 means other work was running).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_code.evaluation import sandbox  # noqa: E402
from megatron_code.data.synthetic import generate  # noqa: E402


def load_before(path: Path):
    spec = importlib.util.spec_from_file_location("sandbox_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up
    spec.loader.exec_module(module)
    return module


def overhead(versions: dict, n: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(n):
        for name, module in versions.items():
            start = time.perf_counter()
            result = module.run_python("x = 1\n", "assert x == 1\n", module.Limits())
            times[name].append(time.perf_counter() - start)
            assert result.passed, (name, result)
    return {name: statistics.median(t) for name, t in times.items()}


def pass_at_1(versions: dict, n_items: int, block: int) -> tuple[dict[str, float], dict[str, list[bool]]]:
    items = generate("python_functions", n_items, 0, "train")
    samples = [(item.prompt + body, "\n".join(item.tests)) for item in items
               for body in (item.reference, "    return None\n")]
    seconds = {name: 0.0 for name in versions}
    verdicts: dict[str, list[bool]] = {name: [] for name in versions}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(samples), block):
            chunk = samples[start:start + block]
            for name, module in versions.items():
                began = time.perf_counter()
                runs = list(pool.map(lambda s: module.run_python(s[0], s[1], module.Limits()), chunk))
                seconds[name] += time.perf_counter() - began
                verdicts[name] += [r.passed for r in runs]
    return seconds, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="an earlier sandbox.py (git show REV:...)")
    parser.add_argument("--trivial", type=int, default=200, help="trivial programs per version")
    parser.add_argument("--items", type=int, default=250, help="items of the pass@1 run (two samples each)")
    args = parser.parse_args()
    versions = {"before": load_before(args.before), "after": sandbox}
    sandbox.sandbox_features()  # its once-per-run set-up and self-test are not a sample's cost
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    medians = overhead(versions, args.trivial)
    print(f"per-sample overhead, median of {args.trivial} trivial programs: before {medians['before'] * 1e3:.1f} ms, "
          f"after {medians['after'] * 1e3:.1f} ms (after/before {medians['after'] / medians['before']:.2f})")
    seconds, verdicts = pass_at_1(versions, args.items, 50)
    print(f"pass@1 run of {2 * args.items} samples, 2 workers: before {seconds['before']:.1f} s, after "
          f"{seconds['after']:.1f} s (after/before {seconds['after'] / seconds['before']:.2f}); "
          f"pass@1 before {sum(verdicts['before']) / len(verdicts['before']):.3f}, "
          f"after {sum(verdicts['after']) / len(verdicts['after']):.3f}, "
          f"same verdicts: {verdicts['before'] == verdicts['after']}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
