"""The sample trace: which samples each step trained on, in a compact file beside the metrics.

`<train.output_dir>/data_trace.bin` holds one fixed-size record per sample of every global
batch, in step order and, within a step, in the global batch's order (data-parallel rank r
trains the r-th contiguous share): the step (optimizer steps done before the batch, the
schedule's numbering), the source and file (indices into `data_trace.json`'s lists), the
file's epoch, and the sample's index in that file's training samples (`dataset[index]`:
megatron-core's GPTDataset sample, or the packed sequence of instruction examples). 20 bytes a
sample. `data_trace.json` names the sources and files and gives each file's epoch size and the
key of its epoch order (data/datasets.py EpochOrder), so tools/data_trace.py can also expand a
checkpoint's positions without the data.

Only global rank 0 writes (every rank computes the whole global batch's picks). A resume cuts
the records of steps at or after its step first, so a run killed after its last checkpoint
leaves no trace of the steps it trains again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TRACE_FORMAT = 1
RECORD = np.dtype([("step", "<u4"), ("source", "<u2"), ("file", "<u2"), ("epoch", "<u4"), ("index", "<i8")])
BIN, HEADER = "data_trace.bin", "data_trace.json"


class TraceWriter:
    def __init__(self, run_dir: Path, header: dict):
        self.path, self.header = Path(run_dir) / BIN, {"format": TRACE_FORMAT, "record": RECORD.descr, **header}
        self.file = None

    def _open(self, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = self.path.with_name(HEADER)
        tmp = header.with_name(HEADER + ".tmp")
        tmp.write_text(json.dumps(self.header, indent=1))
        tmp.replace(header)
        self.file = open(self.path, "ab")
        keep = first_record_at(self.path, step)
        self.file.truncate(keep * RECORD.itemsize)
        self.file.seek(0, os.SEEK_END)

    def write(self, step: int, records: np.ndarray) -> None:
        """The records of the global batch of `step` (the first write cuts what the file holds
        from `step` on: a resume's first step)."""
        if self.file is None:
            self._open(step)
        self.file.write(records.astype(RECORD, copy=False).tobytes())
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def first_record_at(path: Path, step: int) -> int:
    """The number of whole records before the first one of `step` or later."""
    if not path.is_file():
        return 0
    whole = path.stat().st_size // RECORD.itemsize
    if whole == 0:
        return 0
    steps = np.memmap(path, dtype=RECORD, mode="r", shape=(whole,))["step"]
    return int(np.searchsorted(steps, step, side="left"))


def read_trace(run_dir: str | Path) -> tuple[dict, np.ndarray]:
    """(header, records) of a run's trace; a record cut short by a crash is left out."""
    run_dir = Path(run_dir)
    path, header = run_dir / BIN, run_dir / HEADER
    if not path.is_file() or not header.is_file():
        raise FileNotFoundError(f"{run_dir} has no sample trace ({BIN} and {HEADER}): train with --data.trace=true")
    meta = json.loads(header.read_text())
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(f"{header}: trace format {meta.get('format')!r}, this version reads {TRACE_FORMAT}")
    whole = path.stat().st_size // RECORD.itemsize
    records = np.fromfile(path, dtype=RECORD, count=whole) if whole else np.zeros(0, RECORD)
    return meta, records
