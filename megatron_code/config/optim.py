"""The optimizer section: AdamW and the learning-rate schedule."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigError, check_choice


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    schedule: str = "cosine"
    """cosine | wsd (warmup-stable-decay) | linear (anneal to min_lr, used for cooldowns) | constant."""
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """wsd: the last fraction of steps that decays linearly to min_lr."""

    def validate(self) -> None:
        check_choice("optim.schedule", self.schedule, ("cosine", "wsd", "linear", "constant"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= optim.min_lr <= optim.lr, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
