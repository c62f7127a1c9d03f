"""What a run directory says about its run: metrics.jsonl read back (the last record of each
step, since a resume from an earlier checkpoint logs its steps again) and the latest
checkpoint's trainer state. Used by the quickstart's report and the run plots (training/plots.py)."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_code.training.checkpoint import CheckpointError, resolve


def _records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_metrics(run_dir: str | Path) -> list[dict]:
    """One record per step, in step order (event records left out: see `read_events`)."""
    by_step = {r["step"]: r for r in _records(run_dir) if "event" not in r}
    return [by_step[s] for s in sorted(by_step)]


def read_events(run_dir: str | Path) -> list[dict]:
    """The event records (schedule changes accepted or rejected), in the order they happened;
    an event's `step` is the step from which it applies."""
    return [r for r in _records(run_dir) if "event" in r]


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
