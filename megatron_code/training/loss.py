"""The language-modelling loss over a (micro) batch."""
from __future__ import annotations

import torch


def loss_fn(model: torch.nn.Module, batch: dict, cross_entropy, token_count: int) -> torch.Tensor:
    """Sum of per-token losses over loss-masked tokens, divided by the global batch's count, so
    accumulated micro batches add up to the global mean."""
    logits = model(batch["tokens"], batch["position_ids"])
    losses = cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    return (losses * batch["loss_mask"].flatten()).sum() / token_count
