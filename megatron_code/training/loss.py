"""The language-modelling loss over a (micro) batch."""
from __future__ import annotations

import torch


def loss_fn(model: torch.nn.Module, batch: dict, ops, token_count: int) -> torch.Tensor:
    """Sum of per-token losses over loss-masked tokens, divided by the global batch's count, so
    accumulated micro batches add up to the global mean. With the model's
    `fused_linear_cross_entropy`, the output projection runs inside the chunked loss."""
    labels = batch["labels"].flatten()
    if model.config.fused_linear_cross_entropy:
        hidden = model(batch["tokens"], batch["position_ids"], return_hidden=True)
        losses = ops.fused_linear_cross_entropy(hidden.flatten(0, 1), model.output_weight, labels)
    else:
        logits = model(batch["tokens"], batch["position_ids"])
        losses = ops.cross_entropy(logits.flatten(0, 1), labels)
    return (losses * batch["loss_mask"].flatten()).sum() / token_count
