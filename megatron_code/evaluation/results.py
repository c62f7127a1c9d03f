"""Evaluation results: one JSON per model, and the comparison of experiment arms.

A results file holds the model (path, step), one row per task and metric (value, n, who scored
it and the prompt format it was fed) and, per task, the item ids and per-item values, so arms
can be compared item by item:

    {"model": "runs/code/checkpoints/step_0001000", "step": 1000, "prompt_format": "raw",
     "results": [{"task": "arithmetic", "metric": "acc", "value": 0.31, "n": 200, "source": "megatron_code",
                  "prompt_format": "raw"}],
     "items": {"arithmetic": {"ids": [...], "values": {"acc": [1.0, 0.0, ...]}}}}

The prompt format is `raw` (the task's text as written) or `chat:<kind>` (the text as the user
turn of a chat template of that kind: role_tokens, hf or text; see score.py); files written
before formats were recorded were raw.

Every score is on one scale, 0 to 1 (SCORE_SCALE, recorded in the file as `score_scale`):
accuracies, pass@1, and BLEU as a fraction (the usual 0-100 figure divided by 100). Files written
before the scale was recorded held our BLEU on 0-100: `read_results` divides it by 100 and says
so; a file of another scale is refused.

`compare` prints a markdown table of arms by task and metric: each arm's value, and for every
arm after the first its difference from the first with a 95% bootstrap confidence interval
(paired over items when both arms scored the same items, else resampled independently). Each
row names its prompt format; where arms were fed different formats, the row lists each arm's
and a note under the table says that those differences mix the model with the prompt.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_code.data.chat import ChatTemplate


RAW = "raw"
SCORE_SCALE = "0-1"
"""The scale of every score we print, table, plot and store (BLEU divided by 100)."""
SCALE_NOTE = "Scores are fractions from 0 to 1 (accuracies, pass@1, and BLEU divided by 100)."


class ResultsError(ValueError):
    """A results file this version cannot read as it was meant; the message names it."""


def prompt_format(template: ChatTemplate | None) -> str:
    """RAW without a chat template, else `chat:<kind>` (role_tokens, hf or text)."""
    return RAW if template is None else f"chat:{template.describe()['kind']}"


@dataclass
class TaskScores:
    task: str
    kind: str
    n: int
    metrics: dict[str, float]
    ids: list[str]
    per_item: dict[str, list[float]]
    """metric -> one value per item (0/1 for accuracies, BLEU from 0 to 1)."""
    source: str = "megatron_code"
    """Who scored it: megatron_code or lm-eval."""
    samples: list[dict] = field(default_factory=list)
    """Generations and their outcome, for code tasks."""
    prompt_format: str = RAW
    """How the task's text reached the model: RAW, or `chat:<template kind>`."""

    @classmethod
    def from_items(cls, task: str, kind: str, ids: list[str], per_item: dict[str, list[float]], **kw) -> "TaskScores":
        metrics = {name: float(np.mean(values)) for name, values in per_item.items()}
        return cls(task, kind, len(ids), metrics, ids, per_item, **kw)


def write_results(path: str | Path, model: str, step: int | None, scores: list[TaskScores],
                  extra: dict | None = None) -> Path:
    path = Path(path)
    results = {
        "model": model, "step": step, "score_scale": SCORE_SCALE,
        "results": [{"task": s.task, "metric": m, "value": v, "n": s.n, "source": s.source,
                     "prompt_format": s.prompt_format} for s in scores for m, v in s.metrics.items()],
        "items": {s.task: {"ids": s.ids, "values": s.per_item} for s in scores},
        **(extra or {}),
    }
    samples = {s.task: s.samples for s in scores if s.samples}
    if samples:
        results["samples"] = samples
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    return path


def find_results(path: str | Path) -> Path:
    """A results file, or the newest results file a model or run directory holds
    (`eval/*.json` or `eval_results.json`)."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob("eval/*.json"), key=lambda p: p.stat().st_mtime)
    found += [p for p in [path / "eval_results.json"] if p.is_file()]
    if not found:
        raise FileNotFoundError(f"{path}: no results file (expected a .json, <run>/eval/*.json or eval_results.json; "
                                "make one with `tools/evaluate.py run`)")
    return max(found, key=lambda p: p.stat().st_mtime)


def read_results(path: Path) -> dict:
    """A results file with every score on SCORE_SCALE. A file without `score_scale` was written
    when our BLEU was on 0-100: its BLEU rows and per-item values are divided by 100, and the
    returned dict's `rescaled` lists the tasks that had them."""
    results = json.loads(Path(path).read_text())
    scale = results.get("score_scale")
    if scale not in (None, SCORE_SCALE):
        raise ResultsError(f"{path}: scores on scale {scale!r}; this version reads {SCORE_SCALE!r} (and files "
                           "written before the scale was recorded)")
    results["rescaled"] = []
    if scale is None:
        for row in results["results"]:
            if row["metric"] == "bleu" and row.get("source", "megatron_code") == "megatron_code":
                row["value"] /= 100
                values = results["items"].get(row["task"], {}).get("values", {})
                if "bleu" in values:
                    values["bleu"] = [v / 100 for v in values["bleu"]]
                results["rescaled"].append(row["task"])
        results["score_scale"] = SCORE_SCALE
    return results


def bootstrap_difference(a: list[float], b: list[float], paired: bool, resamples: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean(b) - mean(a), 2.5th and 97.5th percentiles of that difference over resamples)."""
    a_values, b_values = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    if paired:
        idx = rng.integers(0, len(a_values), size=(resamples, len(a_values)))
        diffs = b_values[idx].mean(1) - a_values[idx].mean(1)
    else:
        diffs = (b_values[rng.integers(0, len(b_values), size=(resamples, len(b_values)))].mean(1)
                 - a_values[rng.integers(0, len(a_values), size=(resamples, len(a_values)))].mean(1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(b_values.mean() - a_values.mean()), float(low), float(high)


def bootstrap_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th and 97.5th percentiles of the mean over resamples of the items): the 95%
    interval of one arm's score, by the resampling `compare` uses for differences."""
    return bootstrap_difference([0.0] * len(values), values, paired=True, resamples=resamples, seed=seed)


def _label(results: dict, path: Path) -> str:
    model = Path(results["model"])
    run = model.parent.parent.name if model.parent.name == "checkpoints" else model.name
    return f"{run}@{results['step']}" if results.get("step") is not None else run or str(path)


def compare(paths: list[str | Path], resamples: int = 2000) -> str:
    """The markdown table of arms (the first is the baseline) by task and metric."""
    files = [find_results(p) for p in paths]
    arms = [read_results(f) for f in files]
    labels = [_label(r, f) for r, f in zip(arms, files)]
    header = ["task", "metric", "n", "prompt"] + labels + [f"{label} - {labels[0]} [95% CI]" for label in labels[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [{(row["task"], row["metric"]): row for row in arm["results"]} for arm in arms]
    keys = list(dict.fromkeys(key for arm in rows for key in arm))
    mixed = 0
    for task, metric in keys:
        values = [arm["items"].get(task, {}).get("values", {}).get(metric) for arm in arms]
        ids = [arm["items"].get(task, {}).get("ids") for arm in arms]
        formats = [arm[(task, metric)].get("prompt_format", RAW) if (task, metric) in arm else "-" for arm in rows]
        scored = {f for f in formats if f != "-"}
        mixed += len(scored) > 1
        cells = [f"{np.mean(v):.4f}" if v else "-" for v in values]
        for v, item_ids in zip(values[1:], ids[1:]):
            if not v or not values[0]:
                cells.append("-")
                continue
            diff, low, high = bootstrap_difference(values[0], v, paired=item_ids == ids[0], resamples=resamples)
            cells.append(f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]")
        n = "/".join(sorted({str(len(v)) for v in values if v}))
        prompt = scored.pop() if len(scored) == 1 else " / ".join(formats)
        lines.append("| " + " | ".join([task, metric, n, prompt] + cells) + " |")
    lines += ["", SCALE_NOTE]
    for f, arm in zip(files, arms):
        if arm["rescaled"]:
            lines.append(f"Note: {f} was written with BLEU from 0 to 100 (before results recorded their scale); "
                         f"its BLEU ({', '.join(arm['rescaled'])}) is read here divided by 100.")
    if mixed:
        lines += ["", f"Note: on {mixed} of {len(keys)} rows the arms were fed different prompt formats (the "
                  "prompt column lists each arm's, in column order): a difference between two of them mixes the "
                  "models with the prompt format."]
    return "\n".join(lines)
