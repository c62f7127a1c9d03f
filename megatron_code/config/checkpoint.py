"""The checkpoint section: when to save, what to keep, where to start from."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigError


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Keep the newest N checkpoints by step number; pruning never removes the newest intact one, a
    damaged one, or anything older than a damaged one."""
    load: str = ""
    """Resume from this checkpoint directory (a run dir's `checkpoints/` or one `step_N` in it);
    overrides `init_from` and `continue_from`. A weights-only checkpoint (e.g. imported from Hugging Face) starts as
    `init_from` does. Without it, a train.output_dir that holds checkpoints resumes from its
    newest intact checkpoint; pointing it at another run while train.output_dir holds checkpoints
    is refused."""
    init_from: str = ""
    """Start from this checkpoint's model weights only: fresh optimizer, LR schedule and data
    position, step 0 -- on the run's first start; a relaunch resumes train.output_dir's newest
    intact checkpoint instead. Any parallel layout can read a checkpoint saved under any other."""
    continue_from: str = ""
    """Continue training from this checkpoint with a new LR plan: its model weights and optimizer
    state (AdamW moments and step counts), the step counter from its step, then train.steps more
    steps under this config's optim.* plan (counted from the continued run's first step), with
    this config's data from their start and this config's optimizer hyperparameters. Megatron-LM's
    --load with --override-opt_param-scheduler; the cooldowns and continued runs of Aryabumi et
    al. On the run's first start only: a relaunch resumes train.output_dir's newest intact
    checkpoint."""
    save: bool = True
    allow_fresh_start: bool = False
    """Start again from step 0 (or `init_from`) when train.output_dir holds step_N folders of which
    none is intact (each damaged one is named; all are kept). Without it such a launch stops: a
    run never silently starts over."""

    def validate(self) -> None:
        if self.interval < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
        if self.init_from and self.continue_from:
            raise ConfigError(f"checkpoint.init_from={self.init_from} and checkpoint.continue_from={self.continue_from}: "
                              "give one (init_from: weights only; continue_from: weights and optimizer state)")
