"""lm-evaluation-harness on an exported (or any) transformers folder: its registered tasks, and
our JSONL multiple-choice files as local tasks that run offline.

Needs `pip install -e ".[eval]"`. A local task is a YAML written next to nothing of the user's
(a temporary folder) with `dataset_path: json` pointing at the file, `doc_to_text` the
question, `doc_to_choice` the options and lm-eval's default " " delimiter, which is how our own
scorer builds the same continuations (multiple_choice.py).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import yaml

from megatron_code.evaluation.results import TaskScores
from megatron_code.evaluation.tasks import MULTIPLE_CHOICE, Task

PAPER_TASKS = ("logiqa", "sciq", "arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "mbpp")
"""Registered lm-eval tasks nearest to the papers' evaluations (logic, science QA, commonsense,
reading comprehension, code)."""
_LOCAL_PREFIX = "local_"
_TASK_LINE = re.compile(r"^task:\s*(\S+)\s*$", re.MULTILINE)


class HarnessUnavailable(RuntimeError):
    pass


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise HarnessUnavailable('lm-evaluation-harness is not installed: pip install -e ".[eval]"') from None
    return lm_eval


def _task_yamls(names: tuple[str, ...]) -> dict[str, dict]:
    """The YAML of each registered task in `names` (following its `include`)."""
    root = Path(_lm_eval().__file__).parent / "tasks"
    found = {}
    for path in root.rglob("*.yaml"):
        text = path.read_text(errors="replace")
        match = _TASK_LINE.search(text)
        name = match.group(1) if match else None
        if name not in names or name in found:
            continue
        config = yaml.safe_load(text.replace("!function", "")) or {}
        if "include" in config:
            config = {**yaml.safe_load((path.parent / config["include"]).read_text().replace("!function", "")),
                      **config}
        found[name] = config
    return found


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def registered_tasks() -> list[dict]:
    """For each of PAPER_TASKS: its dataset and whether that dataset must be downloaded."""
    out = []
    configs = _task_yamls(PAPER_TASKS)
    for name in PAPER_TASKS:
        dataset = configs.get(name, {}).get("dataset_path", "not registered in this lm-eval version")
        cached = (_hub_cache() / f"datasets--{dataset.replace('/', '--')}").is_dir()
        note = "runs generated code outside our sandbox (lm-eval's own executor)" if name == "mbpp" else ""
        out.append({"task": name, "dataset": dataset, "needs_download": not cached, "note": note})
    return out


def local_task_yaml(task: Task, folder: Path) -> str:
    """Write an lm-eval task YAML for a multiple-choice file; returns its lm-eval name."""
    if task.kind != MULTIPLE_CHOICE:
        raise ValueError(f"{task.path}: only multiple-choice files run through lm-eval here "
                         "(code tasks: tools/evaluate.py run, which runs them in our sandbox)")
    name = _LOCAL_PREFIX + task.name
    metric = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(task.path.resolve())}}, "test_split": "test",
              "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{options}}",
              "doc_to_target": "{{answer}}", "metric_list": metric}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return name


def run_lm_eval(model_dir: str | Path, local_tasks: list[Task] = (), registered: list[str] = (),
                batch_size: int = 16, device: str = "cpu", limit: int | None = None,
                confirm_run_unsafe_code: bool = False) -> tuple[list[TaskScores], dict]:
    """Scores (per item, for comparisons) and lm-eval's raw output ("samples" included)."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="megatron_code_lm_eval_") as folder:
        names = [local_task_yaml(task, Path(folder)) for task in local_tasks]
        manager = TaskManager(include_path=folder, include_defaults=bool(registered))
        output = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={Path(model_dir).resolve()},dtype=float32",
            tasks=names + list(registered), task_manager=manager, batch_size=batch_size, device=device,
            limit=limit, log_samples=True, confirm_run_unsafe_code=confirm_run_unsafe_code)
    scores = []
    for name, samples in output["samples"].items():
        samples = sorted(samples, key=lambda s: int(s["doc_id"]))
        metrics = [m for m in ("acc", "acc_norm", "pass@1", "pass_at_1", "bleu") if m in samples[0]]
        per_item = {m: [float(s[m]) for s in samples] for m in metrics}
        ids = [str(s["doc"].get("id", s["doc_id"])) if isinstance(s["doc"], dict) else str(s["doc_id"])
               for s in samples]
        task = name[len(_LOCAL_PREFIX):] if name in names else name
        scores.append(TaskScores.from_items(task, "lm-eval", ids, per_item, source="lm-eval"))
    return scores, output
