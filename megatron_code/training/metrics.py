"""Run metrics: a JSONL file per run (always), TensorBoard when installed and asked for, and the
FLOP counts behind MFU. Only rank 0 writes.

MFU (model FLOPs utilization) follows the Megatron paper (Narayanan et al. 2021) and torchtitan:

    model FLOPs per token = 6 N + 12 L H s

N counts the parameters that multiply activations: every layer's qkv, attention output and MLP
weights plus the output layer (h x padded vocabulary; tied or not, the head is a matmul, the
embedding lookup is not). 6 = 2 (multiply-add) x 3 (forward, input gradient, weight gradient).
12 L H s is attention's QK^T and AV over the whole sequence (s keys per query, forward and 2x for
backward; the causal half is not subtracted), with H = heads x head dim and L layers. Per GPU:
a step's total divided by the world size (every rank does an equal share under any layout).

Hardware FLOPs add the forward work that activation recomputation runs again, as torch's
non-reentrant checkpointing runs it (it stops once the backward has every tensor it needs):
`selective` repeats the fused attention kernel (4 L H s per token); `full` repeats each layer's
matmuls except its last, the MLP's down projection, whose output no backward reads, plus the
attention (2 (N_layers - L h ffn) + 4 L H s); the output layer is not recomputed. MFU divides
model FLOPs by the GPU's dense bf16 peak, HFU hardware FLOPs.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from megatron_code.config import ModelConfig
from megatron_code.training.integrity import write_durably

PEAK_BF16_FLOPS = {
    # torch.cuda.get_device_name() -> dense bf16 tensor-core FLOP/s (the datasheets' sparse figure / 2)
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA B200": 2250e12,
}
"""Matched by the exact name: a near match would misstate MFU by up to 30% (H100 SXM vs PCIe), and
"NVIDIA H100" alone (what some SXM boards report) cannot be told apart, so a name the table does
not hold gets no MFU (`train.peak_tflops` sets a peak by hand)."""


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU torch calls `name`, or None when it is not in the table."""
    return PEAK_BF16_FLOPS.get(name.strip())


def peak_flops(device: torch.device, dtype: torch.dtype, peak_tflops: float = 0.0) -> tuple[float | None, str]:
    """(the peak FLOP/s that MFU divides by, or None; a line saying where it comes from or why
    there is none). `peak_tflops` > 0 is the user's figure and wins."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, f"MFU against train.peak_tflops={peak_tflops:g}"
    if device.type != "cuda":
        return None, f"MFU: not reported on {device.type} (no peak known; train.peak_tflops sets one)"
    name = torch.cuda.get_device_name(device)
    if dtype != torch.bfloat16:
        return None, (f"MFU: not reported: the peak table holds bf16 peaks and this run computes in {dtype} "
                      "(train.peak_tflops sets a peak)")
    peak = peak_flops_for_name(name)
    if peak is None:
        return None, (f"MFU: not reported: {name!r} is not in the peak table of megatron_code/training/metrics.py "
                      "(train.peak_tflops sets its dense bf16 peak)")
    return peak, f"MFU against {name}'s dense bf16 peak, {peak / 1e12:g} TFLOP/s"


def _layer_matmul_params(config: ModelConfig) -> int:
    h, d = config.hidden_size, config.head_dim
    qkv = h * (config.num_heads + 2 * config.kv_heads) * d
    attention_out = config.num_heads * d * h
    mlp = h * config.ffn_size * (3 if config.activation == "swiglu" else 2)
    return config.num_layers * (qkv + attention_out + mlp)


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


def _attention_flops(config: ModelConfig, seq_length: int) -> int:
    """QK^T and AV of one token's query over `seq_length` keys, forward only, all layers."""
    return 2 * 2 * config.num_layers * config.num_heads * config.head_dim * seq_length


def flops_per_token(config: ModelConfig, seq_length: int) -> int:
    """Model FLOPs per trained token, 6 N + 12 L H s (module docstring)."""
    matmul_params = _layer_matmul_params(config) + config.hidden_size * config.vocab_size
    return 6 * matmul_params + 3 * _attention_flops(config, seq_length)


def hardware_flops_per_token(config: ModelConfig, seq_length: int, activation_checkpointing: str) -> int:
    """Model FLOPs plus the forward work that activation recomputation repeats."""
    down_projections = config.num_layers * config.ffn_size * config.hidden_size
    recomputed = {"none": 0, "selective": _attention_flops(config, seq_length),
                  "full": 2 * (_layer_matmul_params(config) - down_projections) + _attention_flops(config, seq_length)}
    return flops_per_token(config, seq_length) + recomputed[activation_checkpointing]


def _kept(line: str, step: int) -> bool:
    """Whether a resume at `step` keeps a JSONL line: a step's record up to `step`, an event
    before it (an event of step `step` happens again in the resumed run); not a line cut short
    by a crash."""
    try:
        record = json.loads(line)
        return record["step"] < step if "event" in record else record["step"] <= step
    except (json.JSONDecodeError, KeyError, TypeError):
        return False


class MetricsLogger:
    """`every_record` (e.g. the parallel layout) goes into each JSONL line. A run that starts at
    `start_step` (a resume) drops the records past it that an earlier attempt wrote: the steps
    it replays are logged again, once.

    Step numbering: a record's `step` counts the optimizer steps done, like a checkpoint's
    step_N: record N holds what the N-th optimizer step did, which trained on global batch N - 1
    (data schedules count steps done before a batch: a phase with `start: s` shows first in
    record s + 1). An event record (`"event": ...`, e.g. a schedule change) has the step from
    which it applies and comes between records `step` and `step + 1`."""

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
        kept = [line for line in lines if _kept(line, step)]
        if len(kept) < len(lines):
            write_durably(self.path, "".join(kept))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values, **self.every_record}) + "\n")
        except OSError as e:  # a write's error (a full disk) carries no file name
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def event(self, record: dict) -> None:
        """A line of its own for something that happened before a step (`record["step"]`)."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
