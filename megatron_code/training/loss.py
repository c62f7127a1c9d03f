"""The language-modelling loss: the output head and per-token cross-entropy on the last stage's
hidden states (vocabulary-parallel under tensor parallelism: full logits are never gathered),
and the per-source loss totals a step reports."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_code.parallel.tensor_parallel import TensorParallel, local

NO_TENSOR_PARALLEL = TensorParallel(None)


def sample_losses(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, ops,
                  tp: TensorParallel = NO_TENSOR_PARALLEL) -> torch.Tensor:
    """Each sample's loss summed over its loss-masked tokens, (B,) fp32, from hidden states after
    the final norm (a sequence shard under SP): the one loss of training, evaluation, the model
    benchmark and the tests. Training divides the step's total by the global batch's loss-token
    count, so accumulated micro batches add up to the global mean.

    Each tensor-parallel rank projects onto its vocabulary slice of the head; the loss kernels
    reduce over the tensor-parallel group, so every rank gets every token's loss. The softmax spans
    the tokenizer's ids: vocabulary padding takes no probability. With `fused_linear_cross_entropy`
    the head runs inside the chunked loss."""
    weight = local(model.output_weight)
    if model.config.fused_linear_cross_entropy:
        hidden = tp.gather(hidden, reduce_grad=False)  # the fused kernel sums the input gradient itself
        losses = ops.fused_linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), tp_group=tp.group,
                                                vocab_size=model.config.real_vocab_size)
    else:
        logits = F.linear(tp.gather(hidden), weight)  # (B, T, V / T)
        losses = ops.cross_entropy(logits.flatten(0, 1), labels.flatten(), tp_group=tp.group,
                                   vocab_size=model.config.real_vocab_size)
    return (losses.view(labels.shape) * loss_mask).sum(1)


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


def pack_target(batch: dict) -> torch.Tensor:
    """labels, loss mask and source of each sample as one (B, 2T + 1) float64 tensor: the pipeline
    schedule splits a single target tensor into micro batches (float64 holds the ids exactly)."""
    return torch.cat([batch["labels"].double(), batch["loss_mask"].double(), batch["source"].double()[:, None]], 1)


def unpack_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq = (target.shape[1] - 1) // 2
    return target[:, :seq].long(), target[:, seq:2 * seq].float(), target[:, -1].long()
