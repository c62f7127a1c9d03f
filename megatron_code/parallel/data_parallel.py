"""Data parallelism on the mesh's dp dimension with FSDP2's engine: `replicate` (DDP: every rank
holds everything, gradients all-reduced) or `fully_shard` (ZeRO-2: gradients and optimizer state
sharded; ZeRO-3: parameters too, gathered per layer for forward and backward).

Each transformer layer is its own communication group, so one layer's gradient reduction
overlaps the backward of the layers before it. Tensor-parallel DTensor weights compose: FSDP
shards them further over dp, and checkpoints still hold canonical full shapes.
"""
from __future__ import annotations

from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard


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


def _wrap(module: nn.Module, mesh: DeviceMesh, dp_shard: str, root: bool) -> None:
    if dp_shard == "none":
        replicate(module, mesh=mesh)
    else:  # the root's parameters are needed again at once by the loss and backward: keep them
        fully_shard(module, mesh=mesh, reshard_after_forward=dp_shard == "zero3" and not root)
