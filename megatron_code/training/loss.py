"""The per-source loss totals a training step reports. The loss itself is math and lives beside
the model (megatron_code/model/loss.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class LossTotals:
    """Masked loss sums and token counts per data source over one step, accumulated on the device
    (no host sync per micro batch) and summed over ranks once per step."""

    def __init__(self, num_sources: int, device: torch.device):
        self.totals = torch.zeros(2, num_sources, dtype=torch.float64, device=device)  # (sum, count)

    def add(self, sample_losses: torch.Tensor, sample_tokens: torch.Tensor, source: torch.Tensor) -> None:
        self.totals[0].index_add_(0, source, sample_losses.detach().double())
        self.totals[1].index_add_(0, source, sample_tokens.detach().double())

    def all_reduce(self, counted_here: bool) -> None:
        """Sum over all ranks; only ranks with `counted_here` contribute (one tensor-parallel rank
        of each last pipeline stage: the others computed the same numbers)."""
        if not counted_here:
            self.totals.zero_()
        dist.all_reduce(self.totals)

    def mean(self) -> float:
        sums, counts = self.totals.sum(1).tolist()
        return sums / max(counts, 1.0)

    def per_source(self, names: list[str]) -> dict[str, float]:
        sums, counts = self.totals.tolist()
        return {name: s / c for name, s, c in zip(names, sums, counts) if c > 0}
