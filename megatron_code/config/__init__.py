"""The one config tree: dataclasses, YAML files and `--section.field=value` overrides on top.

Every field is typed; unknown or ill-typed fields fail at start-up with a message naming the
field and where its value came from (the file, or the command-line override). Model sizes are
named presets (`model.preset: 125m`). One module per section; this package re-exports them.
"""
from .base import ConfigError
from .checkpoint import CheckpointConfig
from .data import AdaptiveConfig, DataConfig, PhaseConfig, SourceConfig, SourceFileConfig
from .loader import config_from_dict, load_config, parse_override
from .model import PRESETS, ModelConfig
from .optim import LRPhaseConfig, OptimConfig
from .parallel import PIPELINE_SCHEDULES, ParallelConfig
from .train import TrainConfig
from .tree import Config

__all__ = ["PIPELINE_SCHEDULES", "PRESETS", "AdaptiveConfig", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "LRPhaseConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PhaseConfig",
           "SourceConfig", "SourceFileConfig", "TrainConfig", "config_from_dict", "load_config", "parse_override"]
