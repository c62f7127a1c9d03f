"""The one config tree: dataclasses, YAML files and `--section.field=value` overrides on top.

Every field is typed; unknown or ill-typed fields fail at start-up with a message naming the
field (and the file it came from). Model sizes are named presets (`model.preset: 125m`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the field."""


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    preset: str | None = None
    """Named size (see PRESETS); explicit fields in YAML or overrides win over it."""
    vocab_size: int = 0
    """0 = take it from the tokenizer (padded to `pad_vocab_to_multiple_of`)."""
    pad_vocab_to_multiple_of: int = 128
    """Megatron pads the embedding so it splits evenly over tensor-parallel ranks; export cuts it."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 0
    """Grouped-query attention: 0 = same as num_heads (plain multi-head attention)."""
    ffn_hidden_size: int = 0
    """0 = Llama's rule: 8/3 * hidden rounded up to a multiple of 64 (4 * hidden for GELU)."""
    max_seq_len: int = 2048
    norm: str = "rmsnorm"
    """rmsnorm (Llama) | layernorm (GPT-2 / PanGu)."""
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    """swiglu (gated) | gelu (GPT-2 / PanGu, tanh approximation)."""
    position_embedding: str = "rope"
    """rope | learned (absolute positions, GPT-2 / PanGu)."""
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    kernels: str = "auto"
    """auto | triton | torch: who computes norms, RoPE, activations and the loss."""
    attention: str = "auto"
    """auto | sdpa | flash_attn | triton."""
    fused_linear_cross_entropy: bool = False
    """Compute the output projection and the loss together in token chunks, so the full
    [tokens, vocab] logits are never held (5-20x less loss memory at large vocabularies)."""

    def validate(self) -> None:
        _choice("model.norm", self.norm, ("rmsnorm", "layernorm"))
        _choice("model.activation", self.activation, ("swiglu", "gelu"))
        _choice("model.position_embedding", self.position_embedding, ("rope", "learned"))
        _choice("model.kernels", self.kernels, ("auto", "triton", "torch"))
        _choice("model.attention", self.attention, ("auto", "sdpa", "flash_attn", "triton"))
        for name in ("hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.kv_heads}")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "gelu":
            return 4 * self.hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64

    def padded_vocab(self, tokenizer_vocab: int, tensor_parallel: int = 1) -> int:
        """The tokenizer's vocabulary rounded up to `pad_vocab_to_multiple_of x tensor_parallel`,
        so every tensor-parallel rank holds an equal, aligned slice of the embedding."""
        m = self.pad_vocab_to_multiple_of * tensor_parallel
        return -(-tokenizer_vocab // m) * m


def _llama(hidden: int, layers: int, heads: int, kv: int, ffn: int, seq: int, tie: bool = False) -> dict:
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                ffn_hidden_size=ffn, max_seq_len=seq, tie_embeddings=tie)


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: runs in milliseconds on CPU; GQA on so every code path is exercised.
    "tiny": _llama(64, 2, 4, 2, 192, 256, tie=True),
    # The quickstart: ~7M parameters with a 8K vocabulary, trains on 2 CPU cores in minutes.
    "quickstart": _llama(256, 6, 8, 4, 704, 256, tie=True),
    "125m": _llama(768, 12, 12, 12, 2048, 2048, tie=True),
    # Cohere's "To Code, or Not To Code?" sizes (seq 8192).
    "470m": _llama(1024, 24, 16, 16, 2816, 8192),
    "1.3b": _llama(2048, 24, 16, 16, 5632, 2048),
    "2.8b": _llama(2560, 32, 32, 32, 6912, 8192),
    # PanGu-alpha 2.6B as in Ma et al. (ICLR 2024): the older GPT architecture.
    "2.6b-pangu": dict(hidden_size=2560, num_layers=32, num_heads=32, num_kv_heads=32,
                       ffn_hidden_size=10240, max_seq_len=1024, norm="layernorm",
                       activation="gelu", position_embedding="learned"),
    "7b": _llama(4096, 32, 32, 32, 11008, 4096),
}


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
    activation_checkpointing: str = "none"
    """none | selective (recompute attention's core in backward) | full (recompute every layer)."""

    def validate(self) -> None:
        _choice("parallel.schedule", self.schedule, PIPELINE_SCHEDULES)
        _choice("parallel.dp_shard", self.dp_shard, ("none", "zero2", "zero3"))
        _choice("parallel.activation_checkpointing", self.activation_checkpointing, ("none", "selective", "full"))
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


@dataclass
class SourceFileConfig:
    prefix: str = ""
    """Indexed dataset path prefix: `<prefix>.bin` and `<prefix>.idx`."""
    weight: float = 1.0
    """Share of the source's samples this file serves, relative to the source's other files."""


@dataclass
class SourceConfig:
    name: str = ""
    """Short name used in logs and reports (text, code, ...)."""
    prefix: str | list[SourceFileConfig] = ""
    """Indexed dataset path prefix (`<prefix>.bin` and `<prefix>.idx`), or several files as a
    list of {prefix, weight}: the source's samples come from its files by these weights, each
    file read in its own shuffled order. Schedules and reports see only the source."""
    weight: float = 1.0
    """Weight in the `constant` schedule (the default when data.schedule is empty); 0 keeps a
    source for validation only."""

    def files(self) -> list[tuple[str, float]]:
        """(prefix, weight) of each file; a plain prefix is one file of weight 1."""
        if isinstance(self.prefix, str):
            return [(self.prefix, 1.0)]
        return [(f.prefix, f.weight) for f in self.prefix]

    def validate(self, where: str) -> None:
        if self.prefix == []:
            raise ConfigError(f"{where}.prefix is an empty list: give at least one {{prefix, weight}}")
        if not self.name or not self.prefix:
            raise ConfigError(f"{where} needs both a name and a prefix")
        if self.weight < 0:
            raise ConfigError(f"{where}.weight must be >= 0, got {self.weight}")
        if isinstance(self.prefix, str):
            return
        prefixes = [f.prefix for f in self.prefix]
        for i, f in enumerate(self.prefix):
            if not f.prefix:
                raise ConfigError(f"{where}.prefix[{i}].prefix is empty")
            if prefixes.index(f.prefix) != i:
                raise ConfigError(f"{where}.prefix[{i}].prefix={f.prefix!r} is listed twice")
            if not f.weight >= 0:
                raise ConfigError(f"{where}.prefix[{i}].weight must be >= 0, got {f.weight}")
        if sum(f.weight for f in self.prefix) <= 0:
            raise ConfigError(f"{where}.prefix: the files' weights are all zero")


@dataclass
class PhaseConfig:
    start: float = 0
    """First step of the phase, or a fraction (below 1) of train.steps."""
    weights: dict = field(default_factory=dict)
    """Source name -> weight (normalized; sources not named get 0)."""
    ramp: float = 0
    """Steps (or a fraction of train.steps) over which the weights move linearly from the
    previous phase's to these."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """One entry per indexed dataset."""
    schedule: list[PhaseConfig] | str = field(default_factory=list)
    """Phases in order, or a shorthand: constant | uniform | stepwise_increase |
    stepwise_decrease (Ma et al.) | cooldown | code_then_text | balanced_then_text (Aryabumi et
    al.), with options as `cooldown(fraction=0.1, code_share=0.2)`. Empty: constant weights
    from data.sources."""
    schedule_file: str = ""
    """A YAML file holding the schedule (a list of phases or a shorthand, optionally under
    `schedule:`); re-read while training, so its future phases can be edited mid-run."""
    schedule_reload_interval: int = 100
    """Re-read data.schedule_file every N steps (0: only at start-up); a change applies from
    the next global batch on every rank."""
    tokenizer: str = ""
    """SentencePiece `.model` file (or a Hugging Face tokenizer folder)."""
    seq_length: int = 256
    split: str = "98,2,0"
    """Train/valid/test split of each source's documents, as in Megatron."""
    seed: int = 1234
    """Seeds the data order (each source's shuffle, and a new one per epoch); train.seed seeds
    the model's initialization."""
    allow_repeat: bool = True
    """Let a source start a new epoch (in a new order, with a warning) when the schedule asks
    for more samples than it holds; false makes that an error at start-up."""
    allow_changed_data: bool = False
    """Resume although seq length, split, data seed, tokenizer or a source's files differ from
    the checkpoint's (each source continues at its saved position)."""
    prefetch: int = 2
    """Global batches built ahead of the step by a background thread (0: built in the step)."""
    cache_dir: str = ""
    """Where GPTDataset index caches go; empty = `<train.output_dir>/data_cache`."""
    pack: bool = True
    """Instruction data (train.stage=sft): pack several examples into each sequence, attention
    kept inside each example and positions restarting per example; false pads each example to
    data.seq_length instead."""

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one {name, prefix, weight}")
        names = [s.name for s in self.sources]
        for i, s in enumerate(self.sources):
            s.validate(f"data.sources[{i}]")
            if names.count(s.name) > 1:
                raise ConfigError(f"data.sources[{i}].name={s.name!r} is used twice")
        if not self.schedule and not self.schedule_file and sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources weights sum to zero (and no data.schedule is given)")
        if not self.tokenizer:
            raise ConfigError("data.tokenizer is empty: give the tokenizer model file")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ConfigError(f"data.split={self.split!r} must be three numbers like '98,2,0'")
        if self.schedule_reload_interval < 0 or self.prefetch < 0:
            raise ConfigError("data.schedule_reload_interval and data.prefetch must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    schedule: str = "cosine"
    """cosine | wsd (warmup-stable-decay) | linear (anneal to min_lr, used for cooldowns) | constant."""
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """wsd: the last fraction of steps that decays linearly to min_lr."""

    def validate(self) -> None:
        _choice("optim.schedule", self.schedule, ("cosine", "wsd", "linear", "constant"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= optim.min_lr <= optim.lr, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8
    global_batch_size: int = 8
    """Samples per optimizer step; micro batches are accumulated up to it."""
    seed: int = 1234
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda."""
    dtype: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32."""
    log_interval: int = 10
    """Print a line every N steps; metrics.jsonl gets every step."""
    eval_interval: int = 100
    """Validation every N steps (and at the end); 0 disables periodic validation."""
    eval_batches: int = 4
    """Micro batches per source per validation."""
    eval_tasks: list[str] = field(default_factory=list)
    """Multiple-choice task files (JSONL, see megatron_code/evaluation/tasks.py) scored at every
    validation; their accuracies go to the metrics as task/<name>/<acc|acc_norm|acc_ppl>."""
    output_dir: str = "runs/default"
    tensorboard: bool = False
    progress: bool = True
    stage: str = "pretrain"
    """pretrain | sft: instruction tuning on data from tools/preprocess_sft.py (loss on assistant
    tokens only), started from checkpoint.init_from with a fresh optimizer and LR schedule."""
    epochs: float = 0
    """sft: passes over the instruction data; > 0 sets train.steps to ceil(epochs x the training
    samples of the sources the schedule draws from / global_batch_size), ignoring train.steps."""

    def validate(self) -> None:
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.dtype", self.dtype, ("auto", "bf16", "fp32"))
        _choice("train.stage", self.stage, ("pretrain", "sft"))
        if self.epochs < 0:
            raise ConfigError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.epochs and self.stage != "sft":
            raise ConfigError("train.epochs counts passes over instruction data: it needs train.stage=sft")
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    load: str = ""
    """Resume from this checkpoint directory (a run dir's `checkpoints/` or one `step_N` in it);
    overrides `init_from`. A weights-only checkpoint (e.g. imported from Hugging Face) starts as
    `init_from` does. Without it, a train.output_dir that holds checkpoints resumes from its
    latest; pointing it at another run while train.output_dir holds checkpoints is refused."""
    init_from: str = ""
    """Start from this checkpoint's model weights only: fresh optimizer, LR schedule and data
    position, step 0 -- on the run's first start; a relaunch resumes train.output_dir's latest
    checkpoint instead. Any parallel layout can read a checkpoint saved under any other."""
    save: bool = True

    def validate(self) -> None:
        if self.interval < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")


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
        if self.train.stage == "sft" and not (self.checkpoint.init_from or self.checkpoint.load):
            raise ConfigError("train.stage=sft tunes a trained model: set checkpoint.init_from to its checkpoint "
                              "(or checkpoint.load to resume a tuning run)")
        from megatron_code.data.schedule import ScheduleError, configured_schedule
        try:
            configured_schedule(self.data, self.train.steps)
        except ScheduleError as e:
            raise ConfigError(str(e)) from None
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
# Building the tree from dicts, YAML and overrides, with field-named errors.

def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, str) and str in args:
            return value
        return _convert(value, next(a for a in args if a is not str), where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            out = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown field {where}.{unknown[0]} (known: {', '.join(sorted(names))})")
    values = dict(values)
    if cls is ModelConfig and values.get("preset"):
        preset = values["preset"]
        if preset not in PRESETS:
            raise ConfigError(f"{where}.preset={preset!r} is not one of {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **values}
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--train.steps=100` -> (['train', 'steps'], 100). Values are read as YAML scalars."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.field=value")
    key, raw = arg[2:].split("=", 1)
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Config from an optional YAML file, then dotted overrides; validated before returning."""
    values: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        values = _merge(values, loaded)
    for arg in overrides or []:
        keys, value = parse_override(arg)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {k} is not a section")
        node[keys[-1]] = value
    where = str(path) if path is not None else "config"
    try:
        config = _build(Config, values, "config")
        config.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


def config_from_dict(values: dict, model_only: bool = False) -> Config:
    """Rebuild a saved config (e.g. from a checkpoint). `model_only` validates just the model
    section (a weights-only checkpoint made by import has no data sources)."""
    config = _build(Config, values, "config")
    (config.model if model_only else config).validate()
    return config
