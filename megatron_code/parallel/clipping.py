"""The global gradient norm over tensor, pipeline and data parallel ranks (for clipping, and the
step's non-finite check).

DTensor gradients (tensor-parallel shards, FSDP shards) reduce their norms over the mesh with
each element counted once, replicated weights included; pipeline stages hold disjoint parameters,
so their squared norms add up. A weight held by two stages (the tied embedding) is left out on
one of them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def global_grad_norm(params: list[torch.Tensor], pp_group: dist.ProcessGroup | None,
                     duplicates: list[torch.Tensor] = ()) -> torch.Tensor:
    """The global L2 norm of the gradients, the same on every rank. A NaN or infinity in any
    rank's gradients makes every rank's norm non-finite: the norm is reduced over the ranks that
    shard the gradients, and data-parallel replicas hold gradients already summed over replicas."""
    skip = {id(p) for p in duplicates}
    grads = [p.grad for p in params if p.grad is not None and id(p) not in skip]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        squared = norm.pow(2)
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    return norm
