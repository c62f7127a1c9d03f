"""Tensor and sequence parallelism (Megatron's layout) on DTensor, entering the model only through
its `LayerFactory` and `KernelOps`.

Weights are DTensors on the tensor-parallel mesh: column-parallel layers shard their output
features, row-parallel layers their input features, embeddings their rows (vocabulary-parallel),
norm weights are replicated. A checkpoint therefore stores each weight in its full, canonical
shape whatever T is (DCP writes every shard with its placement), and gradient clipping counts a
replicated weight once.

Compute runs on local shards: the model and our Triton kernels only ever see plain tensors. The
activation collectives of Megatron's "regions" are DTensor redistributions of local tensors:

  gather  (entering a column-parallel layer, or the output head)
          forward: identity, or all-gather of the sequence under SP
          backward: all-reduce of the partial input gradients, or reduce-scatter under SP
  reduce  (leaving a row-parallel layer or the embedding)
          forward: all-reduce of partial sums, or reduce-scatter to sequence shards under SP
          backward: identity, or all-gather under SP

Under sequence parallelism the residual stream between layers, the norms and the activations sent
between pipeline stages hold 1/T of the sequence (dim 1) per rank.

Where each parameter's gradient is reduced, and why (T tensor-parallel ranks, SP = sequence
parallel; the activation collectives above are not repeated here):

  parameter                          placement   gradient on a rank after backward      reduced
  ---------------------------------  ----------  -------------------------------------  ---------------------------
  column-parallel weight (qkv, MLP   Shard(out)  complete for its output slice: the     never over tp
  up, untied output head)                        full input was gathered first
  row-parallel weight (attention     Shard(in)   complete for its input slice: its      never over tp
  out, MLP down)                                 input features live only here
  vocab-parallel embedding (and the  Shard(0)    complete for its rows (other ranks'    never over tp
  tied head)                                     ids give zero rows)
  replicated weight (norm weight     Replicate   without SP: complete and equal on      never over tp
  and bias), no SP                               every rank (every rank saw every
                                                 token)
  replicated weight under SP         Replicate   PARTIAL: a sum over this rank's        `reduce_replicated_grads`:
                                                 sequence shard only (marked            one all-reduce over tp per
                                                 Replicate, not yet true)               step, all of them in one
                                                                                        flat bucket, after the last
                                                                                        micro batch, before clipping
  every parameter, over dp           --          this rank's micro batches              FSDP2 / replicate: per layer
                                                                                        in backward (data_parallel.py)
  tied embedding under PP            --          one stage's share                      `TiedEmbedding.sync_grads`

The partial norm gradients are Megatron's choice too (its layernorm grads are all-reduced once,
after accumulation): reducing them in the backward instead costs 2L + 1 small blocking
all-reduces per micro batch.

Initialization does not depend on the layout, and never holds the whole model: the model is
built on the meta device, `apply_tp` gives each parameter its placement, the pipeline split,
activation checkpointing and FSDP follow, and only then `materialize` allocates this rank's
shards and fills them one parameter at a time: each factory weight is drawn in full from a
generator seeded by (seed, parameter name), this rank's shard kept and the rest dropped; every
other module sets its own tensors (`reset_parameters`: norms, RoPE tables). Every layout gets
the same values as one process.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from megatron_code.kernels.ops import KernelOps
from megatron_code.model.gpt import LayerFactory


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (gradients flow back with its placement), or the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class TensorParallel:
    """The tensor-parallel mesh and the collectives of its regions. With one rank (or none) every
    method is the identity, so the same layers serve every layout."""

    def __init__(self, mesh: DeviceMesh | None, sequence_parallel: bool = False):
        self.mesh = mesh if mesh is not None and mesh.size() > 1 else None
        self.sequence_parallel = sequence_parallel and self.mesh is not None

    @property
    def size(self) -> int:
        return self.mesh.size() if self.mesh is not None else 1

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank() if self.mesh is not None else 0

    @property
    def group(self):
        """The process group vocab-parallel losses reduce over (None without TP)."""
        return self.mesh.get_group() if self.mesh is not None else None

    @staticmethod
    def local(tensor: torch.Tensor) -> torch.Tensor:
        return local(tensor)

    @property
    def _activation_placement(self):
        return Shard(1) if self.sequence_parallel else Replicate()

    def sequence_shard(self, length: int) -> int:
        """Tokens per sample that one rank holds between layers."""
        return length // self.size if self.sequence_parallel else length

    def gather(self, x: torch.Tensor, reduce_grad: bool = True) -> torch.Tensor:
        """The full activation for a column-parallel matmul. `reduce_grad=False` when the consumer
        already returns a summed input gradient (the vocab-parallel fused linear + loss does)."""
        if self.mesh is None:
            return x
        full = DTensor.from_local(x, self.mesh, [self._activation_placement]).redistribute(placements=[Replicate()])
        return full.to_local(grad_placements=[Partial() if reduce_grad else Replicate()])

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial output, laid out as the residual stream (sequence shard under SP)."""
        if self.mesh is None:
            return partial
        summed = DTensor.from_local(partial, self.mesh, [Partial()]).redistribute(placements=[self._activation_placement])
        return summed.to_local()

    def replicated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Local view of a replicated weight. Its gradient keeps the Replicate placement; under SP
        it is only this rank's tokens' share until `reduce_replicated_grads` sums it."""
        return local(weight)

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full tensor every rank holds alike (no communication)."""
        if self.mesh is None:
            return full
        return distribute_tensor(full, self.mesh, [Shard(dim)], src_data_rank=None)

    def replicate(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.mesh is None:
            return tensor
        return distribute_tensor(tensor, self.mesh, [Replicate()], src_data_rank=None)


class ParallelLinear(nn.Module):
    """A bias-free linear layer split over the tensor-parallel ranks. "column" splits the output
    features (qkv, MLP up, output head): the input is gathered, the output stays local. "row"
    splits the input features (attention output, MLP down): the partial outputs are reduced.
    The weight is (out, in), or (parts, out, in) for fused column projections (see FusedLinear):
    each rank then holds a slice of every part, e.g. its own gate and up rows."""

    def __init__(self, in_features: int, out_features: int, parallel: str, init_std: float, parts: int,
                 tp: TensorParallel):
        super().__init__()
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        shape = (out_features, in_features) if parts == 1 else (parts, out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device="meta"))
        self.parallel, self.init_std, self.tp = parallel, init_std, tp
        self.shard_dim = len(shape) - (2 if parallel == "column" else 1)

    def forward(self, x):
        weight = local(self.weight)
        if self.parallel == "column":
            return F.linear(self.tp.gather(x), weight.flatten(0, -2))  # (..., parts * out / T)
        return self.tp.reduce(F.linear(x, weight))


class VocabParallelEmbedding(nn.Module):
    """An embedding table whose rows are split over the tensor-parallel ranks: each rank looks up
    the ids in its slice, zeros elsewhere, and the partial lookups are reduced."""

    def __init__(self, num: int, dim: int, init_std: float, tp: TensorParallel):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim, device="meta"))
        self.init_std, self.tp, self.shard_dim = init_std, tp, 0

    def forward(self, ids):
        weight = local(self.weight)
        if self.tp.mesh is None:
            return F.embedding(ids, weight)
        local_ids = ids - self.tp.rank * weight.shape[0]
        outside = (local_ids < 0) | (local_ids >= weight.shape[0])
        rows = F.embedding(local_ids.masked_fill(outside, 0), weight)
        return self.tp.reduce(rows.masked_fill(outside.unsqueeze(-1), 0.0))


@dataclass(frozen=True)
class ParallelLayerFactory(LayerFactory):
    """The trainer's layer factory: empty layers, split by `apply_tp`, filled by `materialize`."""
    tp: TensorParallel = dataclasses.field(default_factory=lambda: TensorParallel(None))

    def linear(self, in_features: int, out_features: int, parallel: str, init_std: float,
               parts: int = 1) -> nn.Module:
        return ParallelLinear(in_features, out_features, parallel, init_std, parts, self.tp)

    def embedding(self, num: int, dim: int, init_std: float) -> nn.Module:
        return VocabParallelEmbedding(num, dim, init_std, self.tp)


def tensor_parallel_ops(ops: KernelOps, tp: TensorParallel) -> KernelOps:
    """`ops` whose norms take a replicated DTensor weight: the kernels run on the local weight."""
    if tp.mesh is None:
        return ops
    weight = tp.replicated_weight

    def rms_norm(x, w, eps, residual=None):
        return ops.rms_norm(x, weight(w), eps, residual)

    def layer_norm(x, w, b, eps):
        return ops.layer_norm(x, weight(w), None if b is None else weight(b), eps)

    return dataclasses.replace(ops, rms_norm=rms_norm, layer_norm=layer_norm)


def apply_tp(model: nn.Module, tp: TensorParallel) -> None:
    """Give every parameter of a model built on the meta device its place on the tensor-parallel
    mesh: the factory's layers sharded along their split dimension, everything else replicated."""
    if tp.mesh is None:
        return
    for module in model.modules():
        split = isinstance(module, (ParallelLinear, VocabParallelEmbedding))
        for name, param in list(module.named_parameters(recurse=False)):
            placed = tp.shard(param, module.shard_dim) if split else tp.replicate(param)
            setattr(module, name, nn.Parameter(placed, requires_grad=param.requires_grad))


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` laid out as `param` (a DTensor over any mesh: tp, dp or both)."""
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


@torch.no_grad()
def materialize(model: nn.Module, module_names: dict[nn.Module, str], seed: int, device: torch.device) -> None:
    """Allocate this rank's shards of a model built on the meta device and fill them, one
    parameter at a time: the factory's layers N(0, init_std), each drawn in full from its own
    (seed, name) generator and cut to this rank's shard; every other module through its
    `reset_parameters`. `module_names` are the single-process model's names, taken before
    activation checkpointing or FSDP wrapped anything."""
    model.to_empty(device=device)
    for module, name in module_names.items():
        if isinstance(module, (ParallelLinear, VocabParallelEmbedding)):
            full = torch.empty(module.weight.shape, device=device)
            full.normal_(0.0, module.init_std, generator=_generator(seed, f"{name}.weight", device))
            local(module.weight).copy_(_shard_of(full, module.weight))
            del full
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


def replicated_over_tp(param: torch.Tensor) -> bool:
    """A weight every tensor-parallel rank holds whole (a norm's), whatever else shards it."""
    if not isinstance(param, DTensor) or "tp" not in (param.device_mesh.mesh_dim_names or ()):
        return False
    return param.placements[param.device_mesh.mesh_dim_names.index("tp")].is_replicate()


def reduce_replicated_grads(params: list[torch.Tensor], tp: TensorParallel) -> None:
    """Under SP, sum the gradients of the replicated weights (each rank's covers only its sequence
    shard) over the tensor-parallel ranks: one all-reduce of one flat bucket, once per step."""
    if not tp.sequence_parallel:
        return
    grads = [local(p.grad) for p in params if p.grad is not None and replicated_over_tp(p)]
    if not grads:
        return
    bucket = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(bucket, group=tp.group)
    for grad, summed in zip(grads, bucket.split([g.numel() for g in grads])):
        grad.copy_(summed.view_as(grad))
