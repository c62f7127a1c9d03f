"""Gradient clipping by the global norm over tensor, pipeline and data parallel ranks.

DTensor gradients (tensor-parallel shards, FSDP shards) reduce their norms over the mesh with
each element counted once, replicated weights included; pipeline stages hold disjoint parameters,
so their squared norms add up. A weight held by two stages (the tied embedding) is left out on
one of them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None,
                    duplicates: list[torch.Tensor] = ()) -> torch.Tensor:
    """Scale the gradients in place so their global L2 norm is at most `max_norm` (inf: measure
    only); returns the norm before clipping, the same on every rank."""
    skip = {id(p) for p in duplicates}
    grads = [p.grad for p in params if p.grad is not None and id(p) not in skip]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        squared = norm.pow(2)
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm
