"""The train section: steps, batches, device and precision, logging, the training stage."""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import ConfigError, check_choice


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
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
