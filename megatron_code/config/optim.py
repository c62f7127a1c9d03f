"""The optimizer section: AdamW and the learning-rate plan (a warmup, then a schedule)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigError, check_choice

LR_SHORTHANDS = ("cosine", "wsd", "linear", "constant")
LR_PHASE_KINDS = ("cosine", "linear", "constant")


@dataclass
class LRPhaseConfig:
    kind: str = "cosine"
    """cosine | linear | constant: how the LR moves from where the previous phase ended (the
    first phase: optim.lr, after the warmup) to `to`."""
    until: float | None = None
    """The step this phase ends before: a step of this run, or a fraction (below 1) of
    train.steps, floored (0.9 of 95,367 steps is step 85,830). Empty: the end of the run (the
    last phase only)."""
    to: float | None = None
    """The LR at the phase's end (cosine, linear); empty: optim.min_lr. A constant phase holds
    the LR it starts with."""

    def validate(self, where: str) -> None:
        check_choice(f"{where}.kind", self.kind, LR_PHASE_KINDS)
        if self.to is not None and (self.kind == "constant" or not self.to >= 0):
            raise ConfigError(f"{where}.to={self.to}: " + ("a constant phase holds its LR; `to` is for cosine and "
                                                           "linear phases" if self.kind == "constant"
                                                           else "must be >= 0"))
        if self.until is not None and not self.until > 0:
            raise ConfigError(f"{where}.until must be a step > 0 or a fraction of train.steps, got {self.until}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """The peak LR: the warmup ends there and the first phase starts there."""
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    schedule: list[LRPhaseConfig] | str = "cosine"
    """After the warmup: cosine | wsd (warmup-stable-decay) | linear (anneal to min_lr) |
    constant, or phases in order, e.g. [{until: 0.9, kind: cosine}, {kind: linear, to: 1e-6}]
    (cosine to min_lr over 90% of the run, then a linear anneal to 1e-6)."""
    warmup_steps: int = 100
    """Linear warmup from 0 to optim.lr over the run's first steps (a continued run's first
    steps with checkpoint.continue_from)."""
    decay_fraction: float = 0.2
    """wsd: the last fraction of steps that decays linearly to min_lr."""
    allow_incomplete_schedule: bool = False
    """A warmup longer than the run, or a decaying phase left no steps (so the LR never decays),
    is an error at start-up naming both numbers; true makes it a warning (a smoke test of a
    paper-scale recipe on a few steps)."""

    def validate(self) -> None:
        if isinstance(self.schedule, str):
            check_choice("optim.schedule", self.schedule, LR_SHORTHANDS)
        elif not self.schedule:
            raise ConfigError("optim.schedule is an empty list: give a shorthand (cosine, wsd, linear, constant) "
                              "or phases like [{kind: cosine}]")
        else:
            for i, phase in enumerate(self.schedule):
                phase.validate(f"optim.schedule[{i}]")
                last = i == len(self.schedule) - 1
                if (phase.until is None) != last:
                    raise ConfigError(f"optim.schedule[{i}].until: " + (
                        "the last phase runs to the end of the run; leave it empty" if last else
                        "empty, but only the last phase runs to the end of the run"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= optim.min_lr <= optim.lr, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
