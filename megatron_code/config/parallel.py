"""The parallel section: tensor, sequence, pipeline and data parallel layout."""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import ConfigError, check_choice

PIPELINE_SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble")


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel ranks T: heads, MLP width and vocabulary are split over them."""
    pipeline: int = 1
    """Pipeline-parallel ranks P. Data parallel = world size / (T x P)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank V (P x V stages in all); interleaved schedules need V >= 2."""
    schedule: str = "1f1b"
    """1f1b | interleaved_1f1b | zero_bubble (ZB1P: the backward split into input and weight
    gradients, weight gradients filling the bubble; any virtual_stages)."""
    layers_per_stage: list[int] = field(default_factory=list)
    """Explicit pipeline split: layers of each of the P x V stages, in order; empty = even split."""
    sequence_parallel: bool = False
    """Norms, residual adds and stage-to-stage activations hold 1/T of the sequence per rank."""
    dp_shard: str = "none"
    """none (replicated, DDP) | zero2 (gradients and optimizer state sharded, FSDP2) | zero3 (parameters too)."""
    grad_reduce: str = "micro_batch"
    """When zero2/zero3 reduce-scatter gradients over the data-parallel ranks. micro_batch: each
    layer's gradient as soon as a micro batch's backward has computed it, so a rank never holds
    more than its shard plus one layer's full gradient (ZeRO's memory at peak; zero3 also reshards
    parameters after each backward, under pipelining too). step: accumulate full, unsharded
    gradients over the step's micro batches and reduce-scatter once at the end (1/m of the
    reduce-scatter traffic for m micro batches per rank, at 4 bytes per parameter of unsharded
    gradients; under pipelining the stages' parameters also stay gathered for the whole step).
    dp_shard=none (DDP) always all-reduces once per step: its gradients are full-size anyway."""
    activation_checkpointing: str = "none"
    """none | selective (recompute attention's core in backward) | full (recompute every layer)."""

    def validate(self) -> None:
        check_choice("parallel.schedule", self.schedule, PIPELINE_SCHEDULES)
        check_choice("parallel.dp_shard", self.dp_shard, ("none", "zero2", "zero3"))
        check_choice("parallel.grad_reduce", self.grad_reduce, ("micro_batch", "step"))
        check_choice("parallel.activation_checkpointing", self.activation_checkpointing, ("none", "selective", "full"))
        for name in ("tensor", "pipeline", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1 (it splits the "
                              "sequence over the tensor-parallel ranks)")
        if self.pipeline == 1 and (self.virtual_stages > 1 or self.layers_per_stage):
            field_name = "virtual_stages" if self.virtual_stages > 1 else "layers_per_stage"
            raise ConfigError(f"parallel.{field_name} is set but parallel.pipeline=1")
        if self.pipeline > 1:
            if self.schedule == "1f1b" and self.virtual_stages > 1:
                raise ConfigError(f"parallel.schedule=1f1b runs one stage per rank, got parallel.virtual_stages="
                                  f"{self.virtual_stages}; use interleaved_1f1b or zero_bubble")
            if self.schedule == "interleaved_1f1b" and self.virtual_stages < 2:
                raise ConfigError("parallel.schedule=interleaved_1f1b needs parallel.virtual_stages >= 2")
        if self.grad_reduce == "step" and self.dp_shard == "none":
            raise ConfigError("parallel.grad_reduce=step applies to dp_shard=zero2|zero3; dp_shard=none (DDP) "
                              "already all-reduces gradients once per step")
        if self.pipeline > 1 and self.schedule == "zero_bubble" and self.dp_shard != "none" \
                and self.grad_reduce == "micro_batch":
            raise ConfigError(f"parallel.schedule=zero_bubble splits each backward into input and weight passes, "
                              f"which FSDP cannot reduce per micro batch: with parallel.dp_shard={self.dp_shard} "
                              "set parallel.grad_reduce=step (unsharded gradients and parameters for the step)")
        if self.layers_per_stage:
            if len(self.layers_per_stage) != self.num_stages:
                raise ConfigError(f"parallel.layers_per_stage has {len(self.layers_per_stage)} entries; "
                                  f"pipeline x virtual_stages = {self.num_stages} stages need one each")
            if min(self.layers_per_stage) < 1:
                raise ConfigError(f"parallel.layers_per_stage={self.layers_per_stage}: every stage needs a layer")

    @property
    def num_stages(self) -> int:
        return self.pipeline * self.virtual_stages

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline)
