"""Training-step throughput, memory and communication of parallel layouts, against one process.

For each layout (T x P x DP ranks) the tool launches `torchrun` on this machine and runs the
trainer's own model, step and optimizer (`parallel.model.build_model`, `ParallelModel.forward_backward`,
AdamW) on random tokens: warm-up steps, then timed steps. Per layout it reports

  step time (median), tokens/s (all ranks) and per rank, model FLOP/s per rank (and MFU on a GPU
  with a known peak), peak memory per rank (CUDA allocator peak on GPU, process max RSS on CPU),
  and, read from outside by a sampler of /proc/<pid>/status (`RssSampler`), each rank's peak
  resident memory above the same process idle (torch imported, process group up, no model):
  the worst rank's, and that over the one-process run's ("x 1 proc", the first layout 1x1x1);
  comm share: the time ranks spend in collectives and pipeline send/recv (CPU: self time of the
  c10d ops on the calling thread, waits included; GPU: NCCL kernel time), over the step time;
  for pipeline layouts, the schedule's theoretical bubble -- (P - 1) / (V m + P - 1) for
  1F1B and interleaved 1F1B with m micro batches (zero bubble: a third of 1F1B's) -- and the
  measured idle share 1 - t_1 / (P t_P), where t_1 is the one-process step time of the same
  batch (it also counts the send/recv time and the TP/DP work of the layout).

Threads: `--cores C` are split over the ranks (at least one each). The default, all cores,
gives every layout the same machine; `--cores 1` gives every rank one thread, so N ranks have N
times the compute of one process, as N GPUs would: tokens/s per rank against one process is
then the layout's parallel efficiency.

    python tools/bench_parallel.py                               # tiny: 1x1x1, TP 2, PP 2, DP 2 on CPU
    python tools/bench_parallel.py --layouts 1x1x1 2x1x1 1x2x1 --preset quickstart --json runs/bench/layouts.json
    python tools/bench_parallel.py --layouts 1x4x1 --schedule interleaved_1f1b --virtual-stages 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from megatron_code.config import PRESETS, Config, DataConfig, ModelConfig, ParallelConfig, SourceConfig, TrainConfig

_WORKER_OPTIONS = ("preset", "vocab_size", "seq_length", "micro_batch_size", "global_batch_size", "schedule",
                   "virtual_stages", "dp_shard", "grad_reduce", "activation_checkpointing", "device", "warmup", "steps", "cores")
_COMM_OP = re.compile(r"^(c10d::|_c10d_functional::|nccl|ncclDevKernel)")


def parse_layout(text: str) -> tuple[int, int, int]:
    t, p, d = (int(x) for x in text.split("x"))
    return t, p, d


def build_config(args, t: int, p: int, world: int) -> Config:
    model = ModelConfig(**{**PRESETS[args.preset], "vocab_size": args.vocab_size,
                           "max_seq_len": max(args.seq_length, PRESETS[args.preset]["max_seq_len"])})
    parallel = ParallelConfig(tensor=t, pipeline=p, virtual_stages=args.virtual_stages if p > 1 else 1,
                              schedule=args.schedule if p > 1 else "1f1b", sequence_parallel=args.sequence_parallel and t > 1,
                              dp_shard=args.dp_shard, activation_checkpointing=args.activation_checkpointing,
                              grad_reduce=args.grad_reduce if args.dp_shard != "none" else "micro_batch")
    data = DataConfig(sources=[SourceConfig("random", "(random tokens)")], tokenizer="(none)", seq_length=args.seq_length)
    config = Config(model=model, parallel=parallel, data=data,
                    train=TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size))
    config.validate(world_size=world)
    return config


def random_micro_batches(args, dp_rank: int, dp_size: int, device: torch.device) -> list[dict]:
    """This rank's share of a global batch of random tokens (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.global_batch_size, args.seq_length + 1), generator=g)
    share = args.global_batch_size // dp_size
    tokens = tokens[dp_rank * share:(dp_rank + 1) * share]
    out = []
    for s in range(0, share, args.micro_batch_size):
        chunk = tokens[s:s + args.micro_batch_size]
        out.append({k: v.to(device) for k, v in {
            "tokens": chunk[:, :-1], "labels": chunk[:, 1:], "loss_mask": torch.ones(chunk.shape[0], args.seq_length),
            "position_ids": torch.arange(args.seq_length).expand(chunk.shape[0], -1),
            "source": torch.zeros(chunk.shape[0], dtype=torch.long)}.items()})
    return out


def status_bytes(pid: int | str, field: str) -> int | None:
    """`field` (VmRSS: resident now; VmHWM: the kernel's resident high-water mark) of
    /proc/<pid>/status in bytes, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class RssSampler:
    """Peak resident memory of every rank of a torchrun job, read from outside: a thread polls
    /proc/<pid>/status of torchrun's descendants that carry RANK in their environment, keeping
    each rank's largest VmHWM (exact: the kernel's own high-water mark, whatever the polling
    interval) and largest sampled VmRSS."""

    def __init__(self, root_pid: int, interval_s: float = 0.1, rescan_s: float = 1.0):
        self.root_pid, self.interval_s, self.rescan_s = root_pid, interval_s, rescan_s
        self.hwm: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        self._ranks: dict[int, int | None] = {}  # pid -> rank (None: not a rank)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, pending = [], [self.root_pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            pending.extend(children.get(pid, []))
        return found

    def _rank_of(self, pid: int) -> int | None:
        if pid not in self._ranks:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            except OSError:
                return None
            # torchrun's workers carry RANK and the run id; torchrun itself does not
            self._ranks[pid] = int(env[b"RANK"]) if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env else None
        return self._ranks[pid]

    def _run(self) -> None:
        ranks: dict[int, int] = {}
        last_scan = -math.inf
        while not self._stop.is_set():
            if time.monotonic() - last_scan > self.rescan_s:
                ranks = {pid: rank for pid in self._descendants() if (rank := self._rank_of(pid)) is not None}
                last_scan = time.monotonic()
            for pid, rank in ranks.items():
                for field, peaks in (("VmHWM", self.hwm), ("VmRSS", self.rss)):
                    value = status_bytes(pid, field)
                    if value is not None:
                        peaks[rank] = max(peaks.get(rank, 0), value)
            self._stop.wait(self.interval_s)


def worker(args) -> None:
    """One rank of one layout, under torchrun; rank 0 writes every rank's numbers to --out."""
    import torch.distributed as dist

    from megatron_code.parallel.distributed import build_runtime
    from megatron_code.parallel.model import build_model
    from megatron_code.training.loss import LossTotals
    from megatron_code.training.metrics import flops_per_token, peak_flops
    from megatron_code.training.precision import pick_precision
    from megatron_code.training.optim import Optimizers

    t, p, _ = parse_layout(args.layout)
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, args.cores // world))
    config = build_config(args, t, p, world)
    runtime = build_runtime(args.device, t, p)
    device = runtime.device
    precision = pick_precision("auto", device)  # what train.dtype=auto runs here
    torch.manual_seed(0)
    idle = status_bytes("self", "VmRSS")  # torch imported, process group up, no model yet
    model = build_model(config, runtime, precision.autocast)
    built = status_bytes("self", "VmHWM")
    optimizer = Optimizers(model.parts, config.optim)
    batches = random_micro_batches(args, runtime.coordinate("dp"), runtime.size("dp"), device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    def step():
        totals = LossTotals(1, device)
        model.forward_backward(batches, totals)
        totals.all_reduce(model.reports_loss, torch.zeros(1, dtype=torch.float64, device=device))  # as the trainer
        model.clip_grads_(1.0, model.grad_norm())
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync()
    profiled = time.perf_counter() - start
    comm = sum((e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) for e in
               prof.key_averages() if _COMM_OP.match(e.key)) / 1e6
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    median = statistics.median(times)
    tokens = args.global_batch_size * args.seq_length
    flops_per_rank = flops_per_token(config.model, args.seq_length) * tokens / world / median
    mine = {"rank": runtime.rank, "median_step_s": median, "comm_share": comm / profiled, "peak_memory_bytes": peak,
            "idle_rss_bytes": idle, "build_peak_rss_bytes": built, "model_flops_per_s": flops_per_rank}
    peak_rate = peak_flops(device, precision.dtype)[0]
    if peak_rate:
        mine["mfu"] = flops_per_rank / peak_rate
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if runtime.is_main:
        slowest = max(r["median_step_s"] for r in ranks)  # the step ends when the last rank is done
        result = {"layout": args.layout, "world_size": world, "threads_per_rank": torch.get_num_threads(),
                  "device": device.type, "parameters": model.num_parameters(), "median_step_s": slowest,
                  "tokens_per_s": tokens / slowest, "tokens_per_s_per_rank": tokens / slowest / world,
                  "ranks": ranks, "step_times_s": times}
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()  # no rank tears gloo down while another still talks
    dist.destroy_process_group()


def theoretical_bubble(args, t: int, p: int, d: int) -> float | None:
    if p == 1:
        return None
    m = args.global_batch_size // (args.micro_batch_size * d)
    v = args.virtual_stages if args.schedule != "1f1b" else 1
    one_f_one_b = (p - 1) / (v * m + p - 1)
    return one_f_one_b / 3 if args.schedule == "zero_bubble" else one_f_one_b


def run_layout(args, layout: str) -> dict:
    t, p, d = parse_layout(layout)
    world = t * p * d
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in _WORKER_OPTIONS]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   __file__, "--worker", f"--layout={layout}", f"--out={out}", *forwarded,
                   *(["--sequence-parallel"] if args.sequence_parallel else [])]
        with tempfile.TemporaryFile("w+") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
            with RssSampler(process.pid) as sampler:
                returncode = process.wait()
            if returncode != 0:
                log.seek(0)
                raise RuntimeError(f"layout {layout} failed:\n{log.read()[-4000:]}")
        with open(out) as f:
            result = json.load(f)
    for rank in result["ranks"]:  # peaks as seen from outside the process
        rank["peak_rss_bytes"] = sampler.hwm[rank["rank"]]
        rank["peak_rss_sampled_bytes"] = sampler.rss[rank["rank"]]
        rank["peak_above_idle_bytes"] = rank["peak_rss_bytes"] - rank["idle_rss_bytes"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1x1", "2x1x1", "1x2x1", "1x1x2"],
                        help="T x P x DP, e.g. 2x1x1 (the first should be 1x1x1: the baseline)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--schedule", default="1f1b", choices=("1f1b", "interleaved_1f1b", "zero_bubble"))
    parser.add_argument("--virtual-stages", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--dp-shard", default="none", choices=("none", "zero2", "zero3"))
    parser.add_argument("--grad-reduce", default="micro_batch", choices=("micro_batch", "step"),
                        help="zero2/zero3: reduce-scatter after every micro batch, or once per step")
    parser.add_argument("--activation-checkpointing", default="none", choices=("none", "selective", "full"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout and round")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every layout, in turns; the median counts")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads in all")
    parser.add_argument("--json", metavar="PATH", default="runs/bench/bench_parallel.json",
                        help="where the results go as JSON (default: %(default)s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    print(f"preset={args.preset} vocab={args.vocab_size} seq={args.seq_length} micro={args.micro_batch_size} "
          f"global={args.global_batch_size} schedule={args.schedule} V={args.virtual_stages} "
          f"dp_shard={args.dp_shard} grad_reduce={args.grad_reduce} cores={args.cores} rounds={args.rounds} torch={torch.__version__}", flush=True)
    rounds = {layout: [] for layout in args.layouts}
    for _ in range(args.rounds):  # layouts take turns, so slow drifts in machine load hit all alike
        for layout in args.layouts:
            rounds[layout].append(run_layout(args, layout))
    results = []
    for layout, runs in rounds.items():
        r = sorted(runs, key=lambda x: x["median_step_s"])[len(runs) // 2]  # the median round
        r["round_step_s"] = [x["median_step_s"] for x in runs]
        t, p, d = parse_layout(layout)
        r["theoretical_bubble"] = theoretical_bubble(args, t, p, d)
        baseline = results[0] if results and results[0]["world_size"] == 1 else None
        r["measured_idle"] = (1 - baseline["median_step_s"] / (p * r["median_step_s"])
                              if baseline and p > 1 else None)
        results.append(r)
    print(f"{'layout':<8} {'step ms':>8} {'tok/s':>8} {'tok/s/rank':>10} {'GFLOP/s/rank':>12} {'peak MiB/rank':>13} "
          f"{'RSS>idle MiB':>12} {'x 1 proc':>8} {'comm':>6} {'bubble theory':>13} {'idle measured':>13}")
    for r in results:
        ranks = r["ranks"]
        above_idle = max(x["peak_above_idle_bytes"] for x in ranks)
        baseline = results[0] if results[0]["world_size"] == 1 else None
        ratio = above_idle / max(x["peak_above_idle_bytes"] for x in baseline["ranks"]) if baseline else None
        print(f"{r['layout']:<8} {1e3 * r['median_step_s']:>8.1f} {r['tokens_per_s']:>8.0f} "
              f"{r['tokens_per_s_per_rank']:>10.0f} "
              f"{statistics.mean(x['model_flops_per_s'] for x in ranks) / 1e9:>12.2f} "
              f"{max(x['peak_memory_bytes'] for x in ranks) / 2**20:>13.0f} "
              f"{above_idle / 2**20:>12.0f} " + (f"{ratio:>8.2f} " if ratio is not None else f"{'':>8} ") +
              f"{statistics.mean(x['comm_share'] for x in ranks):>6.1%} "
              + (f"{r['theoretical_bubble']:>13.1%} {r['measured_idle']:>13.1%}" if r["measured_idle"] is not None
                 else f"{'':>13} {'':>13}"))
    options = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "layout", "out")}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the machine may be shared: its load says how noisy the numbers are
    out.write_text(json.dumps({"config": options, "torch": torch.__version__, "load_average_1min": os.getloadavg()[0],
                               "results": results}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
