"""The language-modelling loss over a (micro) batch."""
from __future__ import annotations

import torch


def token_losses(model: torch.nn.Module, batch: dict, ops) -> torch.Tensor:
    """Per-token losses (batch, seq), zero where the loss mask is. With the model's
    `fused_linear_cross_entropy`, the output projection runs inside the chunked loss."""
    labels = batch["labels"].flatten()
    if model.config.fused_linear_cross_entropy:
        hidden = model(batch["tokens"], batch["position_ids"], return_hidden=True)
        losses = ops.fused_linear_cross_entropy(hidden.flatten(0, 1), model.output_weight, labels)
    else:
        logits = model(batch["tokens"], batch["position_ids"])
        losses = ops.cross_entropy(logits.flatten(0, 1), labels)
    return (losses * batch["loss_mask"].flatten()).view(batch["labels"].shape)


def loss_fn(model: torch.nn.Module, batch: dict, ops, token_count: int) -> torch.Tensor:
    """Sum of per-token losses over loss-masked tokens, divided by the global batch's count, so
    accumulated micro batches add up to the global mean."""
    return token_losses(model, batch, ops).sum() / token_count


def per_source_loss(losses: torch.Tensor, batch: dict, num_sources: int) -> torch.Tensor:
    """(2, num_sources) float64: summed token loss and loss-token count per source (the batch's
    `source` column), to be added up over micro batches and divided once per step."""
    out = torch.zeros(2, num_sources, dtype=torch.float64, device=losses.device)
    out[0].index_add_(0, batch["source"], losses.detach().sum(1).double())
    out[1].index_add_(0, batch["source"], batch["loss_mask"].sum(1).double())
    return out
