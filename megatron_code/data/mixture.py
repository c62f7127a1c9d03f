"""Which source serves each sample: a pure function of the schedule, the step, and small counts.

Within a phase, sample t (counted from the phase's start) goes to a source by Tijdeman's rule
for the chairman assignment problem: with m sources of nonzero weight, delta = 1 / (2m - 2) and
Lambda_d(t) the integral of source d's scheduled weight over the phase's first t samples, the
candidates are the sources with Lambda_d(t) - count_d >= delta, and the one chosen is the
candidate whose next sample falls due first (the least x with Lambda_d(x) >= count_d + 1 - delta).
Tijdeman (1980) proved that this keeps |count_d(t) - Lambda_d(t)| <= 1 - delta for every source and
every t, for weights that change from sample to sample as a ramp's do: within 0.5 samples with
two sources, below one sample always. A source of weight 0 is never a candidate.

Mixing by tokens (data.mix_by: tokens, loss_tokens or examples) counts each sample as its number
of units instead of 1: Lambda_d is then the sum over the samples drawn of (source d's weight at
that sample) x (the sample's units), and the same rule runs with delta = 0 and each source's
next sample at its own size. That is Bennett and Zhang's WF2Q ("Worst-case Fair Weighted Fair
Queueing", INFOCOM 1996) with every source always backlogged: among the sources not ahead of
their share, serve the one whose next sample would finish first in the fluid mix. Each source
stays less than one of its samples ahead of its share (it is chosen only when not ahead), and
with two sources, whose differences from their shares sum to zero, less than one sample behind;
with more sources WF2Q's bound is one maximum sample behind (tests check both at every prefix).

The state is, per source, a count within the current segment (a phase from its start, or from
an adaptive weight update) and a position (samples consumed over the whole run); there is no
index over the run and no communication: every rank computes the same picks. The same rule,
with constant weights, picks which file of a several-file source serves each of the source's
samples (FileMix).
"""
from __future__ import annotations

import math

import numpy as np

from megatron_code.data.adaptive import on_grid
from megatron_code.data.schedule import Phase, phase_index, restrict


class PhaseTargets:
    """Lambda_d(x): the integral of each source's weight over the first x samples of a phase,
    and its inverse. The weight moves linearly from `a` to `b` over `ramp` samples, then stays."""

    def __init__(self, phase: Phase, names: list[str], samples_per_step: int):
        self.b = [phase.weights.get(n, 0.0) for n in names]
        self.a = [phase.ramp_from.get(n, 0.0) for n in names] if phase.ramp else list(self.b)
        self.ramp = float(phase.ramp * samples_per_step)
        self.active = [d for d in range(len(names)) if self.a[d] > 0 or self.b[d] > 0]
        m = len(self.active)
        self.delta = 1.0 / (2 * m - 2) if m > 1 else 0.0

    def target(self, d: int, x: float) -> float:
        a, b, ramp = self.a[d], self.b[d], self.ramp
        if x >= ramp:
            return (a + b) * ramp / 2 + b * (x - ramp)
        return a * x + (b - a) * x * x / (2 * ramp)

    def inverse(self, d: int, y: float) -> float:
        """The least x with target(d, x) >= y (inf when the source never gets there)."""
        a, b, ramp = self.a[d], self.b[d], self.ramp
        at_ramp_end = (a + b) * ramp / 2
        if y <= 0:
            return 0.0
        if y <= at_ramp_end:
            # the root of (b - a) x^2 / (2 ramp) + a x - y, in the form without cancellation
            return 2 * y / (a + math.sqrt(a * a + 2 * (b - a) * y / ramp))
        if b <= 0:
            return math.inf
        return ramp + (y - at_ramp_end) / b


class MixtureSampler:
    """Picks (source, position) for every sample of every global batch, following the schedule.

    `positions[d]` counts the samples source d served over the run (its reader's cursor). The
    current segment starts at step `segment`: the start of phase `phase`, a later step where the
    phase's weights were reset (an adaptive update: `segment_weights`), or a resume that changed
    what is counted. Within it: `phase_samples` samples drawn, `counts[d]` units source d served,
    and, when mixing by units, `owed[d]` its share of the units drawn (Lambda_d)."""

    def __init__(self, names: list[str], phases: list[Phase]):
        self.names = list(names)
        self.phases = phases
        self.positions = [0] * len(names)
        self.phase = 0
        self.segment = 0
        self.segment_weights: dict[str, float] | None = None
        self._restart_counts()

    def _restart_counts(self) -> None:
        self.phase_samples = 0
        self.counts = [0] * len(self.names)
        self.owed = [0.0] * len(self.names)
        self._targets = None

    def set_phases(self, phases: list[Phase]) -> None:
        """Adopt an edited schedule (schedule.merge kept every phase that started, so the current
        phase and its counts carry on)."""
        self.phases = phases
        self._targets = None

    def restart(self, step: int, weights: dict[str, float] | None = None) -> None:
        """Start a new segment at `step`: counts from zero, and for an adaptive phase these
        constant `weights` (a fixed phase goes on with its own weights from `step`)."""
        self.phase, self.segment, self.segment_weights = phase_index(self.phases, step), step, weights
        self._restart_counts()

    def weights_in_force(self) -> Phase:
        """The current segment as a phase: its weights (and ramp) from the segment's start."""
        phase = self.phases[self.phase]
        if phase.adaptive:  # its prior until the first update, on the grid like every update's weights
            return Phase(self.segment, dict(self.segment_weights or on_grid(phase.weights)))
        return restrict(phase, self.segment) if self.segment > phase.start else phase

    def _enter(self, step: int, samples_per_step: int) -> PhaseTargets:
        index = phase_index(self.phases, step)
        if index != self.phase:
            self.phase, self.segment, self.segment_weights = index, self.phases[index].start, None
            self._restart_counts()
        if self._targets is None or self._targets[0] != samples_per_step:
            self._targets = (samples_per_step, PhaseTargets(self.weights_in_force(), self.names, samples_per_step))
        return self._targets[1]

    def take(self, step: int, n: int, units: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The n samples of global batch `step`: (source index, position within source), advancing
        the state. Phases change only at step boundaries, so a batch lies within one phase.
        `units`: mix by units instead of samples; units[d][k] is the size of source d's k-th
        next sample (n of them for each source the phase draws from)."""
        targets = self._enter(step, n)
        if units is not None:
            return self._take_units(targets, n, units)
        if len(targets.active) == 1:  # one candidate: the rule picks it every time
            d = targets.active[0]
            positions = np.arange(self.positions[d], self.positions[d] + n, dtype=np.int64)
            self.counts[d] += n
            self.positions[d] += n
            self.phase_samples += n
            return np.full(n, d, dtype=np.int64), positions
        counts, t = self.counts, self.phase_samples
        due = [targets.inverse(d, counts[d] + 1 - targets.delta) for d in range(len(counts))]
        sources = np.empty(n, dtype=np.int64)
        positions = np.empty(n, dtype=np.int64)
        for j in range(n):
            t += 1
            best, best_due = -1, math.inf
            for d in targets.active:
                if targets.target(d, t) - counts[d] >= targets.delta and due[d] < best_due:
                    best, best_due = d, due[d]
            if best < 0:  # only reachable through rounding: take the largest deficit
                best = max(targets.active, key=lambda d: targets.target(d, t) - counts[d])
            counts[best] += 1
            due[best] = targets.inverse(best, counts[best] + 1 - targets.delta)
            sources[j] = best
            positions[j] = self.positions[best]
            self.positions[best] += 1
        self.phase_samples = t
        return sources, positions

    def _take_units(self, targets: PhaseTargets, n: int, units: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """WF2Q over units (module docstring): a source is a candidate while its units served do
        not exceed its share of the units drawn; the candidate chosen is the one whose next
        sample the fluid mix would complete first."""
        counts, owed, t, active = self.counts, self.owed, self.phase_samples, targets.active
        taken = dict.fromkeys(active, 0)
        sources = np.empty(n, dtype=np.int64)
        positions = np.empty(n, dtype=np.int64)
        for j in range(n):
            t += 1
            weight = {d: targets.target(d, t) - targets.target(d, t - 1) for d in active}
            best, best_due = -1, math.inf
            for d in active:
                if weight[d] > 0 and owed[d] >= counts[d]:
                    due = (counts[d] + int(units[d][taken[d]]) - owed[d]) / weight[d]
                    if due < best_due:
                        best, best_due = d, due
            if best < 0:  # only reachable through rounding: take the largest deficit
                best = max((d for d in active if weight[d] > 0), key=lambda d: owed[d] - counts[d])
            size = int(units[best][taken[best]])
            taken[best] += 1
            counts[best] += size
            for d in active:
                owed[d] += weight[d] * size
            sources[j] = best
            positions[j] = self.positions[best]
            self.positions[best] += 1
        self.phase_samples = t
        return sources, positions

    def scheduled_weights(self, step: int, n: int) -> dict[str, float]:
        """The mean scheduled weight of each source over global batch `step` of n samples."""
        targets = self._enter(step, n)
        t = self.phase_samples
        if t >= targets.ramp:  # constant: the weights themselves
            return dict(zip(self.names, targets.b))
        return {name: (targets.target(d, t + n) - targets.target(d, t)) / n for d, name in enumerate(self.names)}

    def state_dict(self) -> dict:
        return {"positions": dict(zip(self.names, self.positions)), "phase": self.phase, "segment": self.segment,
                "segment_weights": self.segment_weights, "phase_samples": self.phase_samples,
                "counts": dict(zip(self.names, self.counts)), "owed": dict(zip(self.names, self.owed))}

    def load_state_dict(self, state: dict) -> None:
        self.positions = [int(state["positions"].get(n, 0)) for n in self.names]
        self.phase, self.phase_samples = int(state["phase"]), int(state["phase_samples"])
        self.segment = int(state.get("segment", self.phases[self.phase].start if self.phases else 0))
        self.segment_weights = state.get("segment_weights")
        self.counts = [int(state["counts"].get(n, 0)) for n in self.names]
        self.owed = [float(state.get("owed", {}).get(n, 0.0)) for n in self.names]
        self._targets = None


class FileMix:
    """Which file of a source serves each of the source's samples: the rule above with the files'
    constant weights as one phase over the whole run, so after the source's t-th sample every file
    has served within 1 - 1/(2k-2) samples of t x its share (k files of nonzero weight; exactly its
    share with one file). The state is the sampler's: per file a position and a count."""

    def __init__(self, prefixes: list[str], weights: list[float]):
        total = float(sum(weights))
        self.shares = [w / total for w in weights]
        self.sampler = MixtureSampler(list(prefixes), [Phase(0, dict(zip(prefixes, self.shares)))])

    @property
    def positions(self) -> list[int]:
        return self.sampler.positions

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The files of the source's next n samples: (file index, position within the file)."""
        return self.sampler.take(0, n)

    def most_served(self, f: int, more: float) -> float:
        """An upper bound on file f's position after `more` further samples of the source."""
        s, k = self.sampler, sum(share > 0 for share in self.shares)
        if not self.shares[f]:
            return s.positions[f]
        slack = 1 - 1 / (2 * k - 2) if k > 1 else 0.0
        return s.positions[f] - s.counts[f] + self.shares[f] * (s.phase_samples + more) + slack

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict, restart: bool = False) -> None:
        """`restart`: the files or their weights changed, so the mix starts afresh from here
        (no catching up on the old weights); each file keeps its position."""
        self.sampler.load_state_dict({**state, "phase_samples": 0, "counts": {}} if restart else state)
