"""Per-source GPT datasets (megatron-core GPTDataset over our .bin/.idx) and the batch loader
that draws each global batch from them in the order the mixture dictates."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_code.config import DataConfig
from megatron_code.data.errors import DataError
from megatron_code.data.mixture import Mixture

log = logging.getLogger(__name__)


@dataclass
class _MegatronTokenizerView:
    """The few tokenizer attributes megatron-core's GPTDataset reads."""
    eod: int
    pad: int
    vocab_size: int
    unique_identifiers: dict = field(default_factory=dict)


@dataclass
class SourceData:
    name: str
    train: object
    valid: object | None


def _quiet_megatron_imports():
    # megatron-core warns on import that apex/TE are absent; we never use those paths.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig


def check_prefix(name: str, prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise DataError(f"data source {name!r}: {prefix}{suffix} does not exist "
                            f"(build it with tools/preprocess_data.py)")


def build_source_datasets(config: DataConfig, tokenizer, seed: int, cache_dir: str) -> list[SourceData]:
    """One train and one valid GPTDataset per source: a single epoch each, in megatron-core's
    deterministic shuffled order, index caches under `cache_dir`. The loader wraps epochs, so
    the data order never depends on the run length (a resumed run may change `train.steps`)."""
    Builder, GPTDataset, GPTDatasetConfig = _quiet_megatron_imports()
    view = _MegatronTokenizerView(tokenizer.eod_id, tokenizer.pad_id, tokenizer.vocab_size,
                                  {"class": "megatron_code", "vocab_size": tokenizer.vocab_size})
    out = []
    for source in config.sources:
        check_prefix(source.name, source.prefix)
        gpt_config = GPTDatasetConfig(
            random_seed=seed, sequence_length=config.seq_length, blend=([source.prefix], None),
            split=config.split, path_to_cache=cache_dir, tokenizer=view,
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, mid_level_dataset_surplus=0.005)
        # One epoch per split (num_samples=None): megatron-core loops forever when asked for
        # samples from a split that holds no tokens, and the loader wraps epochs itself.
        train, valid, _ = Builder(GPTDataset, [None, None, None], lambda: True, gpt_config).build()
        if train is None or len(train) == 0:
            raise DataError(f"data source {source.name!r} ({source.prefix}) has no training samples of "
                            f"length {config.seq_length}: it needs more tokens or a shorter data.seq_length")
        out.append(SourceData(source.name, train, valid if valid is not None and len(valid) else None))
    return out


class MixtureLoader:
    """Global batches as lists of micro batches, drawn through the mixture. Every rank computes
    the same picks with no communication; data-parallel rank r of D keeps the r-th contiguous
    1/D of each global batch. Stateless apart from the mixture's consumed counts (`state_dict`)."""

    def __init__(self, sources: list[SourceData], mixture: Mixture, micro_batch_size: int,
                 device: torch.device, dp_rank: int = 0, dp_size: int = 1):
        self.sources, self.mixture = sources, mixture
        self.micro_batch_size, self.device = micro_batch_size, device
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def _collate(self, samples: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
        """(source index, sample) pairs -> a micro batch; `source` indexes data.sources."""
        batch = {k: torch.stack([s[k] for _, s in samples])
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batch["source"] = torch.tensor([d for d, _ in samples], dtype=torch.int64)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def global_batch(self, size: int) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
        """(this data-parallel rank's micro batches, samples per source in the whole global batch)."""
        picks = self.mixture.take(size)
        per_source = np.bincount([d for d, _ in picks], minlength=len(self.sources))
        share = size // self.dp_size
        samples = []
        for d, i in picks[self.dp_rank * share: (self.dp_rank + 1) * share]:
            train = self.sources[d].train
            samples.append((d, train[i % len(train)]))
        mbs = self.micro_batch_size
        return [self._collate(samples[j: j + mbs]) for j in range(0, share, mbs)], per_source

    def state_dict(self) -> dict:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state)

    def epochs(self) -> dict[str, float]:
        """How many passes over each source's training split the run has made so far."""
        return {s.name: float(c) / len(s.train) for s, c in zip(self.sources, self.mixture.consumed)}

    def valid_batches(self, source: SourceData, num_batches: int) -> list[dict[str, torch.Tensor]]:
        """The same held-out micro batches on every rank."""
        n = min(len(source.valid), num_batches * self.micro_batch_size)
        index = self.sources.index(source)
        samples = [(index, source.valid[i]) for i in range(n)]
        mbs = self.micro_batch_size
        return [self._collate(samples[j: j + mbs]) for j in range(0, n, mbs)]


def default_cache_dir(output_dir: str, data: DataConfig) -> str:
    return data.cache_dir or os.path.join(output_dir, "data_cache")
