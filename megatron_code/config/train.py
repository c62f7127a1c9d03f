"""The train section: steps, batches, device and precision, logging, the training stage."""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field

from .base import ConfigError, check_choice

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([dhms]))+")
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(name: str, text: str) -> float:
    """Seconds in a duration written like `3h50m`, `90m`, `1d12h` or `45s`."""
    if not _DURATION.fullmatch(text.strip()):
        raise ConfigError(f"{name}={text!r} is not a duration like 3h50m, 90m or 45s (units d, h, m, s)", name)
    seconds = sum(float(n) * _SECONDS[unit] for n, unit in re.findall(r"(\d+(?:\.\d+)?)([dhms])", text))
    if seconds <= 0:
        raise ConfigError(f"{name}={text!r} must be longer than zero", name)
    return seconds


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8
    global_batch_size: int = 8
    """Samples per optimizer step; micro batches are accumulated up to it."""
    seed: int = 1234
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda."""
    dtype: str = "auto"
    """auto | bf16 | fp32. auto: bf16 autocast on GPU, and on a CPU with bf16 hardware (avx512_bf16,
    amx_bf16; aarch64 bf16), else fp32. Parameters and optimizer state stay fp32 (see
    megatron_code/training/precision.py)."""
    allow_emulated_bf16: bool = False
    """Let train.dtype=bf16 run on a CPU without bf16 hardware, where PyTorch emulates it (same
    numbers, far slower than fp32): for testing the bf16 path on any machine."""
    peak_tflops: float = 0.0
    """Dense peak TFLOP/s of one GPU in the run's dtype, for MFU; 0: from the table of known GPUs
    in megatron_code/training/metrics.py (an unknown GPU gets no MFU)."""
    log_interval: int = 10
    """Print a line every N steps; metrics.jsonl gets every step."""
    eval_interval: int = 100
    """Validation every N steps (and at the end); 0 disables periodic validation."""
    eval_batches: int = 4
    """Micro batches per source per validation."""
    eval_tasks: list[str] = field(default_factory=list)
    """Multiple-choice task files (JSONL, see megatron_code/evaluation/tasks.py) scored at every
    validation; their accuracies go to the metrics as task/<name>/<acc|acc_norm|acc_ppl>."""
    output_dir: str = "runs/default"
    tensorboard: bool = False
    progress: bool = True
    stage: str = "pretrain"
    """pretrain | sft: instruction tuning on data from tools/preprocess_sft.py (loss on assistant
    tokens only), started from checkpoint.init_from with a fresh optimizer and LR schedule."""
    epochs: float = 0
    """sft: passes over the instruction data; > 0 sets train.steps to ceil(epochs x the training
    samples of the sources the schedule draws from / global_batch_size), ignoring train.steps."""
    nonfinite: str = "skip"
    """What a step whose loss or global gradient norm is NaN or infinite does (checked every step;
    every rank takes the same decision): skip (no update: weights and optimizer state, Adam's
    step count included, stay as they were; the batch is not retried; metrics.jsonl records the
    skip) | stop (exit 1 naming the step and the first parameter whose gradient is non-finite;
    nothing is saved, so the last checkpoint is the last good one)."""
    max_skipped_steps: int = 5
    """nonfinite=skip: the run stops at the non-finite step after this many, counted over the
    whole run (resumes included)."""
    loss_spike: str = "off"
    """off | log | skip: a step whose loss lies more than loss_spike_sigma standard deviations
    above the mean of the last loss_spike_window steps' losses is reported (log), or skipped
    too (skip), as OLMo-core does. Checked once half the window is filled."""
    loss_spike_sigma: float = 6.0
    loss_spike_window: int = 128
    """Steps in the loss-spike window; every finite loss enters it, spikes included, so a lasting
    change of level stops counting as a spike."""
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make the run save a checkpoint at the next step boundary and exit 0
    (pre-emption: SLURM and Kubernetes send SIGTERM; `sbatch --signal=USR1@120` sends SIGUSR1
    two minutes before the time limit). A signal reaching any rank stops every rank at the same
    step. Empty: the signals keep their default action."""
    max_wall_time: str = ""
    """Save and exit 0 at the last step boundary before this much time has passed since the
    trainer started (e.g. 3h50m; units d, h, m, s), judging by the last step's duration; leave
    the save time below the job's limit. Empty: no limit."""

    def validate(self) -> None:
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("train.dtype", self.dtype, ("auto", "bf16", "fp32"))
        check_choice("train.stage", self.stage, ("pretrain", "sft"))
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops must be >= 0, got {self.peak_tflops}")
        if self.epochs < 0:
            raise ConfigError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.epochs and self.stage != "sft":
            raise ConfigError("train.epochs counts passes over instruction data: it needs train.stage=sft")
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        check_choice("train.nonfinite", self.nonfinite, ("skip", "stop"))
        check_choice("train.loss_spike", self.loss_spike, ("off", "log", "skip"))
        if self.max_skipped_steps < 0:
            raise ConfigError(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.loss_spike_sigma <= 0 or self.loss_spike_window < 4:
            raise ConfigError(f"train.loss_spike_sigma must be > 0 and train.loss_spike_window >= 4, got "
                              f"{self.loss_spike_sigma} and {self.loss_spike_window}")
        for name in self.exit_signals:
            if not isinstance(getattr(signal, str(name), None), signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"train.exit_signals: {name!r} is not a signal a process can catch "
                                  "(names like SIGTERM, SIGUSR1)", "train.exit_signals")
        if self.max_wall_time:
            parse_duration("train.max_wall_time", self.max_wall_time)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")

    @property
    def max_wall_seconds(self) -> float | None:
        return parse_duration("train.max_wall_time", self.max_wall_time) if self.max_wall_time else None
