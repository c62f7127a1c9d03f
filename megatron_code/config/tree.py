"""The whole config: one section per field, validated field by field, then across sections."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .base import ConfigError
from .checkpoint import CheckpointConfig
from .data import DataConfig
from .model import ModelConfig
from .optim import OptimConfig
from .parallel import ParallelConfig
from .train import TrainConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Every field, then the checks across sections; with `world_size`, also whether this
        many ranks can run the parallel layout (called before any process group exists)."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.data.seq_length > self.model.max_seq_len:
            raise ConfigError(f"data.seq_length={self.data.seq_length} exceeds "
                              f"model.max_seq_len={self.model.max_seq_len}")
        if self.train.stage == "sft" and not (self.checkpoint.init_from or self.checkpoint.continue_from
                                              or self.checkpoint.load):
            raise ConfigError("train.stage=sft tunes a trained model: set checkpoint.init_from to its checkpoint "
                              "(or checkpoint.load to resume a tuning run)")
        if self.data.mix_by == "examples" and self.train.stage != "sft":
            raise ConfigError("data.mix_by=examples counts instruction examples: it needs train.stage=sft")
        from megatron_code.data.schedule import ScheduleError, configured_schedule
        try:  # with train.epochs the run's length is known once the data is (the pipeline checks then)
            configured_schedule(self.data, self.train.steps, check_end=not self.train.epochs)
        except ScheduleError as e:
            raise ConfigError(str(e)) from None
        if not self.train.epochs:  # else the data sets the steps, and the Trainer checks the plan then
            from megatron_code.training.lr_schedule import check_lr_plan
            check_lr_plan(self.optim, self.train.steps)
        self._validate_layout()
        if world_size is not None:
            self._validate_world(world_size)

    def _validate_layout(self) -> None:
        m, p, T = self.model, self.parallel, self.parallel.tensor
        for name, value in (("num_heads", m.num_heads), ("num_kv_heads", m.kv_heads), ("ffn_hidden_size", m.ffn_size)):
            if value % T:
                raise ConfigError(f"parallel.tensor={T} does not divide model.{name}={value}")
        if m.vocab_size and m.vocab_size % T:
            raise ConfigError(f"parallel.tensor={T} does not divide model.vocab_size={m.vocab_size}")
        if m.position_embedding == "learned" and m.max_seq_len % T:
            raise ConfigError(f"parallel.tensor={T} does not divide model.max_seq_len={m.max_seq_len} "
                              "(the learned position table is split over tensor-parallel ranks)")
        if p.sequence_parallel and self.data.seq_length % T:
            raise ConfigError(f"parallel.sequence_parallel=true needs data.seq_length={self.data.seq_length} "
                              f"divisible by parallel.tensor={T}")
        if p.layers_per_stage and sum(p.layers_per_stage) != m.num_layers:
            raise ConfigError(f"parallel.layers_per_stage={p.layers_per_stage} sums to {sum(p.layers_per_stage)}, "
                              f"not model.num_layers={m.num_layers}")
        if not p.layers_per_stage and m.num_layers % p.num_stages:
            raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline x "
                              f"parallel.virtual_stages = {p.pipeline} x {p.virtual_stages} "
                              "(or give parallel.layers_per_stage)")

    def _validate_world(self, world_size: int) -> None:
        p, t = self.parallel, self.train
        if world_size % (p.tensor * p.pipeline):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline "
                              f"= {p.tensor} x {p.pipeline}")
        dp = p.data_parallel(world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                              f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
        n = t.global_batch_size // (t.micro_batch_size * dp)
        if p.pipeline == 1:
            return
        where = (f"{n} micro batches per step (train.global_batch_size={t.global_batch_size} / "
                 f"(train.micro_batch_size={t.micro_batch_size} x data-parallel {dp}))")
        if p.schedule == "1f1b" and n < p.num_stages:
            raise ConfigError(f"parallel.schedule={p.schedule} with {p.num_stages} stages needs at least "
                              f"{p.num_stages} micro batches per step; got {where}")
        rounds = max(1, n // p.pipeline)
        if p.schedule in ("interleaved_1f1b", "zero_bubble") and n % rounds:
            raise ConfigError(f"parallel.schedule={p.schedule} with parallel.pipeline={p.pipeline} needs the "
                              f"micro batches per step to be a multiple of {rounds}; got {where}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
