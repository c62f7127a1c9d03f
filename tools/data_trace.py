"""Which samples a run trained on: from its sample trace (`--data.trace=true`), or from a
checkpoint's positions alone (no trace needed, no data read: each file's epoch order is
recomputed from the checkpoint's record of it).

    python tools/data_trace.py summary RUN_DIR
    python tools/data_trace.py seen RUN_DIR_OR_CHECKPOINT --source code [--file PREFIX] INDEX [INDEX ...]
    python tools/data_trace.py expand RUN_DIR_OR_CHECKPOINT --out samples.jsonl
    python tools/data_trace.py check RUN_DIR

summary: per source and file, the samples trained, the steps, the epochs, the distinct samples.
seen:    was sample INDEX (of the file's training samples, `dataset[INDEX]`) trained on, how often,
         and when (step and epoch; steps only from a trace). For decontamination: find the
         samples that hold an evaluation item, then ask.
expand:  one JSON line per trained sample: source, file, epoch, index (and step, from a trace).
check:   every sample at most once per epoch of its file, the trace's steps whole and in order,
         and the trace up to the latest checkpoint's step agreeing with that checkpoint's
         positions; exit status 1 otherwise.
A RUN_DIR with a trace is read from the trace; a checkpoint folder (or a run directory without
a trace) from the latest checkpoint's positions.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_code.cli import user_errors  # noqa: E402
from megatron_code.data.datasets import EpochOrder  # noqa: E402
from megatron_code.data.trace import BIN, read_trace  # noqa: E402

CHUNK = 1 << 20
"""Positions expanded at a time."""


class TraceError(ValueError):
    """A request the run's files cannot answer; the message names what is missing."""


# ------------------------------------------------------------------------------------- sources


def checkpoint_positions(path: Path) -> tuple[dict, dict[tuple[str, str], int], int]:
    """(the files' order records, {(source, file prefix): samples read}, the checkpoint's step)."""
    from megatron_code.training.checkpoint import CheckpointError, resolve

    try:
        step_dir = resolve(path)
    except CheckpointError as e:
        raise TraceError(str(e)) from None
    data = json.loads((step_dir / "trainer_state.json").read_text()).get("data")
    if not data or "orders" not in data:
        raise TraceError(f"{step_dir}: its data state does not record the files' epoch orders (a checkpoint from "
                         "before sample traces): use the run's trace")
    positions = {}
    for source, files in data["orders"].items():
        for f in files:
            several = data.get("files", {}).get(source)
            positions[(source, f["prefix"])] = int(several["positions"][f["prefix"]] if several
                                                   else data["sampler"]["positions"][source])
    return {"seed": data["fingerprint"]["seed"], "sources": [{"name": n, "files": fs} for n, fs in
                                                             data["orders"].items()]}, positions, int(data["step"])


def has_trace(path: Path) -> bool:
    return (path / BIN).is_file()


def _file_of(header: dict, source: str, prefix: str | None) -> tuple[int, int, dict]:
    """(source index, file index, its order record) of `source` (and `prefix` when it has several)."""
    names = [s["name"] for s in header["sources"]]
    if source not in names:
        raise TraceError(f"no source {source!r} in this run (sources: {', '.join(names)})")
    d = names.index(source)
    files = header["sources"][d]["files"]
    if prefix is None:
        if len(files) > 1:
            raise TraceError(f"source {source!r} has {len(files)} files: give --file (one of "
                             f"{', '.join(f['prefix'] for f in files)})")
        return d, 0, files[0]
    prefixes = [f["prefix"] for f in files]
    if prefix not in prefixes:
        raise TraceError(f"source {source!r} has no file {prefix} (files: {', '.join(prefixes)})")
    return d, prefixes.index(prefix), files[prefixes.index(prefix)]


def _expand_positions(order: EpochOrder, count: int):
    """(epoch, index) arrays of a file's first `count` positions, a chunk at a time."""
    for lo in range(0, count, CHUNK):
        positions = np.arange(lo, min(lo + CHUNK, count), dtype=np.int64)
        yield positions // order.size, order.order(positions)


# ------------------------------------------------------------------------------------ commands


def summary(run_dir: Path) -> str:
    header, records = read_trace(run_dir)
    lines = [f"{run_dir}: {len(records):,} samples over steps {int(records['step'].min()) if len(records) else 0}.."
             f"{int(records['step'].max()) if len(records) else -1}",
             "| source | file | samples | steps | epochs | distinct samples | of |", "|---|---|---|---|---|---|---|"]
    for d, source in enumerate(header["sources"]):
        for f, file in enumerate(source["files"]):
            mine = records[(records["source"] == d) & (records["file"] == f)]
            epochs = sorted(set(mine["epoch"].tolist()))
            lines.append(f"| {source['name']} | {file['prefix']} | {len(mine):,} | "
                         f"{len(set(mine['step'].tolist())):,} | {', '.join(map(str, epochs)) or '-'} | "
                         f"{len(set(mine['index'].tolist())):,} | {file['size']:,} |")
    return "\n".join(lines)


def seen(path: Path, source: str, prefix: str | None, indices: list[int]) -> str:
    lines = []
    if has_trace(path):
        header, records = read_trace(path)
        d, f, file = _file_of(header, source, prefix)
        mine = records[(records["source"] == d) & (records["file"] == f)]
        for index in indices:
            hits = mine[mine["index"] == index]
            when = ", ".join(f"step {int(r['step'])} (epoch {int(r['epoch'])})" for r in hits)
            lines.append(f"{source} {file['prefix']} sample {index}: seen {len(hits)} time(s)" + (f": {when}" if when
                                                                                                 else ""))
        return "\n".join(lines)
    header, positions, step = checkpoint_positions(path)
    d, f, file = _file_of(header, source, prefix)
    order, count = EpochOrder(file["size"], header["seed"], file["key"]), positions[(source, file["prefix"])]
    wanted = {index: [] for index in indices}
    for index in indices:
        if not 0 <= index < file["size"]:
            raise TraceError(f"sample {index} is outside {file['prefix']}'s {file['size']:,} training samples")
    for epochs, found in _expand_positions(order, count):
        hit = np.isin(found, indices)
        for epoch, index in zip(epochs[hit].tolist(), found[hit].tolist()):
            wanted[index].append(epoch)
    for index, epochs in wanted.items():
        lines.append(f"{source} {file['prefix']} sample {index}: seen {len(epochs)} time(s) by step {step}"
                     + (f" (epochs {', '.join(map(str, epochs))}; steps are in the trace only)" if epochs else ""))
    return "\n".join(lines)


def expand(path: Path, out: Path) -> int:
    """Writes the JSON lines; returns how many."""
    written = 0
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as sink:
        if has_trace(path):
            header, records = read_trace(path)
            for r in records:
                source = header["sources"][int(r["source"])]
                sink.write(json.dumps({"step": int(r["step"]), "source": source["name"],
                                       "file": source["files"][int(r["file"])]["prefix"], "epoch": int(r["epoch"]),
                                       "index": int(r["index"])}) + "\n")
            written = len(records)
        else:
            header, positions, _ = checkpoint_positions(path)
            for source in header["sources"]:
                for file in source["files"]:
                    order = EpochOrder(file["size"], header["seed"], file["key"])
                    for epochs, found in _expand_positions(order, positions[(source["name"], file["prefix"])]):
                        sink.writelines(json.dumps({"source": source["name"], "file": file["prefix"], "epoch": e,
                                                    "index": i}) + "\n"
                                        for e, i in zip(epochs.tolist(), found.tolist()))
                        written += len(found)
    tmp.replace(out)
    return written


def check(run_dir: Path) -> list[str]:
    """What is wrong with a run's trace (empty: nothing)."""
    header, records = read_trace(run_dir)
    problems = []
    keys = Counter(zip(records["source"].tolist(), records["file"].tolist(), records["epoch"].tolist(),
                       records["index"].tolist()))
    for (d, f, epoch, index), n in keys.items():
        if n > 1:
            source = header["sources"][d]
            problems.append(f"{source['name']} {source['files'][f]['prefix']} sample {index} appears {n} times in "
                            f"epoch {epoch}")
    steps = records["step"]
    batch = header["global_batch_size"]
    if len(steps) and ((np.diff(steps.astype(np.int64)) < 0).any() or len(steps) % batch
                       or (np.bincount(steps - steps.min()) != batch).any()):
        problems.append(f"the trace's steps are not {batch} samples each, in order")
    try:
        _, positions, step = checkpoint_positions(run_dir)
    except TraceError:
        return problems
    upto = records[records["step"] < step]
    for d, source in enumerate(header["sources"]):
        for f, file in enumerate(source["files"]):
            traced = int(((upto["source"] == d) & (upto["file"] == f)).sum())
            if traced != positions[(source["name"], file["prefix"])]:
                problems.append(f"{source['name']} {file['prefix']}: the trace holds {traced:,} samples before step "
                                f"{step}, the checkpoint's position is {positions[(source['name'], file['prefix'])]:,}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("summary").add_argument("run_dir", type=Path)
    ask = commands.add_parser("seen")
    ask.add_argument("path", type=Path)
    ask.add_argument("--source", required=True)
    ask.add_argument("--file", help="the file's prefix, for a source of several files")
    ask.add_argument("indices", type=int, nargs="+", metavar="INDEX")
    out = commands.add_parser("expand")
    out.add_argument("path", type=Path)
    out.add_argument("--out", type=Path, required=True)
    commands.add_parser("check").add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":
            print(summary(args.run_dir))
        elif args.command == "seen":
            print(seen(args.path, args.source, args.file, args.indices))
        elif args.command == "expand":
            print(f"{expand(args.path, args.out):,} samples -> {args.out}")
        else:
            problems = check(args.run_dir)
            print("\n".join(problems) if problems else f"{args.run_dir}: every sample at most once per epoch; the "
                                                         "trace agrees with the latest checkpoint")
            return 1 if problems else 0
    except (TraceError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
