"""Run metrics: a JSONL file per run (always), TensorBoard when installed and asked for, and the
FLOP estimate behind MFU. Only rank 0 writes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_code.config import ModelConfig
from megatron_code.training.integrity import write_durably

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
