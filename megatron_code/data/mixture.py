"""Which source serves each sample of the run: a pure function of per-source consumed counts.

The rule is Megatron's BlendedDataset rule: sample n goes to the source whose count lags its
weight the most (largest `w_d * max(n, 1) - count_d`, ties to the first), so every prefix of the
run matches the weights to within one sample. The state is one count per source, which is all a resume needs.
"""
from __future__ import annotations

import numpy as np


class Mixture:
    def __init__(self, names: list[str], weights: list[float]):
        if len(names) != len(weights) or not names:
            raise ValueError("a mixture needs one weight per source")
        total = float(sum(weights))
        self.names = list(names)
        self.weights = np.asarray(weights, dtype=np.float64) / total
        self.consumed = np.zeros(len(names), dtype=np.int64)

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n samples as (source index, index within that source), advancing the state."""
        picks = []
        for _ in range(n):
            d = int(np.argmax(self.weights * max(int(self.consumed.sum()), 1) - self.consumed))
            picks.append((d, int(self.consumed[d])))
            self.consumed[d] += 1
        return picks

    def state_dict(self) -> dict:
        return {"names": self.names, "consumed": self.consumed.tolist()}

    def load_state_dict(self, state: dict) -> None:
        saved = dict(zip(state["names"], state["consumed"]))
        missing = [n for n in saved if n not in self.names]
        if missing:
            raise ValueError(f"the checkpoint consumed data from sources {missing} that this config lacks")
        self.consumed = np.asarray([saved.get(n, 0) for n in self.names], dtype=np.int64)
