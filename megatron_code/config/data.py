"""The data section: sources (one or several indexed files each), the mixture schedule, sequences."""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import ConfigError, check_choice


MIX_BY = ("samples", "tokens", "loss_tokens", "examples")


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
class AdaptiveConfig:
    """Online mixing: the phase's weights follow the run's own per-source training losses
    (Online Data Mixing, Albalak et al. 2023; see megatron_code/data/adaptive.py)."""
    method: str = "odm"
    """odm: Exp3 with the per-source training loss as reward."""
    every: float = 100
    """Steps between weight updates (or a fraction of train.steps, at least one step)."""
    smoothing: float = 0.9
    """Each update keeps this share of a source's reward estimate and adds the rest of its mean
    loss over the last `every` steps (ODM's moving average)."""
    min_weight: float = 0.0
    """Floor of every source's weight, on top of ODM's decaying exploration share."""
    prior: dict = field(default_factory=dict)
    """Source name -> weight until the first update, and the base of the weights after it; empty:
    data.sources' weights. Sources it gives 0 are never drawn."""


@dataclass
class PhaseConfig:
    start: float = 0
    """First step of the phase, or a fraction (below 1) of train.steps."""
    weights: dict = field(default_factory=dict)
    """Source name -> weight (normalized; sources not named get 0)."""
    ramp: float = 0
    """Steps (or a fraction of train.steps) over which the weights move linearly from the
    previous phase's to these."""
    adaptive: AdaptiveConfig | None = None
    """Instead of weights: set them online from the run's losses."""


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
    `schedule:`); checked before every step (its modification time and size), so its future
    phases can be edited mid-run: a change applies from the next global batch on every rank."""
    schedule_source: str = "config"
    """On resume: config (data.schedule or data.schedule_file, which must agree with the
    checkpoint's schedule on every trained step) | checkpoint (go on with the checkpoint's
    schedule; the schedule file's later edits still apply)."""
    mix_by: str = "samples"
    """What the schedule's weights share out: samples | tokens (real tokens, padding excluded) |
    loss_tokens (tokens that carry loss) | examples (instruction examples, train.stage=sft)."""
    trace: bool = False
    """Write each trained sample's (source, file, index, epoch) per step to
    <train.output_dir>/data_trace.bin (read it with tools/data_trace.py)."""
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
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch must be >= 0, got {self.prefetch}")
        check_choice("data.mix_by", self.mix_by, MIX_BY)
        check_choice("data.schedule_source", self.schedule_source, ("config", "checkpoint"))
