"""Training-step throughput of our GPT against transformers' LlamaForCausalLM of the same config.

What it measures: one full training step per model -- forward, cross-entropy over the shifted
tokens, backward, AdamW step, zero_grad -- in the precision train.dtype=auto picks (bf16 autocast on
a GPU or a CPU with bf16 hardware, else fp32). Both models get the same config (vocab, sizes, GQA, tied embeddings, RoPE theta,
norm eps; HF with attn_implementation="sdpa") and the same weights (ours are copied into HF, and
the first step's losses must agree, so the two really compute the same function). Parameter counts
must be equal. After warm-up the two models' steps are interleaved (A B A B ...) so machine noise
hits both alike; the table reports median and min step time, tokens/s at the median, and the ratio
ours / HF in tokens/s (> 1 means ours is faster), both of the medians and as the median over rounds
of each round's ratio.

Ours runs as the trainer builds it: kernels and attention from `build_ops` / `build_attention`
(`--kernels`, `--attention`, default auto: on CPU that is `TORCH_OPS` and torch SDPA). Loss: by
default each model uses its own training path -- ours the per-token `ops.cross_entropy`
(`TORCH_OPS.cross_entropy` on CPU) over flattened logits with a masked mean, through
`model.loss.sample_losses` (the trainer's loss), HF `torch.nn.functional.cross_entropy`
(mean). `--loss torch` uses `F.cross_entropy` for both. CPU threads: the machine's core count (`--threads`).

Run it:
    python tools/bench_model.py                       # quickstart: ~7M params, seq 256, batch 8
    python tools/bench_model.py --preset tiny --rounds 10 --json runs/bench/tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_code.config import PRESETS, ModelConfig
from megatron_code.kernels.ops import KernelOps, build_attention, build_ops
from megatron_code.model import GPT
from megatron_code.model.hf import to_hf_model
from megatron_code.model.loss import sample_losses
from megatron_code.training.precision import pick_precision


def build_config(preset: str, vocab_size: int, seq_length: int) -> ModelConfig:
    config = ModelConfig(**{**PRESETS[preset], "vocab_size": vocab_size,
                            "max_seq_len": max(seq_length, PRESETS[preset].get("max_seq_len", 0))})
    config.validate()
    return config


def build_hf_llama(model: GPT, device: torch.device):
    """LlamaForCausalLM with our config and our weights."""
    return to_hf_model(model).to(device).train()


def make_step(name: str, model: torch.nn.Module, tokens: torch.Tensor, loss: str, autocast,
              ops: KernelOps | None = None):
    """A closure running one training step and returning the loss (a tensor, not synced)."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1], device=tokens.device).expand(inputs.shape)
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  fused=tokens.device.type == "cuda")

    def forward_loss() -> torch.Tensor:
        if name == "ours" and loss == "native":
            hidden = model(inputs, positions, return_hidden=True)
            return sample_losses(model, hidden, labels, loss_mask, ops).sum() / labels.numel()
        if name == "ours":
            logits = model(inputs, positions)  # as the trainer: explicit positions
        else:
            logits = model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    def step() -> torch.Tensor:
        with autocast():
            value = forward_loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.detach()

    return step


def bench_device(args, device: torch.device) -> dict:
    precision = pick_precision("auto", device)  # what train.dtype=auto runs here
    dtype_name = "bf16-autocast" if precision.dtype == torch.bfloat16 else "fp32"
    autocast = precision.autocast

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    config = build_config(args.preset, args.vocab_size, args.seq_length)
    torch.manual_seed(args.seed)
    ops = build_ops(args.kernels, device)
    ours = GPT(config, ops=ops, attention=build_attention(args.attention, device)).to(device).train()
    hf = build_hf_llama(ours, device)
    n_ours = ours.num_parameters()
    n_hf = sum(p.numel() for p in hf.parameters())  # parameters() counts a tied weight once
    assert n_ours == n_hf, f"parameter counts differ: ours {n_ours:,} vs HF {n_hf:,}"

    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_length + 1), device=device)
    steps = {"ours": make_step("ours", ours, tokens, args.loss, autocast, ops),
             "hf": make_step("hf", hf, tokens, args.loss, autocast)}

    # Same weights, same batch: the first losses must agree (before any optimizer step diverges them).
    first = {name: step().float().item() for name, step in steps.items()}
    tol = 1e-4 if device.type == "cpu" else 2e-2
    if abs(first["ours"] - first["hf"]) > tol * max(1.0, abs(first["hf"])):
        raise AssertionError(f"first-step losses differ: ours {first['ours']:.6f} vs HF {first['hf']:.6f}")

    for _ in range(args.warmup):
        for step in steps.values():
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):  # interleaved A B A B ...: noise hits both models alike
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)

    tokens_per_step = args.batch_size * args.seq_length
    result = {"device": str(device), "dtype": dtype_name, "ops": ops.name, "params_ours": n_ours,
              "params_hf": n_hf, "first_loss": first, "models": {}}
    for name, ts in times.items():
        median = statistics.median(ts)
        result["models"][name] = {"median_step_s": median, "min_step_s": min(ts),
                                  "tokens_per_s": tokens_per_step / median, "step_times_s": ts}
    result["ratio_ours_over_hf"] = (result["models"]["ours"]["tokens_per_s"]
                                    / result["models"]["hf"]["tokens_per_s"])
    # Each round's two steps ran back to back: their ratio cancels slow drifts in machine load.
    result["ratio_paired_median"] = statistics.median(h / o for o, h in zip(times["ours"], times["hf"]))
    return result


def print_table(results: list[dict]) -> None:
    print(f"{'device':<8} {'dtype':<14} {'model':<6} {'median ms':>10} {'min ms':>9} {'tokens/s':>10}")
    for r in results:
        for name, m in r["models"].items():
            print(f"{r['device']:<8} {r['dtype']:<14} {name:<6} {1e3 * m['median_step_s']:>10.1f} "
                  f"{1e3 * m['min_step_s']:>9.1f} {m['tokens_per_s']:>10.0f}")
        print(f"{r['device']:<8} {r['dtype']:<14} ours / HF tokens/s = {r['ratio_ours_over_hf']:.3f} "
              f"(of medians), {r['ratio_paired_median']:.3f} (median per round); "
              f"params {r['params_ours']:,} each")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quickstart", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per model, interleaved")
    parser.add_argument("--loss", default="native", choices=("native", "torch"),
                        help="native: ours TORCH_OPS.cross_entropy, HF F.cross_entropy; torch: F.cross_entropy for both")
    parser.add_argument("--kernels", default="auto", help="ours: model.kernels (auto | triton | torch)")
    parser.add_argument("--attention", default="auto", help="ours: model.attention (auto | sdpa | flash_attn | triton)")
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu (+ cuda if present)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = the machine's core count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", default="runs/bench/bench_model.json",
                        help="where the results go as JSON (default: %(default)s)")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto"
               else args.devices.split(","))
    print(f"preset={args.preset} vocab={args.vocab_size} seq={args.seq_length} batch={args.batch_size} "
          f"loss={args.loss} threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    results = [bench_device(args, torch.device(d)) for d in devices]
    print_table(results)
    import transformers
    meta = {k: v for k, v in vars(args).items() if k != "json"}
    meta.update(threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=sys.version.split()[0],
                machine=platform.machine(), processor=platform.processor(),
                cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": meta, "results": results}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
