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

from megatron_code.config import ConfigError, OptimConfig
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


def _phases(config: OptimConfig, steps: int) -> list[tuple[str, str, int, float]]:
    """(kind, name, end step, LR at the end) of each phase after the warmup."""
    lr, low, name = config.lr, config.min_lr, f"optim.schedule={config.schedule}"
    if config.schedule == "wsd":
        decay_start = steps - max(1, round(config.decay_fraction * steps))
        return [("constant", name, decay_start, lr), ("linear", name, steps, low)]
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
