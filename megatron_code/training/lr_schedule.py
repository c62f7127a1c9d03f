"""The learning-rate plan of a run: a linear warmup from 0 to optim.lr, then phases, each moving
the LR from where the previous one ended (the first: optim.lr) to its own end value.

    optim.schedule: [{until: 0.9, kind: cosine}, {kind: linear, to: 1.0e-6}]

is a cosine from optim.lr to optim.min_lr until step floor(0.9 x train.steps), then a linear
anneal to 1e-6 over the rest. The shorthands are phases too: cosine, linear and constant are one
phase over the run; wsd is constant until the last `decay_fraction` of steps, then linear to
min_lr.

Steps count from the run's first step: a run continued with checkpoint.continue_from plans over
its own train.steps, from 0. Step k (0-based) gets the LR the plan reaches at the end of step k:
a phase over steps [a, b) is at progress (k - a + 1) / (b - a).

A plan the run cannot complete -- a warmup longer than the run, a decaying phase left no step,
a decay that starts inside the warmup -- is a one-line error at start-up naming the numbers
(`check_lr_plan`), or a warning with optim.allow_incomplete_schedule=true.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_code.config import ConfigError, LRPhaseConfig, OptimConfig
from megatron_code.data.schedule import ScheduleError, _steps


@dataclass(frozen=True)
class LRSegment:
    kind: str
    """warmup | cosine | linear | constant."""
    name: str
    """Where it comes from: optim.warmup_steps, optim.schedule=wsd, optim.schedule[1], ..."""
    start: int
    end: int
    """Steps [start, end) of the run; end <= start when the run leaves the segment no step."""
    lr_from: float
    lr_to: float

    def lr(self, step: int) -> float:
        if self.kind == "constant":
            return self.lr_from
        progress = min(1.0, (step - self.start + 1) / max(1, self.end - self.start))
        if self.kind == "cosine":
            return self.lr_to + 0.5 * (self.lr_from - self.lr_to) * (1 + math.cos(math.pi * progress))
        return self.lr_from + (self.lr_to - self.lr_from) * progress

    @property
    def decays(self) -> bool:
        return self.kind in ("cosine", "linear") and self.lr_to != self.lr_from


@dataclass(frozen=True)
class LRPlan:
    steps: int
    warmup: int
    segments: tuple[LRSegment, ...]
    """The warmup (when there is one), then the phases in order."""

    def lr(self, step: int) -> float:
        """The LR of step `step` (0-based) of the run; past the plan, its last value."""
        for segment in self.segments:
            if step < segment.end:
                return segment.lr(step)
        return self.segments[-1].lr(self.segments[-1].end)

    def problems(self) -> list[str]:
        """What of this plan the run never does, one sentence each."""
        decaying = [s for s in self.segments if s.decays]
        run = f"the run's {self.steps:,} steps (train.steps)"
        if self.warmup > self.steps:
            return [f"optim.warmup_steps={self.warmup} is longer than {run}: the LR never reaches optim.lr="
                    f"{self.segments[0].lr_to:g}" + (" and never decays" if decaying else "")]
        out = []
        for segment in decaying:
            what = f"the {segment.kind} decay of {segment.name}"
            if min(segment.end, self.steps) <= max(segment.start, self.warmup):
                out.append(f"{what} gets no step of {run} after optim.warmup_steps={self.warmup}: the LR never "
                           f"decays from {segment.lr_from:g} to {segment.lr_to:g}")
            elif segment.start < self.warmup:
                out.append(f"{what} starts at step {segment.start:,}, inside optim.warmup_steps={self.warmup}: the "
                           "LR jumps from the warmup into the middle of the decay")
        return out

    def describe(self, first_step: int = 0) -> str:
        """The LR at the run's first step and at the last step of each segment, as steps of the
        whole training (a continued run's steps start at `first_step`)."""
        points = [f"{self.lr(0):.3g} at step {first_step}"]
        for segment in self.segments:
            last = min(segment.end, self.steps) - 1
            if last >= segment.start:
                where = f"end of {segment.kind}" if segment.end <= self.steps else f"the run ends in the {segment.kind}"
                points.append(f"{self.lr(last):.3g} at step {first_step + last} ({where})")
        return f"learning rate over steps {first_step}..{first_step + self.steps - 1}: " + ", ".join(points)


def wsd_decay_start(steps: int, config: OptimConfig) -> int:
    """The first step (0-based) of wsd's decay: the last `decay_fraction` of the steps, at least one."""
    return steps - max(1, round(config.decay_fraction * steps))


def _phases(config: OptimConfig, steps: int) -> list[tuple[str, str, int, float]]:
    """(kind, name, end step, LR at the end) of each phase after the warmup."""
    lr, low, name = config.lr, config.min_lr, f"optim.schedule={config.schedule}"
    if config.schedule == "wsd":
        return [("constant", name, wsd_decay_start(steps, config), lr), ("linear", name, steps, low)]
    if isinstance(config.schedule, str):
        return [(config.schedule, name, steps, lr if config.schedule == "constant" else low)]
    phases, previous = [], lr
    for i, phase in enumerate(config.schedule):
        where = f"optim.schedule[{i}].until"
        try:
            end = steps if phase.until is None else _steps(phase.until, steps, where)
        except ScheduleError as e:
            raise ConfigError(str(e)) from None
        if phases and end <= phases[-1][2]:
            raise ConfigError(f"{where} is step {end}, not after optim.schedule[{i - 1}].until (step "
                              f"{phases[-1][2]}) of the run's {steps} steps: phases are in order")
        previous = previous if phase.kind == "constant" else low if phase.to is None else phase.to
        phases.append((phase.kind, f"optim.schedule[{i}]", end, previous))
    return phases


def lr_plan(config: OptimConfig, steps: int) -> LRPlan:
    """The plan of a run of `steps` steps."""
    warmup = config.warmup_steps
    segments = [LRSegment("warmup", "optim.warmup_steps", 0, warmup, 0.0, config.lr)] if warmup else []
    start, lr = warmup, config.lr
    for kind, name, end, to in _phases(config, steps):
        segments.append(LRSegment(kind, name, start, end, lr, to))
        start, lr = end, to
    return LRPlan(steps, warmup, tuple(segments))


def lr_at(step: int, total_steps: int, config: OptimConfig) -> float:
    """The LR of step `step` (0-based) of a run of `total_steps` steps."""
    return lr_plan(config, total_steps).lr(step)


def check_lr_plan(config: OptimConfig, steps: int) -> list[str]:
    """Stop with one line when the run cannot complete its LR plan; with
    optim.allow_incomplete_schedule=true, return the same sentences as warnings instead."""
    problems = lr_plan(config, steps).problems()
    if problems and not config.allow_incomplete_schedule:
        raise ConfigError("; ".join(problems) + " (shorten the warmup, lengthen the run, or set "
                          "optim.allow_incomplete_schedule=true to run it anyway)")
    return problems


_PLAN_FIELDS = ("schedule", "lr", "min_lr", "warmup_steps", "decay_fraction")
"""The optim fields the plan reads: with train.steps, the LR plan."""


def _saved_optim(saved: dict) -> OptimConfig:
    values = {k: v for k, v in saved.items() if k in OptimConfig.__dataclass_fields__}
    if isinstance(values.get("schedule"), list):
        values["schedule"] = [LRPhaseConfig(**phase) for phase in values["schedule"]]
    return OptimConfig(**values)


def lr_plan_notes(config: OptimConfig, total_steps: int, step: int, saved: dict | None) -> list[str]:
    """What a resume should say about the LR plan: when a run resumes at step `step` of its plan
    from a checkpoint whose config (`saved`) planned the LR otherwise (its train.steps or a plan
    field differ), the LR its last step ran at beside the LR the new plan gives the next step,
    and the schedule that extends cleanly (wsd, from before its decay)."""
    if not saved or step == 0:
        return []
    before = _saved_optim(saved["optim"])
    planned = saved["train"]["steps"]
    changes = [f"train.steps {planned} -> {total_steps}"] if planned != total_steps else []
    changes += [f"optim.{k} {getattr(before, k)} -> {getattr(config, k)}" for k in _PLAN_FIELDS
                if getattr(before, k) != getattr(config, k)]
    if not changes:
        return []
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
    return [note]
