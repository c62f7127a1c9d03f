"""Instruction data: JSONL -> Megatron indexed binaries holding tokens and a loss mask, and the
packed dataset the `sft` stage reads.

File layout (`<prefix>.bin/.idx`, Megatron's format): one document per example, made of two
sequences of equal length: the token ids, then the loss mask (0/1, same dtype). megatron-core's
`IndexedDataset` reads it (document d = sequences 2d and 2d + 1). `<prefix>.meta.json` records
`"kind": "sft"`, the chat template, the tokenizer and the counts.

Training samples (`SFTDataset`): an example of n tokens gives n - 1 (input, label) positions.
With packing, examples in a seeded shuffled order fill fixed-length sequences one after another
(a new sequence starts when the next example does not fit); `document_ids` keep attention
inside each example and positions restart at 0 for each. Without packing, each example is one
sample, padded. Padding never carries loss. Examples longer than data.seq_length + 1 tokens are
cut to it (the count is reported; one left with no response token is dropped).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_code.data.chat import ChatTemplate, check_template, template_for, to_messages
from megatron_code.data.corpus import open_binary, parse_json_line
from megatron_code.data.datasets import SourceFile, file_fingerprint
from megatron_code.data.errors import DataError
from megatron_code.data.preprocess import META_FORMAT, IndexedData, IndexedWriter, optimal_dtype, read_indexed
from megatron_code.data.tokenizer import Tokenizer, load_tokenizer

OVERFLOW = ("truncate", "drop")
_CHUNK = 1024
"""Examples encoded per tokenizer call."""


# ------------------------------------------------------------------------------------ preprocess


def preprocess_sft(input_path: Path | str, output_prefix: Path | str, tokenizer_path: Path | str,
                   max_length: int = 0, overflow: str = "truncate", template: str = "auto",
                   progress: bool = True) -> dict:
    """Tokenize instruction JSONL into `<output_prefix>.bin/.idx` with loss masks.

    `max_length` > 0 limits each example's tokens: longer ones are cut to it (`truncate`; one
    whose response falls wholly past the cut is dropped) or dropped (`drop`). Returns a summary:
    examples, tokens, loss tokens, truncated, dropped, seconds, `prefix`."""
    started = time.perf_counter()
    input_path, output_prefix = Path(input_path), Path(output_prefix)
    if overflow not in OVERFLOW:
        raise DataError(f"overflow={overflow!r} is not one of {', '.join(OVERFLOW)}")
    if max_length < 0:
        raise DataError(f"max_length must be >= 0, got {max_length}")
    tokenizer = load_tokenizer(tokenizer_path)
    chat = template_for(tokenizer, template)
    counts = dict.fromkeys(("examples", "tokens", "loss_tokens", "truncated", "dropped", "dropped_no_response"), 0)
    dtype = optimal_dtype(tokenizer.vocab_size)
    size = input_path.stat().st_size if input_path.is_file() and input_path.suffix != ".gz" else None
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"preprocess_sft {input_path.name}", disable=not progress)
    with IndexedWriter(output_prefix, dtype) as writer:
        for batch in _read_conversations(input_path, bar):
            for tokens, mask in chat.encode_batch(batch):
                kept = _fit(tokens, mask, max_length, overflow, counts)
                if kept is not None:
                    writer.add(np.concatenate(kept), np.array([len(kept[0])] * 2, np.int32), np.array([2]))
                    counts["tokens"] += len(kept[0])
                    counts["loss_tokens"] += int(kept[1].sum())
            bar.set_postfix_str(f"{counts['examples'] / max(bar.format_dict['elapsed'], 1e-9):,.0f} examples/s",
                                refresh=False)
        bar.close()
        if counts["examples"] == 0:
            raise DataError(f"{input_path}: no examples (the file has no non-blank line)")
        if writer.documents == 0:
            raise DataError(f"{input_path}: all {counts['examples']:,} examples were dropped as longer than "
                            f"--max-length {max_length}")
        meta = {"format": META_FORMAT, "kind": "sft", "input": str(input_path), **counts,
                "max_length": max_length, "overflow": overflow, "dtype": np.dtype(dtype).name,
                "template": chat.describe(),
                "tokenizer": {"path": str(tokenizer_path), "vocab_size": tokenizer.vocab_size,
                              "eod_id": tokenizer.eod_id, "fingerprint": tokenizer.fingerprint}}
        writer.commit(meta)
    seconds = time.perf_counter() - started
    if progress:
        over = (f"; over {max_length} tokens: {counts['truncated']:,} truncated, {counts['dropped']:,} dropped "
                f"({counts['dropped_no_response']:,} of them for no response token left)" if max_length else "")
        print(f"preprocess_sft: {counts['examples']:,} examples -> {counts['tokens']:,} tokens "
              f"({counts['loss_tokens']:,} with loss){over} in {seconds:.1f} s -> {output_prefix}.{{bin,idx}}",
              file=sys.stderr)
    return {**counts, "seconds": seconds, "prefix": str(output_prefix)}


def _read_conversations(path: Path, bar: tqdm):
    """Lists of up to _CHUNK checked conversations, in file order."""
    batch = []
    with open_binary(path) as f:
        for line_no, line in enumerate(f, start=1):
            bar.update(len(line))
            if not line.strip():
                continue
            batch.append(to_messages(parse_json_line(line, path, line_no), f"{path}:{line_no}"))
            if len(batch) == _CHUNK:
                yield batch
                batch = []
    if batch:
        yield batch


def _fit(tokens: np.ndarray, mask: np.ndarray, max_length: int, overflow: str,
         counts: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The example within max_length tokens, or None when it is dropped; counts what happened."""
    counts["examples"] += 1
    if not max_length or len(tokens) <= max_length:
        return tokens, mask
    if overflow == "drop":
        counts["dropped"] += 1
        return None
    if not mask[1:max_length].any():  # the first token is never a label
        counts["dropped"] += 1
        counts["dropped_no_response"] += 1
        return None
    counts["truncated"] += 1
    return tokens[:max_length], mask[:max_length]


# ------------------------------------------------------------------------------------- reading


def read_meta(prefix: str | Path) -> dict:
    path = Path(f"{prefix}.meta.json")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: unreadable ({e.msg})") from None


def dataset_kind(prefix: str | Path) -> str:
    """"sft" for data from tools/preprocess_sft.py, else "pretrain"."""
    return "sft" if read_meta(prefix).get("kind") == "sft" else "pretrain"


def read_sft(prefix: str | Path) -> IndexedData:
    """The indexed data at `prefix`, checked to hold (tokens, loss mask) pairs."""
    data = read_indexed(prefix)
    per_document = np.diff(data.document_indices)
    lengths = data.sequence_lengths
    if len(per_document) == 0 or (per_document != 2).any() or (lengths[0::2] != lengths[1::2]).any():
        raise DataError(f"{prefix}: not instruction data: each document must hold a token sequence and a loss mask "
                        "of equal length (made by tools/preprocess_sft.py)")
    return data


def split_bounds(split: str, n: int) -> list[int]:
    """Document boundaries [0, train end, valid end, n] for Megatron's "98,2,0" split."""
    weights = np.array([float(x) for x in split.split(",")])
    cumulative = np.concatenate([[0.0], np.cumsum(weights / weights.sum())])
    return [int(round(c * n)) for c in cumulative[:-1]] + [n]


class SFTDataset:
    """Fixed-length samples of instruction examples: len() and [i] -> tokens, labels, loss_mask,
    position_ids (and document_ids when packed), like every per-source dataset."""

    def __init__(self, data: IndexedData, examples: np.ndarray, seq_length: int, pack: bool, seed: int, pad_id: int):
        """`pad_id` fills the positions no example uses (never with loss)."""
        self.data, self.seq_length, self.pack, self.pad_id = data, seq_length, pack, pad_id
        item = data.dtype.itemsize
        self.starts = data.sequence_pointers[2 * examples] // item
        self.mask_starts = data.sequence_pointers[2 * examples + 1] // item
        lengths = data.sequence_lengths[2 * examples].astype(np.int64)
        cut = np.flatnonzero(lengths > seq_length + 1)
        self.lengths = np.minimum(lengths, seq_length + 1)
        keep = self.lengths > 1
        keep[cut] = [self.example_mask(e)[1:].any() for e in cut.tolist()]
        self.truncated, self.dropped = len(cut), int((~keep).sum())
        order = np.flatnonzero(keep)[np.random.RandomState(seed).permutation(int(keep.sum()))]
        self.order = order
        self.bins = self._pack(self.lengths[order] - 1) if pack else np.arange(len(order) + 1)
        self._filled = np.concatenate([[0], np.cumsum(self.lengths[order] - 1)])  # positions before each example
        self._loss: np.ndarray | None = None

    def _pack(self, slots: np.ndarray) -> np.ndarray:
        """Start of each sequence in `order` (and the end): examples fill a sequence until the
        next one does not fit."""
        starts, used = [0], 0
        for k, n in enumerate(slots.tolist()):
            if used + n > self.seq_length:
                starts.append(k)
                used = 0
            used += n
        return np.array(starts + [len(slots)], dtype=np.int64)

    def example_tokens(self, e: int) -> np.ndarray:
        """Token ids of example e (cut to data.seq_length + 1)."""
        return self.data.tokens[self.starts[e]: self.starts[e] + self.lengths[e]]

    def example_mask(self, e: int) -> np.ndarray:
        return self.data.tokens[self.mask_starts[e]: self.mask_starts[e] + self.lengths[e]]

    def __len__(self) -> int:
        return len(self.bins) - 1

    def real_tokens(self, indices: np.ndarray) -> np.ndarray:
        """The positions samples `indices` fill with their examples' tokens (padding excluded)."""
        return self._filled[self.bins[indices + 1]] - self._filled[self.bins[indices]]

    def examples(self, indices: np.ndarray) -> np.ndarray:
        """The number of examples in samples `indices`."""
        return self.bins[indices + 1] - self.bins[indices]

    def loss_tokens(self, indices: np.ndarray) -> np.ndarray:
        """The positions of samples `indices` that carry loss (their examples' response tokens)."""
        if self._loss is None:
            self._loss = np.full(len(self.order), -1, dtype=np.int64)  # per position in `order`, filled on demand
        out = np.empty(len(indices), dtype=np.int64)
        for j, i in enumerate(np.asarray(indices).tolist()):
            lo, hi = self.bins[i], self.bins[i + 1]
            missing = [k for k in range(lo, hi) if self._loss[k] < 0]
            for k in missing:
                self._loss[k] = int(self.example_mask(self.order[k])[1:].sum())
            out[j] = self._loss[lo:hi].sum()
        return out

    def examples_in(self, i: int) -> np.ndarray:
        """Indices (into this split's examples) of the examples in sample i, in order."""
        return self.order[self.bins[i]: self.bins[i + 1]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        T = self.seq_length
        tokens = np.full(T, self.pad_id, np.int64)
        labels = np.full(T, self.pad_id, np.int64)
        loss_mask = np.zeros(T, np.float32)
        positions = np.zeros(T, np.int64)
        examples = self.examples_in(i)
        documents = np.full(T, len(examples), np.int64)  # padding: a document of its own, after the others
        at = 0
        for k, e in enumerate(examples.tolist()):
            ids, mask = self.example_tokens(e), self.example_mask(e)
            n = len(ids) - 1
            tokens[at: at + n], labels[at: at + n], loss_mask[at: at + n] = ids[:-1], ids[1:], mask[1:]
            positions[at: at + n] = np.arange(n)
            documents[at: at + n] = k
            at += n
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions}
        if self.pack:
            sample["document_ids"] = documents
        return {k: torch.from_numpy(v) for k, v in sample.items()}


def check_sft_dataset(prefix: str, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template the data at `prefix` was made with, checked to be the one `tokenizer`
    gives (training checks its data with it; evaluation prompts a tuned model with it)."""
    recorded = read_meta(prefix).get("template")
    if not isinstance(recorded, dict):
        raise DataError(f"{prefix}.meta.json records no chat template: re-run tools/preprocess_sft.py")
    return check_template(recorded, tokenizer, prefix)


def build_sft_file(name: str, prefix: str, weight: float, tokenizer: Tokenizer, seq_length: int, split: str,
                   seed: int, pack: bool, log) -> SourceFile:
    """Train and valid SFTDatasets of one file of a source (documents split as Megatron splits
    them, each split shuffled by `seed`)."""
    data = read_sft(prefix)
    bounds = split_bounds(split, len(data))
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eod_id  # an id the embedding has; no loss
    datasets = [SFTDataset(data, np.arange(lo, hi), seq_length, pack, seed + k, pad) if hi > lo else None
                for k, (lo, hi) in enumerate(zip(bounds[:2], bounds[1:3]))]
    train, valid = datasets
    if train is None or len(train) == 0:
        raise DataError(f"data source {name!r} ({prefix}) has no training examples with data.split={split}")
    for part, dataset in (("training", train), ("validation", valid)):
        if dataset is not None and dataset.truncated:
            log(f"note: data source {name!r} ({prefix}): {dataset.truncated:,} {part} examples are longer than "
                f"data.seq_length + 1 = {seq_length + 1} tokens and are cut to it ({dataset.dropped:,} left with no "
                "response token are left out)")
    examples = len(train.order)
    log(f"data source {name!r} ({prefix}): {examples:,} training examples in {len(train):,} samples of "
        f"{seq_length} tokens"
        + (f" ({train.lengths[train.order].sum() - examples:,} of {len(train) * seq_length:,} positions filled)"
           if pack else " (one example per sample, padded)"))
    return SourceFile(prefix, weight, train, valid if valid is not None and len(valid) else None,
                      file_fingerprint(prefix))
