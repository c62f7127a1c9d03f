"""The model as one rank holds it under any (tensor, pipeline, data) layout, and how a step's
micro batches run through it.

`build_model` applies the parallelisms from outside, to a model built on the meta device (no
memory): tensor parallel (the injected layer factory and kernel ops, then `apply_tp`), the
pipeline split, activation checkpointing, data parallel; only then `materialize` allocates this
rank's shards and initializes them, one parameter at a time, as one process would.
`ParallelModel` then runs forward and backward over this rank's micro batches (a pipeline
schedule when P > 1, a plain accumulation loop otherwise), evaluates batches under any layout,
clips gradients globally and is the checkpointer's "model" state, keyed by the single-process
model's parameter names.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule

from megatron_code.config import Config
from megatron_code.kernels.ops import build_attention, build_ops, describe_attention
from megatron_code.model import GPT
from megatron_code.model.loss import StepLoss, sample_losses
from megatron_code.parallel.activation_checkpointing import apply_ac
from megatron_code.parallel.clipping import global_grad_norm
from megatron_code.parallel.data_parallel import apply_dp
from megatron_code.parallel.distributed import Runtime
from megatron_code.parallel.pipeline_parallel import (TiedEmbedding, apply_pp, build_schedule, build_stages,
                                                      local_stage_ids, stage_layers)
from megatron_code.parallel.tensor_parallel import (ParallelLayerFactory, TensorParallel, apply_tp, local, materialize,
                                                    reduce_replicated_grads, tensor_parallel_ops)

EVAL_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")
"""What `evaluate` reads of a batch."""


class LossTotals(Protocol):
    """Where a step's per-sample losses go (training/loss.py's LossTotals)."""

    def add(self, sample_losses: torch.Tensor, sample_tokens: torch.Tensor, source: torch.Tensor) -> None: ...

    def all_reduce(self, counted_here: bool) -> None: ...


def build_model(config: Config, runtime: Runtime, autocast: Callable[[], contextlib.AbstractContextManager]
                ) -> "ParallelModel":
    p = config.parallel
    tp = TensorParallel(runtime.mesh["tp"], p.sequence_parallel)
    ops = tensor_parallel_ops(build_ops(config.model.kernels, runtime.device), tp)
    attention = build_attention(config.model.attention, runtime.device, config.model.head_dim)
    if runtime.is_main:
        print(f"kernels: {ops.name}; attention: {describe_attention(attention)}")
    stage_ids = local_stage_ids(runtime.coordinate("pp"), p)

    def build_on_meta() -> GPT:
        with torch.device("meta"):
            return GPT(config.model, ParallelLayerFactory(tp=tp), ops, attention)

    parts = apply_pp(build_on_meta, stage_ids, stage_layers(config.model.num_layers, p))
    for part in parts:
        apply_tp(part, tp)
        names = {module: name for name, module in part.named_modules()}  # before wrappers rename them
        apply_ac(part, p.activation_checkpointing)
        apply_dp(part, runtime.mesh["dp"], p.dp_shard)
        materialize(part, names, config.train.seed, runtime.device)
    tied = (TiedEmbedding(parts, stage_ids, p.num_stages, runtime)
            if config.model.tie_embeddings and p.pipeline > 1 else None)
    return ParallelModel(config, runtime, parts, stage_ids, ops, tp, tied, autocast)


class ParallelModel:
    def __init__(self, config: Config, runtime: Runtime, parts: list[GPT], stage_ids: list[int], ops,
                 tp: TensorParallel, tied: TiedEmbedding | None,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.config, self.runtime, self.parts, self.stage_ids = config, runtime, parts, stage_ids
        self.ops, self.tp, self.tied, self.autocast = ops, tp, tied, autocast
        num_stages = config.parallel.num_stages
        self.first = parts[stage_ids.index(0)] if 0 in stage_ids else None
        self.last = parts[stage_ids.index(num_stages - 1)] if num_stages - 1 in stage_ids else None
        self.pipelined = config.parallel.pipeline > 1
        self.micro_batch_size = config.train.micro_batch_size
        # zero2/zero3 reduce-scatter after every micro batch unless told to accumulate unsharded
        # gradients; DDP (dp_shard=none) all-reduces once per step: its gradients are full-size anyway
        parallel = config.parallel
        self.reduce_every_micro_batch = parallel.dp_shard != "none" and parallel.grad_reduce == "micro_batch"
        self._eval_schedules: dict[int, object] = {}
        if self.pipelined:
            dp = runtime.size("dp")
            n_micro = config.train.global_batch_size // (config.train.micro_batch_size * dp)
            self.schedule = build_schedule(self._stages(), config.parallel.schedule, n_micro, self._pipeline_loss)
        self._num_parameters = self._count_parameters()

    # ------------------------------------------------------------------------------------------
    # training step

    def forward_backward(self, micro_batches: list[dict], totals: LossTotals) -> None:
        """Forward and backward over this data-parallel rank's micro batches; gradients end up
        summed over data-parallel ranks and the tied embedding's copies. The loss is divided by
        the global batch's loss-token count (one all-reduce), and `totals` gets each micro
        batch's per-source loss sums on this rank (the trainer sums them over ranks, counting
        the ranks that `reports_loss`)."""
        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
        token_count = batch["loss_mask"].sum()
        if self.runtime.size("dp") > 1:
            dist.all_reduce(token_count, group=self.runtime.group("dp"))
        loss = StepLoss(batch["labels"], batch["loss_mask"], batch["source"], token_count.clamp(min=1.0), totals.add)
        if self.pipelined:
            rows = torch.arange(len(batch["tokens"]), device=batch["tokens"].device)
            with self.autocast():
                self.schedule.step(*self._pipeline_args(batch), target=rows if self.last else None,
                                   loss_kwargs={"loss": loss} if self.last else None, return_outputs=False,
                                   **self._stage_kwargs(batch))
        else:
            model, start = self.parts[0], 0
            for i, mb in enumerate(micro_batches):
                if isinstance(model, FSDPModule) and not self.reduce_every_micro_batch:
                    model.set_requires_gradient_sync(i == len(micro_batches) - 1)  # reduce once, at the end
                rows, start = slice(start, start + len(mb["tokens"])), start + len(mb["tokens"])
                with self.autocast():
                    hidden = model(mb["tokens"], **self._stage_kwargs(mb))
                    self._loss(model, hidden, rows, loss).backward()
        reduce_replicated_grads(self.parameters(), self.tp)
        if self.tied is not None:
            self.tied.sync_grads()

    @property
    def reports_loss(self) -> bool:
        """Whether this rank's loss totals count in a step's sum over ranks: one tensor-parallel
        rank of each last pipeline stage (the others computed the same numbers)."""
        return self.last is not None and self.tp.rank == 0

    def _loss(self, model: GPT, hidden: torch.Tensor, rows: torch.Tensor | slice, loss: StepLoss) -> torch.Tensor:
        losses = sample_losses(model, hidden, loss.labels[rows], loss.loss_mask[rows], self.ops, self.tp)
        return loss(losses, rows)

    def _pipeline_loss(self, hidden: torch.Tensor, rows: torch.Tensor, loss: StepLoss) -> torch.Tensor:
        """The schedule's loss_fn: `rows` is the micro batch's share of the step's row indices (the
        schedule splits the target into micro batches), `loss` comes per step through loss_kwargs."""
        return self._loss(self.last, hidden, rows, loss)

    def _pipeline_args(self, batch: dict) -> tuple:
        return (batch["tokens"],) if self.first is not None else ()

    @staticmethod
    def _stage_kwargs(batch: dict) -> dict:
        """What every stage's forward takes besides its input: positions, and the document ids
        that keep packed instruction examples apart."""
        return {"positions": batch["position_ids"], "document_ids": batch.get("document_ids"), "return_hidden": True}

    def _stages(self):
        cfg = self.config
        return build_stages(self.parts, self.stage_ids, cfg.parallel.num_stages, self.runtime, self.micro_batch_size,
                            cfg.data.seq_length, self.tp.sequence_shard(cfg.data.seq_length), cfg.model.hidden_size,
                            self.reduce_every_micro_batch)

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients over every rank, the same on every rank."""
        pp_group = self.runtime.group("pp") if self.pipelined else None
        duplicates = self.tied.duplicates() if self.tied is not None else []
        return global_grad_norm(self.parameters(), pp_group, duplicates)

    def clip_grads_(self, max_norm: float, norm: torch.Tensor) -> None:
        """Scale the gradients so that their global norm `norm` (from `grad_norm`) is at most
        `max_norm`."""
        torch.nn.utils.clip_grads_with_norm_([p for p in self.parameters() if p.grad is not None], max_norm, norm)

    def first_nonfinite(self, of: str) -> str | None:
        """The single-process model's name of the first parameter, in model order, whose gradient
        (`of="grad"`) or weight (`of="weight"`) holds a NaN or infinity on any rank; None if none
        does. A collective: every rank calls it (on a non-finite step, and before each save)."""
        named = [(stage, index, name.replace(_CHECKPOINT_PREFIX, ""), p.grad if of == "grad" else p.detach())
                 for stage, part in sorted(zip(self.stage_ids, self.parts), key=lambda pair: pair[0])
                 for index, (name, p) in enumerate(part.named_parameters())]
        named = [(stage, index, name, local(t)) for stage, index, name, t in named if t is not None]
        finite = torch.stack([torch.isfinite(t).all() for *_, t in named]).tolist() if named else []
        found = next(((stage, index, name) for (stage, index, name, _), ok in zip(named, finite) if not ok), None)
        everyone = [None] * self.runtime.world_size
        dist.all_gather_object(everyone, found)
        return min((f for f in everyone if f is not None), default=(0, 0, None))[2]

    # ------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def evaluate(self, batch: dict, split_over_data_parallel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (masked loss sum, loss-token count) of `batch` -- tokens, labels, loss_mask,
        optionally position_ids and document_ids; any number of samples -- returned on every
        rank. By default every rank passes the same batch and data-parallel ranks each evaluate
        a contiguous share; with `split_over_data_parallel=False` each data-parallel rank passes its own
        samples and gets their results."""
        tokens = batch["tokens"]
        batch = {"position_ids": torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens),
                 **{k: batch[k] for k in EVAL_KEYS if k in batch}}
        batch = self._pad_sequence(batch)
        dp = self.runtime.size("dp") if split_over_data_parallel else 1
        size = tokens.shape[0]
        share = math.ceil(size / dp)
        if dp > 1:  # pad to dp equal shares (padding rows carry no loss tokens), keep this rank's
            rows = torch.arange(share * dp, device=tokens.device)
            batch = {k: v[rows.clamp(max=size - 1)] for k, v in batch.items()}
            batch["loss_mask"] = batch["loss_mask"] * (rows < size)[:, None]
            start = self.runtime.coordinate("dp") * share
            batch = {k: v[start:start + share] for k, v in batch.items()}
        for part in self.parts:
            part.eval()
        try:
            result = self._evaluate_share(batch)
        finally:
            for part in self.parts:
                part.train()
        if dp > 1:
            gathered = result.new_empty(dp * 2, share)
            dist.all_gather_into_tensor(gathered, result, group=self.runtime.group("dp"))
            result = gathered.view(dp, 2, share).transpose(0, 1).flatten(1)
        return result[0, :size], result[1, :size]

    def _pad_sequence(self, batch: dict) -> dict:
        """Right-pad the sequence to what the layout runs: pipeline stages exchange activations of
        data.seq_length tokens, sequence parallel splits it into T equal parts. Padding carries
        no loss tokens, and causal attention keeps it from the real tokens."""
        width, seq_length = batch["tokens"].shape[1], self.config.data.seq_length
        if self.pipelined:
            if width > seq_length:
                raise ValueError(f"evaluation batch of {width} tokens per sample is longer than data.seq_length="
                                 f"{seq_length}, which the pipeline stages run")
            target = seq_length
        elif self.tp.sequence_parallel:
            target = -(-width // self.tp.size) * self.tp.size
        else:
            return batch
        return {k: torch.nn.functional.pad(v, (0, target - width)) for k, v in batch.items()}

    def _evaluate_share(self, batch: dict) -> torch.Tensor:
        """(2, n) sums and counts of this rank's samples, on every rank of its pipeline."""
        n, mbs = batch["tokens"].shape[0], self.micro_batch_size
        rows = []
        source = torch.zeros(n, dtype=torch.long, device=batch["tokens"].device)
        if not self.pipelined:
            loss = StepLoss(batch["labels"], batch["loss_mask"], source, 1.0,
                            lambda losses, tokens, _: rows.append(torch.stack([losses, tokens])))
            model = self.parts[0]
            for s in range(0, n, mbs):
                mb = {k: v[s:s + mbs] for k, v in batch.items()}
                with self.autocast():
                    hidden = model(mb["tokens"], **self._stage_kwargs(mb))
                    self._loss(model, hidden, slice(s, s + mbs), loss)
            return torch.cat(rows, 1).double()
        n_micro = math.ceil(n / mbs)
        index = torch.arange(n_micro * mbs, device=batch["tokens"].device).clamp(max=n - 1)  # whole micro batches
        full = {k: v[index] for k, v in batch.items()}
        loss = StepLoss(full["labels"], full["loss_mask"], source[index], 1.0,
                        lambda losses, tokens, _: rows.append(torch.stack([losses, tokens])))
        if n_micro not in self._eval_schedules:
            self._eval_schedules[n_micro] = build_schedule(self._stages(), "eval", n_micro, self._pipeline_loss)
        rows_of_full = torch.arange(len(index), device=index.device)
        with self.autocast():  # the loss runs inside the schedule, while FSDP still holds the full head
            self._eval_schedules[n_micro].eval(*self._pipeline_args(full), target=rows_of_full if self.last else None,
                                               loss_kwargs={"loss": loss} if self.last else None,
                                               **self._stage_kwargs(full))
        out = torch.cat(rows, 1)[:, :n].double() if self.last is not None else torch.zeros(
            2, n, dtype=torch.float64, device=index.device)
        dist.broadcast(out, src=self.runtime.mesh["pp"].mesh[-1].item(), group=self.runtime.group("pp"))
        return out

    # ------------------------------------------------------------------------------------------
    # parameters and state

    def parameters(self) -> list[torch.nn.Parameter]:
        seen, out = set(), []
        for part in self.parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _count_parameters(self) -> int:
        skip = {id(p) for p in self.tied.duplicates()} if self.tied is not None else set()
        count = torch.tensor(sum(p.numel() for p in self.parameters() if id(p) not in skip), dtype=torch.float64,
                             device=self.runtime.device)
        if self.pipelined:
            dist.all_reduce(count, group=self.runtime.group("pp"))
        return int(count.item())

    def num_parameters(self) -> int:
        """Parameters of the whole model (all stages, full shapes), each counted once."""
        return self._num_parameters

    def train(self) -> None:
        for part in self.parts:
            part.train()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's parameters under the single-process model's names, as DTensors where
        sharded (the tied embedding, held by two stages, appears once per rank holding it)."""
        state = {}
        for part in self.parts:
            state.update(get_model_state_dict(part))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for part in self.parts:
            names = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: state[k] for k in names})
