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

    def all_reduce(self, counted_here: bool, votes: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks; only ranks with `counted_here` contribute (one tensor-parallel rank
        of each last pipeline stage: the others computed the same numbers). `votes` (float64,
        every rank's own) travel in the same all-reduce and come back summed over ranks: the
        step's stop requests need no collective of their own."""
        packed = torch.cat([self.totals.flatten() if counted_here else torch.zeros_like(self.totals).flatten(), votes])
        dist.all_reduce(packed)
        self.totals.copy_(packed[:self.totals.numel()].view_as(self.totals))
        return packed[self.totals.numel():]

