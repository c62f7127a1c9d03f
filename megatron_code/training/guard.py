"""What a training step decides after its one host sync: whether its update is applied (a NaN or
infinite loss or gradient norm, a loss spike) and whether the run stops there (a pre-emption
signal, the wall-time limit).

Every rank takes the same decision without a collective of its own, so no rank can run ahead
into a collective the others skip. The loss totals are summed over all ranks and the gradient
norm is global, so a NaN or infinity on any rank reaches every rank's copy of both; the stop
requests travel as one vote per rank in the loss totals' all-reduce (`LossTotals.all_reduce`).
The decisions are functions of those reduced numbers, which are bitwise the same on every rank,
and of the guard's state, which every rank keeps alike and the checkpoint saves.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field

import torch

from megatron_code.config import TrainConfig


class NonFiniteError(RuntimeError):
    """The run stops on a non-finite step: one line for the user, exit status 1."""


@dataclass
class StepReport:
    """What one step's host sync brings back, the same on every rank."""
    loss: float
    per_source: dict[str, float]
    """Training loss of each source with loss tokens in the step."""
    grad_norm: float
    nonfinite: bool
    """The loss or the gradient norm is NaN or infinite."""
    votes: list[float]
    """Per stop reason (`StopRequests.reasons`), how many ranks asked to stop."""


def read_step(totals: torch.Tensor, grad_norm: torch.Tensor, votes: torch.Tensor, names: list[str]) -> StepReport:
    """The step's one device-to-host sync: (2, sources) loss sums and counts, the gradient norm,
    the non-finite flag and the summed stop votes, in one tensor."""
    nonfinite = ~(torch.isfinite(totals[0].sum()) & torch.isfinite(grad_norm))
    values = torch.cat([totals.flatten(), grad_norm.double().view(1), nonfinite.double().view(1), votes]).tolist()
    n = len(names)
    sums, counts, (norm, flag), votes = values[:n], values[n:2 * n], values[2 * n:2 * n + 2], values[2 * n + 2:]
    return StepReport(math.fsum(sums) / max(math.fsum(counts), 1.0),
                      {name: s / c for name, s, c in zip(names, sums, counts) if c > 0}, norm, flag > 0, votes)


@dataclass
class Verdict:
    apply: bool = True
    """Whether the optimizer applies the step's update."""
    failure: str | None = None
    """Why the run must stop with an error (train.nonfinite), in one line."""
    note: str | None = None
    """A skipped step or a loss spike, for the log."""
    metrics: dict = field(default_factory=dict)
    """What metrics.jsonl records of the decision."""


class StepGuard:
    """Applies train.nonfinite and train.loss_spike to each step's report. Its state (non-finite
    steps skipped so far, the loss-spike window) is saved with the step counter."""

    def __init__(self, train: TrainConfig):
        self.policy, self.max_skipped = train.nonfinite, train.max_skipped_steps
        self.spike, self.sigma, self.window = train.loss_spike, train.loss_spike_sigma, train.loss_spike_window
        self.skipped = 0
        self.losses: list[float] = []

    def judge(self, step: int, report: StepReport, nonfinite_param: str | None) -> Verdict:
        if report.nonfinite:
            values = (f"loss {report.loss} and gradient norm {report.grad_norm}; first parameter with a non-finite "
                      f"gradient: {nonfinite_param or 'none (the loss alone)'}")
            record = {"skipped": "nonfinite", "nonfinite_param": nonfinite_param}
            if self.policy == "stop":
                return Verdict(False, failure=f"step {step}: {values} (train.nonfinite=stop)", metrics=record)
            if self.skipped >= self.max_skipped:
                return Verdict(False, failure=f"step {step}: {values}; non-finite steps skipped so far: "
                                              f"{self.skipped} (train.max_skipped_steps={self.max_skipped})",
                               metrics=record)
            self.skipped += 1
            return Verdict(False, note=f"step {step} skipped: {values} ({self.skipped} of train.max_skipped_steps="
                                       f"{self.max_skipped})", metrics={**record, "skipped_steps": self.skipped})
        if self.spike == "off":
            return Verdict()
        z = self._zscore(report.loss)
        self.losses = (self.losses + [report.loss])[-self.window:]
        if z is None or z <= self.sigma:
            return Verdict(metrics={} if z is None else {"loss_z": z})
        skip = self.spike == "skip"
        return Verdict(not skip, note=f"step {step}{' skipped' if skip else ''}: loss spike, {report.loss:.4f} is "
                                      f"{z:.1f} standard deviations above the mean of the window",
                       metrics={"loss_z": z, "loss_spike": True, **({"skipped": "loss_spike"} if skip else {})})

    def _zscore(self, loss: float) -> float | None:
        """How many standard deviations `loss` lies above the window's mean; None until half the
        window is filled."""
        n = len(self.losses)
        if n < max(2, self.window // 2):
            return None
        mean = math.fsum(self.losses) / n
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / (n - 1))
        return (loss - mean) / std if std > 0 else (math.inf if loss > mean else 0.0)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped, "recent_losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped_steps"])
        self.losses = [float(x) for x in state["recent_losses"]][-self.window:]


class StopRequests:
    """Pre-emption: the exit signals this rank received and the wall-time limit, as votes that
    the step's all-reduce sums over ranks. A signal only sets a flag, so a step or a save in
    progress finishes; a repeated signal (SLURM signals every process of a step, torchrun
    forwards what it gets) changes nothing."""

    def __init__(self, train: TrainConfig, started: float):
        """`started`: when the run started, by `time.monotonic()`."""
        self.signals = [getattr(signal, name) for name in train.exit_signals]
        self.max_wall_seconds = train.max_wall_seconds
        self.reasons = [s.name for s in self.signals] + ["train.max_wall_time"]
        self.received = [False] * len(self.signals)
        self.started = self._last_vote = started

    @contextlib.contextmanager
    def listening(self):
        """Catch the exit signals inside the block; their former handlers come back after it."""
        if not self.signals or threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only: there the default action stays
            return
        former = {s: signal.signal(s, self._receive) for s in self.signals}
        try:
            yield
        finally:
            for s, handler in former.items():
                signal.signal(s, handler)

    def _receive(self, signum: int, frame) -> None:
        self.received[self.signals.index(signum)] = True

    def votes(self, device: torch.device) -> torch.Tensor:
        """This rank's vote per reason. The wall time votes when one more step, as long as the
        time since the last vote, would end past the limit."""
        now = time.monotonic()
        step_seconds, self._last_vote = now - self._last_vote, now
        late = self.max_wall_seconds is not None and now - self.started + step_seconds > self.max_wall_seconds
        votes = torch.zeros(len(self.reasons), dtype=torch.float64, device=device)
        for i, vote in enumerate(self.received + [late]):
            if vote:
                votes[i] = 1.0  # a fill on the device: no host-to-device copy, no sync
        return votes

    def reason(self, votes: list[float], world_size: int) -> str | None:
        """Why the ranks stop here (`votes` summed over ranks), or None."""
        asked = [f"{name} on {int(n)} of {world_size} ranks" if world_size > 1 else name
                 for name, n in zip(self.reasons, votes) if n > 0]
        return ", ".join(asked) or None
