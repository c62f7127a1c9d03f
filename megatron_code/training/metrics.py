"""Run metrics: a JSONL file per run (always), TensorBoard when installed and asked for, and the
FLOP estimate behind MFU. Only rank 0 writes."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from megatron_code.config import ModelConfig

# Dense bf16 peak (no sparsity), from the vendors' data sheets.
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                    "L40S": 362e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token of the whole model: 6 x parameters in matmuls, plus causal
    attention scores. Per GPU: divide a step's total by the world size (every rank computes an
    equal share under any tensor x pipeline x data layout; activation recomputation not counted)."""
    h, L, hd = config.hidden_size, config.num_layers, config.head_dim
    qkv = h * (config.num_heads + 2 * config.kv_heads) * hd
    attn_out = config.num_heads * hd * h
    mlp = h * config.ffn_size * (3 if config.activation == "swiglu" else 2)
    head = h * config.vocab_size
    matmul_params = L * (qkv + attn_out + mlp) + head
    attention = L * 2 * 2 * config.num_heads * hd * seq_length / 2  # QK^T and AV, causal half
    return 6 * matmul_params + 3 * attention


def peak_memory(device: torch.device) -> dict[str, float]:
    """This rank's peak memory since it started, in GiB: on a GPU the caching allocator's peak
    of tensors (`max_memory_allocated`) and of what it holds from the driver (`max_memory_reserved`,
    what out-of-memory is about); on CPU the process's maximum resident set, which also counts the
    interpreter and libraries (compare ranks against an idle process). On Linux that is VmHWM:
    `ru_maxrss` also keeps the resident size of the process it was forked from (a test runner,
    a launcher) until exec, so a small rank started from a big parent would report the parent's."""
    if device.type == "cuda":
        return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))  # KiB
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; no /proc elsewhere
    return {"memory/peak_rss_gib": peak * 1024 / 2**30}


def format_peak_memory(metrics: dict) -> str:
    """The log line's part for `peak_memory`'s numbers."""
    if "memory/peak_allocated_gib" in metrics:
        return (f"peak mem {metrics['memory/peak_allocated_gib']:.2f} GiB allocated, "
                f"{metrics['memory/peak_reserved_gib']:.2f} GiB reserved")
    return f"peak mem {metrics['memory/peak_rss_gib']:.2f} GiB RSS"


def _record_step(line: str) -> float:
    """A JSONL record's step; a line cut short by a crash counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLogger:
    """`every_record` (e.g. the parallel layout) goes into each JSONL line. A run that starts at
    `start_step` (a resume) drops the records past it that an earlier attempt wrote: the steps
    it replays are logged again, once."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, every_record: dict | None = None,
                 start_step: int = 0):
        self.enabled, self.every_record = enabled, every_record or {}
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    print("train.tensorboard=true but tensorboard is not installed; "
                          "logging to metrics.jsonl only (pip install tensorboard)")
                else:
                    self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(True)
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values, **self.every_record}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
