"""The language-modelling loss, math only: the output head and per-token cross-entropy on the
last stage's hidden states, and the normalization that makes a step's micro batches add up to
the per-token mean of its whole global batch.

How the head is split over tensor-parallel ranks comes in from outside, as the model's layers
do: a `HeadSplit` (parallel/tensor_parallel.py's `TensorParallel` is the split one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class HeadSplit(Protocol):
    """The output head's view of tensor parallelism: each rank holds a vocabulary slice of the
    head, so the loss kernels reduce over `group`."""

    group: object
    """The process group the vocabulary-parallel loss kernels reduce over (None: one rank)."""

    def gather(self, hidden: torch.Tensor, reduce_grad: bool = True) -> torch.Tensor:
        """The full hidden states (from sequence shards under SP); `reduce_grad=False` when the
        consumer returns an input gradient already summed over the ranks."""

    def local(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the head weight, as a plain tensor."""


class Unsplit:
    """One rank: the whole head, nothing to gather or reduce."""

    group = None

    @staticmethod
    def gather(hidden: torch.Tensor, reduce_grad: bool = True) -> torch.Tensor:
        return hidden

    @staticmethod
    def local(weight: torch.Tensor) -> torch.Tensor:
        return weight


UNSPLIT = Unsplit()


def sample_losses(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, ops,
                  split: HeadSplit = UNSPLIT) -> torch.Tensor:
    """Each sample's loss summed over its loss-masked tokens, (B,) fp32, from hidden states after
    the final norm (a sequence shard under SP): the one loss of training, evaluation, the model
    benchmark and the tests.

    Each tensor-parallel rank projects onto its vocabulary slice of the head; the loss kernels
    reduce over the tensor-parallel group, so every rank gets every token's loss. The softmax spans
    the tokenizer's ids: vocabulary padding takes no probability. With `fused_linear_cross_entropy`
    the head runs inside the chunked loss."""
    weight = split.local(model.output_weight)
    if model.config.fused_linear_cross_entropy:
        hidden = split.gather(hidden, reduce_grad=False)  # the fused kernel sums the input gradient itself
        losses = ops.fused_linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), tp_group=split.group,
                                                vocab_size=model.config.real_vocab_size)
    else:
        logits = F.linear(split.gather(hidden), weight)  # (B, T, V / T)
        losses = ops.cross_entropy(logits.flatten(0, 1), labels.flatten(), tp_group=split.group,
                                   vocab_size=model.config.real_vocab_size)
    return (losses.view(labels.shape) * loss_mask).sum(1)


@dataclass(frozen=True)
class StepLoss:
    """The loss of one optimizer step, built per step and handed to whatever runs the micro
    batches (a plain loop, or a pipeline schedule through its `loss_kwargs`).

    A micro batch's loss is its masked loss sum divided by `token_count`, the loss tokens of the
    whole global batch (every micro batch of every data-parallel rank): gradients summed over
    micro batches and ranks are then those of the global per-token mean, whatever each micro
    batch's share of loss tokens (instruction data: answers of different lengths). Dividing by
    each micro batch's own count instead would weight a token of a short answer more."""

    labels: torch.Tensor
    """(B, T) this rank's samples of the step, micro batches concatenated."""
    loss_mask: torch.Tensor
    """(B, T) 1 where a token counts."""
    source: torch.Tensor
    """(B,) index of each sample's data source."""
    token_count: torch.Tensor | float
    """Loss tokens in the whole global batch, at least 1 (1: plain per-sample sums, evaluation)."""
    record: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
    """Gets each micro batch's per-sample (loss sums, loss-token counts, sources), detached."""

    def __call__(self, losses: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """The loss to backpropagate for the samples `rows` (indices into this step's samples),
        given their per-sample loss sums `losses` (`sample_losses`)."""
        self.record(losses.detach(), self.loss_mask[rows].sum(1), self.source[rows])
        return losses.sum() / self.token_count
