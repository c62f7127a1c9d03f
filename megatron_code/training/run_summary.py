"""What a run directory says about its run: metrics.jsonl read back (the last record of each
step, since a resume from an earlier checkpoint logs its steps again) and the latest
checkpoint's trainer state. Used by the quickstart's report and the run plots (training/plots.py)."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_code.training.checkpoint import CheckpointError, resolve


def read_metrics(run_dir: str | Path) -> list[dict]:
    """One record per step, in step order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} for every metric named `<prefix>/<name>`."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith(prefix + "/"):
                steps, values = out.setdefault(key[len(prefix) + 1:], ([], []))
                steps.append(r["step"])
                values.append(value)
    return out


def summarize(run_dir: str | Path) -> dict:
    """step, checkpoint, tokens per source, first and last training loss, the last validation
    loss per source, and the schedule that applied."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = {"run_dir": str(run_dir), "step": records[-1]["step"] if records else 0, "checkpoint": None,
           "tokens": {}, "schedule": [], "first_loss": None, "last_loss": None, "valid_loss": {}}
    try:
        step_dir = resolve(run_dir)
    except CheckpointError:
        step_dir = None
    if step_dir is not None:
        state = json.loads((step_dir / "trainer_state.json").read_text())
        data = state.get("data", {})  # absent in checkpoints from before mixture schedules
        out.update(step=state["step"], checkpoint=str(step_dir), tokens=data.get("tokens", {}),
                   schedule=data.get("schedule", []))
        records = [r for r in records if r["step"] <= state["step"]]
    if records:
        out.update(first_loss=records[0]["loss"], last_loss=records[-1]["loss"])
    out["valid_loss"] = {name: values[-1] for name, (_, values) in series(records, "valid_loss").items()}
    return out
