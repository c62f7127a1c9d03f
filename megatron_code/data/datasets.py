"""Per-source datasets: megatron-core's GPTDataset over our .bin/.idx, one epoch per split, and
the order in which a file is read over many epochs.

A source is one or more indexed files; a file's dataset is anything with `len()` and
`[i] -> {tokens, labels, loss_mask, position_ids}`; the mixture never looks inside. Index caches
are keyed by the data files (sizes, mtimes, a hash of the .idx) and the tokenizer's fingerprint,
so rebuilding a dataset at the same prefix, or with another tokenizer, builds new indices
instead of reusing stale ones.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset

from megatron_code.data.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class _MegatronTokenizerView:
    """The few tokenizer attributes megatron-core's GPTDataset reads; `unique_identifiers` goes
    into the hash that names its index caches."""
    eod: int
    pad: int
    vocab_size: int
    unique_identifiers: dict = field(default_factory=dict)


@dataclass
class SourceFile:
    """One indexed file of a source, split into training and validation samples."""
    prefix: str
    weight: float
    """Its share of the source's samples, relative to the source's other files."""
    train: object
    """Training samples of one epoch: len() and [i] -> sample dict."""
    valid: object | None
    fingerprint: dict

    def real_tokens(self, indices: np.ndarray, seq_length: int) -> np.ndarray:
        """Tokens of training samples `indices` that are not padding: every position of
        megatron-core's samples, the examples' own of instruction samples (`real_tokens`)."""
        count = getattr(self.train, "real_tokens", None)
        return count(indices) if count is not None else np.full(len(indices), seq_length, dtype=np.int64)

    def units(self, indices: np.ndarray, mix_by: str, seq_length: int) -> np.ndarray:
        """What data.mix_by counts in training samples `indices`: 1 each (samples), real tokens,
        tokens carrying loss (every position of megatron-core's samples: no loss mask), or
        instruction examples."""
        if mix_by == "samples":
            return np.ones(len(indices), dtype=np.int64)
        if mix_by == "tokens":
            return self.real_tokens(indices, seq_length)
        if mix_by == "loss_tokens" and not hasattr(self.train, "loss_tokens"):
            return np.full(len(indices), seq_length, dtype=np.int64)
        return getattr(self.train, mix_by)(indices)


@dataclass
class SourceData:
    name: str
    files: list[SourceFile]

    @property
    def valid(self):
        """The validation samples of the files it draws from, file after file; None without any."""
        valid = [f.valid for f in self.files if f.valid is not None and f.weight > 0]
        return None if not valid else valid[0] if len(valid) == 1 else ConcatDataset(valid)


def _quiet_megatron_imports():
    # megatron-core warns on import that apex/TE are absent; we never use those paths.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig


def check_prefix(where: str, prefix: str) -> None:
    """Both files exist; `where` names the source (and the field, for one of several files)."""
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise DataError(f"{where}: {prefix}{suffix} does not exist (build it with tools/preprocess_data.py)")


_IDX_DIGESTS: dict[tuple, str] = {}
"""sha256 of each .idx read in this process, keyed by its path, size, mtime and inode: a start
checks the files before building datasets and again while building them, hashing each once."""


def file_fingerprint(prefix: str) -> dict:
    """What identifies the files at a prefix: sizes and mtimes of both, sha256 of the .idx (the
    document and sequence lengths: a rebuild with other input or another tokenizer changes it).
    The .bin is never read; the .idx is hashed once per process while it stays unchanged."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    idx_stat, bin_stat = idx.stat(), bin_.stat()
    key = (str(idx.resolve()), idx_stat.st_size, idx_stat.st_mtime_ns, idx_stat.st_ino)
    if key not in _IDX_DIGESTS:
        with idx.open("rb") as f:
            _IDX_DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return {"idx_sha256": _IDX_DIGESTS[key], "idx_bytes": idx_stat.st_size, "bin_bytes": bin_stat.st_size,
            "idx_mtime_ns": idx_stat.st_mtime_ns, "bin_mtime_ns": bin_stat.st_mtime_ns}


def same_content(a: dict, b: dict) -> bool:
    """Two fingerprints describe the same data (mtimes aside: a rebuild of equal bytes is equal)."""
    keys = ("idx_sha256", "idx_bytes", "bin_bytes")
    return all(a.get(k) == b.get(k) for k in keys)


def build_gpt_file(name: str, prefix: str, weight: float, tokenizer, seq_length: int, split: str, seed: int,
                   cache_dir: str) -> SourceFile:
    """A train and a valid GPTDataset of one file of a source: a single epoch each, in
    megatron-core's deterministic shuffled order (seeded by `seed`), index caches under
    `cache_dir`. Later epochs are new permutations of the first (see EpochOrder), so the data
    order never depends on the run length."""
    Builder, GPTDataset, GPTDatasetConfig = _quiet_megatron_imports()
    fingerprint = file_fingerprint(prefix)
    view = _MegatronTokenizerView(tokenizer.eod_id, tokenizer.pad_id, tokenizer.vocab_size,
                                  {"class": "megatron_code", "vocab_size": tokenizer.vocab_size,
                                   "tokenizer": tokenizer.fingerprint, "files": fingerprint})
    gpt_config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None),
        split=split, path_to_cache=cache_dir, tokenizer=view,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)
    # One epoch per split (num_samples=None): megatron-core loops forever when asked for
    # samples from a split that holds no tokens.
    train, valid, _ = Builder(GPTDataset, [None, None, None], lambda: True, gpt_config).build()
    if train is None or len(train) == 0:
        raise DataError(f"data source {name!r} ({prefix}) has no training samples of "
                        f"length {seq_length}: it needs more tokens or a shorter data.seq_length")
    return SourceFile(prefix, weight, train, valid if valid is not None and len(valid) else None, fingerprint)


def default_cache_dir(output_dir: str, cache_dir: str) -> str:
    return cache_dir or os.path.join(output_dir, "data_cache")


class EpochOrder:
    """Which sample of a source's epoch comes at each position of its reading order.

    Epoch 0 is megatron-core's own shuffled order; epoch e > 0 permutes it again with a keyed
    4-round Feistel network over the next even power of two, walking cycles back into range, so
    every epoch holds every sample exactly once, in a new order, from O(1) state: position p is
    sample `order(p)` of the dataset, computed alone."""

    _ROUNDS = 4

    def __init__(self, size: int, seed: int, name: str):
        self.size, self.seed, self.name = size, seed, name
        half_bits = max(1, (max(size - 1, 1).bit_length() + 1) // 2)
        self._half_bits = np.uint64(half_bits)
        self._mask = np.uint64((1 << half_bits) - 1)

    def _keys(self, epoch: int) -> list[np.uint64]:
        digest = hashlib.blake2b(f"{self.seed}/{self.name}/{epoch}".encode(), digest_size=8 * self._ROUNDS).digest()
        return [np.uint64(int.from_bytes(digest[8 * r: 8 * r + 8], "little")) for r in range(self._ROUNDS)]

    def _feistel(self, x: np.ndarray, keys: list[np.uint64]) -> np.ndarray:
        left, right = x >> self._half_bits, x & self._mask
        for key in keys:
            h = (right ^ key) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
            left, right = right, left ^ (h & self._mask)
        return (left << self._half_bits) | right

    def order(self, positions: np.ndarray) -> np.ndarray:
        """Dataset indices for global reading positions (epoch = position // size)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, within = np.divmod(positions, self.size)
        out = within.astype(np.uint64)
        for epoch in np.unique(epochs[epochs > 0]).tolist():
            keys, sel = self._keys(epoch), epochs == epoch
            x = self._feistel(out[sel], keys)
            while (outside := x >= self.size).any():
                x[outside] = self._feistel(x[outside], keys)
            out[sel] = x
        return out.astype(np.int64)
