"""Online data mixing: an adaptive phase sets its weights from the run's own per-source losses.

Method: Online Data Mixing (ODM), Albalak, Pan, Raffel and Wang, "Efficient Online Data Mixing
For Language Model Pre-Training" (arXiv:2312.02406, 2023). Each source is an arm of an Exp3
multi-armed bandit whose reward is its training loss (a source the model still finds hard is
worth more samples); no reference model, no extra forward pass. With K sources of nonzero prior
weight, at the t-th update:

    eps_t   = min(1/K, sqrt(ln K / (K t)))                          exploration, decaying
    R_d    <- smoothing * R_d + (1 - smoothing) * loss_d / pi_d      smoothed importance-weighted reward
    pi_d    = (1 - K u_t) * prior_d exp(eps_{t-1} R_d) / sum_e prior_e exp(eps_{t-1} R_e) + u_t,
              u_t = max(eps_t, min_weight)

ODM draws each batch from one source, drawn with probability pi_d, and divides its loss by pi_d
(Exp3's importance weight). Here every global batch mixes the sources, each in proportion pi_d,
and the step reports each one's loss, so every source gets that update at every weight update,
with `loss_d` its mean per-step training loss over the update's window (the `every` steps since
the last update; a source not drawn in the window keeps its estimate) and pi_d the weight it
had in the window. The reward is then a loss per unit of sampling: a source gains weight while
its loss is high for its share, which drives the weights toward shares that follow the losses.
(Without the 1/pi_d the rewards differ by the losses alone, a nat or two, and with eps_t below
0.2 after a few updates the weights hardly leave the prior.) `prior` (default: data.sources'
weights) gives the weights until the first update and the Gibbs distribution's base measure
(ODM's is uniform).

Exactness: the losses are the step's globally reduced per-source losses (the same on every
rank), and the weights are put on a grid of 1e-4 (integers that sum to 10,000, by largest
remainder) before they reach the sampler, so the last-bit differences between layouts'
reductions do not change which samples are drawn. Between updates the weights are constant and
the sampler's bound holds within each update's segment. The state (estimates, update count,
the window's sums, the weights in force) is plain data in the checkpoint.
"""
from __future__ import annotations

import math

GRID = 10_000
"""Weights are multiples of 1 / GRID."""


def on_grid(weights: dict[str, float]) -> dict[str, float]:
    """Weights summing to 1 rounded to multiples of 1/GRID that still sum to 1: floors, then the
    largest remainders get the leftover units (ties to the earlier source)."""
    scaled = {n: w * GRID for n, w in weights.items()}
    units = {n: math.floor(v) for n, v in scaled.items()}
    left = GRID - sum(units.values())
    order = sorted(scaled, key=lambda n: -(scaled[n] - units[n]))
    for n in order[:left]:
        units[n] += 1
    return {n: u / GRID for n, u in units.items()}


class OnlineDataMixing:
    """ODM's state for one adaptive phase over the sources of nonzero prior weight."""

    def __init__(self, prior: dict[str, float], smoothing: float, min_weight: float):
        self.prior = {n: w for n, w in prior.items() if w > 0}
        self.smoothing, self.min_weight = smoothing, min_weight
        self.updates = 0
        self.estimates = dict.fromkeys(self.prior, 0.0)
        self.window = {n: [0.0, 0] for n in self.prior}
        """Per source: the sum of its per-step losses since the last update, and the steps."""
        self.weights = on_grid(self.prior)

    def observe(self, losses: dict[str, float]) -> None:
        """One step's per-source training losses (the sources it drew)."""
        for name, loss in losses.items():
            if name in self.window and math.isfinite(loss):
                self.window[name][0] += loss
                self.window[name][1] += 1

    def _rate(self, t: int) -> float:
        k = len(self.prior)
        return 1.0 / k if t == 0 or k == 1 else min(1.0 / k, math.sqrt(math.log(k) / (k * t)))

    def update(self) -> dict[str, float]:
        """New weights from the losses observed since the last update."""
        self.updates += 1
        for name, (total, steps) in self.window.items():
            if steps:
                reward = total / steps / self.weights[name]
                self.estimates[name] = self.smoothing * self.estimates[name] + (1 - self.smoothing) * reward
        self.window = {n: [0.0, 0] for n in self.prior}
        k, rate, explore = len(self.prior), self._rate(self.updates - 1), max(self._rate(self.updates), self.min_weight)
        top = max(self.estimates.values())
        gibbs = {n: p * math.exp(rate * (self.estimates[n] - top)) for n, p in self.prior.items()}
        total = sum(gibbs.values())
        self.weights = on_grid({n: (1 - k * explore) * g / total + explore for n, g in gibbs.items()})
        return self.weights

    def state_dict(self) -> dict:
        return {"updates": self.updates, "estimates": dict(self.estimates),
                "window": {n: list(v) for n, v in self.window.items()}, "weights": dict(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.estimates = {n: float(state["estimates"][n]) for n in self.prior}
        self.window = {n: [float(state["window"][n][0]), int(state["window"][n][1])] for n in self.prior}
        self.weights = {n: float(w) for n, w in state["weights"].items()}
