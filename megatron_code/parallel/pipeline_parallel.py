"""Pipeline parallelism with torch.distributed.pipelining: which layers each stage holds, which
stages this rank runs, the schedule that drives them, and the tied embedding held by two stages.

A stage is the GPT with the other stages' modules removed, so parameter names stay those of the
single-process model: the first stage keeps the embedding, the last the final norm and the head.
With tied embeddings the last stage keeps the embedding too, as its head weight; the two copies
get one gradient, the sum of both stages' (`TiedEmbedding`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble, ScheduleLoopedBFS)

from megatron_code.config import ParallelConfig
from megatron_code.model import GPT
from megatron_code.parallel.distributed import Runtime
from megatron_code.parallel.tensor_parallel import local

_SCHEDULES = {"1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
              "zero_bubble": ScheduleInterleavedZeroBubble}


def stage_layers(num_layers: int, parallel: ParallelConfig) -> list[range]:
    """The global layer indices of each of the P x V stages, in pipeline order."""
    counts = parallel.layers_per_stage or [num_layers // parallel.num_stages] * parallel.num_stages
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(s, s + n) for s, n in zip(starts, counts)]


def local_stage_ids(pp_rank: int, parallel: ParallelConfig) -> list[int]:
    """Stages this pipeline rank runs, looped: r, r + P, r + 2P, ..."""
    return [pp_rank + v * parallel.pipeline for v in range(parallel.virtual_stages)]


def apply_pp(build_model: Callable[[], GPT], stage_ids: list[int], layers: list[range]) -> list[GPT]:
    """This rank's stages, each a freshly built model with the other stages' modules removed."""
    parts = []
    for stage in stage_ids:
        model = build_model()
        first, last = stage == 0, stage == len(layers) - 1
        for name in [n for n in model.layers if int(n) not in layers[stage]]:
            del model.layers[name]
        if not first:
            model.embeds_input = False  # its input is the previous stage's hidden states
            model.position_embedding = None
            if not (last and model.config.tie_embeddings):
                model.embedding = None
        if not last:
            model.norm = None
            model.output = None
        parts.append(model)
    return parts


class OwnBackward(torch.nn.Module):
    """A stage's model as the pipeline schedule sees it when FSDP is to reduce gradients after
    every micro batch. torch's stages (2.13) special-case an FSDP module: every micro batch's
    backward runs with gradient sync and resharding off (`backward_maybe_with_nosync`), one
    reduction at the step's end, and the multi-stage schedules all-gather whole stages (UNSHARD
    actions). A rank then holds its stages' unsharded parameters and gradients for the whole step.
    Behind this plain module the schedule runs an ordinary backward, and FSDP's own hooks
    reduce-scatter each layer's gradient as soon as it is computed and reshard its parameters,
    as in a loop without pipelining."""

    def __init__(self, part: GPT):
        super().__init__()
        self.part = part

    def forward(self, *args, **kwargs):
        return self.part(*args, **kwargs)


def build_stages(parts: list[torch.nn.Module], stage_ids: list[int], num_stages: int, runtime: Runtime,
                 micro_batch_size: int, seq_length: int, stream_length: int, hidden_size: int,
                 reduce_every_micro_batch: bool) -> list[PipelineStage]:
    """PipelineStages with static shapes (no inference pass): token ids (micro, seq) into the first
    stage, hidden states (micro, stream_length, hidden) fp32 between stages and out of the last.
    With `reduce_every_micro_batch` each part runs behind `OwnBackward`."""
    device = runtime.device
    hidden = torch.empty(micro_batch_size, stream_length, hidden_size, device="meta", requires_grad=True)
    tokens = torch.empty(micro_batch_size, seq_length, dtype=torch.long, device="meta")
    return [PipelineStage(OwnBackward(part) if reduce_every_micro_batch else part, stage, num_stages, device,
                          input_args=tokens if stage == 0 else hidden, output_args=hidden, group=runtime.group("pp"))
            for part, stage in zip(parts, stage_ids)]


def build_schedule(stages: list[PipelineStage], name: str, n_microbatches: int, loss_fn: Callable):
    """The training schedule `name`, or with name "eval" a forward-only one (run with `.eval()`).
    Gradients are not rescaled: our loss already divides by the global batch's token count."""
    if name == "eval":
        if len(stages) == 1:
            return ScheduleGPipe(stages[0], n_microbatches, loss_fn=loss_fn)
        return ScheduleLoopedBFS(stages, n_microbatches, loss_fn=loss_fn)
    cls = _SCHEDULES[name]
    if cls is Schedule1F1B:
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)


class TiedEmbedding:
    """The first stage's embedding and the last stage's head: one weight held twice. After each
    backward, every copy's gradient becomes the sum of both; the optimizer then keeps the copies
    equal. Gradient clipping counts the weight once (`duplicates`)."""

    def __init__(self, parts: list[GPT], stage_ids: list[int], num_stages: int, runtime: Runtime):
        self.parts = [part for part, stage in zip(parts, stage_ids) if stage in (0, num_stages - 1)]
        self.holds_last_only = (num_stages - 1) in stage_ids and 0 not in stage_ids
        # looped placement: the first stage on pipeline rank 0, the last on rank P - 1; pair those
        # two ranks for every (dp, tp) coordinate
        ranks = runtime.mesh.mesh  # (pp, dp, tp) -> global rank
        pairs = torch.stack([ranks[0], ranks[-1]], dim=-1).flatten(0, 1).tolist()
        self.group, _ = dist.new_subgroups_by_enumeration(pairs)

    def _weights(self) -> list[torch.Tensor]:
        return [part.embedding.weight for part in self.parts]

    def sync_grads(self) -> None:
        grads = [local(w.grad) for w in self._weights() if w.grad is not None]
        if not grads:
            return
        total = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        for grad in grads:
            grad.copy_(total)

    def duplicates(self) -> list[torch.Tensor]:
        """Copies to leave out of the gradient norm: all but one copy over the pipeline."""
        weights = self._weights()
        return weights if self.holds_last_only else weights[1:]
