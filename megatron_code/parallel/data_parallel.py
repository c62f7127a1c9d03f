"""Data parallelism on the mesh's dp dimension with FSDP2's engine: `replicate` (DDP: every rank
holds everything, gradients all-reduced) or `fully_shard` (ZeRO-2: gradients and optimizer state
sharded; ZeRO-3: parameters too, gathered per layer for forward and backward).

Each transformer layer is its own communication group, so one layer's gradient reduction
overlaps the backward of the layers before it. Tensor-parallel DTensor weights compose: FSDP
shards them further over dp, and checkpoints still hold canonical full shapes.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard


def apply_dp(model: nn.Module, dp_mesh: DeviceMesh, dp_shard: str) -> None:
    """Wrap each layer, then the model (embedding, final norm, head) as the root group.

    Gradients are summed over data-parallel ranks, not averaged: each rank's loss is already
    divided by the token count of the whole global batch."""
    if dp_mesh.size() == 1:
        return
    for block in model.layers.values():
        _wrap(block, dp_mesh, dp_shard, root=False)
    _wrap(model, dp_mesh, dp_shard, root=True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no pre-multiplied sum


def shard_dim(param: nn.Parameter, ranks: int) -> Shard | None:
    """Where FSDP cuts a parameter: its first dimension that `ranks` divide and tensor
    parallelism leaves whole, else dim 0 (padded). FSDP's own default, dim 0, would give the
    fused gate/up weight (2, ffn, hidden) to two ranks only: with 4 data-parallel ranks two hold
    twice their share of it and two none, and every gather pads it to twice its size."""
    local = param.to_local() if isinstance(param, DTensor) else param
    tp_dims = {p.dim for p in param.placements if isinstance(p, Shard)} if isinstance(param, DTensor) else set()
    return next((Shard(d) for d, n in enumerate(local.shape) if n % ranks == 0 and d not in tp_dims), None)


def _wrap(module: nn.Module, mesh: DeviceMesh, dp_shard: str, root: bool) -> None:
    if dp_shard == "none":
        replicate(module, mesh=mesh)
    else:  # the root's parameters are needed again at once by the loss and backward: keep them
        fully_shard(module, mesh=mesh, reshard_after_forward=dp_shard == "zero3" and not root,
                    shard_placement_fn=functools.partial(shard_dim, ranks=mesh.size()))
