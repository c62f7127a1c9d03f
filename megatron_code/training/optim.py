"""AdamW with decoupled weight decay on matrices only, and the LR schedules."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from megatron_code.config import OptimConfig

# One entry per parameter name ("state.<name>.exp_avg", "param_groups.<name>.lr"): pipeline stages
# hold different parameters, and any layout can read any other's state by name.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """Weight decay only on matrices: norms, biases (1-D) are left alone, as in Megatron. The
    fused kernel on every device: one pass over each parameter, its gradient and both moments
    (on CPU the quickstart's step takes 11% less CPU time than with the per-op loop)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=True)


def wsd_decay_start(total_steps: int, config: OptimConfig) -> int:
    """The first step (0-based) of wsd's decay: the last `decay_fraction` of the steps, at least one."""
    return total_steps - max(1, round(config.decay_fraction * total_steps))


def lr_at(step: int, total_steps: int, config: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule.

    cosine: half-cosine from lr to min_lr over the remaining steps.
    wsd: constant lr, then a linear decay to min_lr over the last `decay_fraction` of steps.
    linear: linear anneal from lr to min_lr (Cohere's cooldown).
    constant: lr after warmup.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "wsd":
        decay_start = wsd_decay_start(total_steps, config)
        if step < decay_start:
            return config.lr
        progress = (step - decay_start + 1) / (total_steps - decay_start)
    else:
        span = max(1, total_steps - config.warmup_steps)
        progress = (step - config.warmup_steps + 1) / span
    progress = min(1.0, progress)
    if config.schedule == "cosine":
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
    return config.lr + (config.min_lr - config.lr) * progress


_PLAN_FIELDS = ("schedule", "lr", "min_lr", "warmup_steps", "decay_fraction")
"""The optim fields lr_at reads: with train.steps, the LR plan."""


def lr_plan_notes(config: OptimConfig, total_steps: int, step: int, saved: dict | None) -> list[str]:
    """What a start-up should say about the LR plan: a warmup the run never finishes, and, when a
    run resumes at `step` from a checkpoint whose config (`saved`) planned the LR otherwise (its
    train.steps or a schedule field differ), the LR its last step ran at beside the LR the new
    plan gives the next step, and the schedule that extends cleanly (wsd, from before its decay)."""
    notes = []
    if config.warmup_steps >= total_steps:
        notes.append(f"note: optim.warmup_steps={config.warmup_steps} is not shorter than the run's {total_steps} "
                     f"steps: the LR only climbs, to {lr_at(total_steps - 1, total_steps, config):.3g} of "
                     f"optim.lr={config.lr:g}, and the {config.schedule} schedule never starts; shorten the warmup")
    if not saved or step == 0:
        return notes
    fields = OptimConfig.__dataclass_fields__
    before = OptimConfig(**{k: v for k, v in saved["optim"].items() if k in fields})
    planned = saved["train"]["steps"]
    changes = [f"train.steps {planned} -> {total_steps}"] if planned != total_steps else []
    changes += [f"optim.{k} {getattr(before, k)} -> {getattr(config, k)}" for k in _PLAN_FIELDS
                if getattr(before, k) != getattr(config, k)]
    if not changes:
        return notes
    ended, now = lr_at(step - 1, planned, before), lr_at(step, total_steps, config)
    old_next = f" (the checkpoint's plan: {lr_at(step, planned, before):.3g})" if step < planned else ""
    note = (f"note: the LR schedule is re-planned from step {step} ({', '.join(changes)}): step {step} ran at "
            f"LR {ended:.3g}, the new plan gives {now:.3g} at step {step + 1}{old_next}")
    if config.schedule != "wsd":
        note += ("; optim.schedule=wsd extends cleanly: its LR holds at optim.lr until the last "
                 "optim.decay_fraction of the steps, so a run resumed (--load) from a checkpoint before its decay "
                 "continues as if planned that long")
    elif before.schedule == "wsd" and step > wsd_decay_start(planned, before) and now > ended:
        note += (f"; this checkpoint is inside the old plan's decay (from step {wsd_decay_start(planned, before)}): "
                 f"resume (--load) from a checkpoint at or before that step to extend without raising the LR again")
    return [*notes, note]


class Optimizers:
    """One AdamW per model part (pipeline stage) of this rank, stepped together; the
    checkpointer's "optimizer" state, keyed by parameter names."""

    def __init__(self, parts: list[nn.Module], config: OptimConfig):
        self.parts = parts
        self.optimizers = [build_optimizer(part, config) for part in parts]

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        state = {}
        for part, optimizer in zip(self.parts, self.optimizers):
            state.update(get_optimizer_state_dict(part, optimizer, options=_FLAT))
        return state

    def load_state_dict(self, state: dict) -> None:
        for part, optimizer in zip(self.parts, self.optimizers):
            names = get_optimizer_state_dict(part, optimizer, options=_FLAT).keys()
            set_optimizer_state_dict(part, optimizer, {k: state[k] for k in names}, options=_FLAT)
