"""Evaluation tasks as JSONL files: one item per line; a task is named by its file's stem.

Multiple choice (scored by the log-likelihood of each option after the question):

    {"question": "Question: What is 2 + 3?\\nAnswer:", "options": ["4", "5", "6"], "answer": 1}

  The scored text of option i is question + " " + options[i] (lm-evaluation-harness's default
  target delimiter, so the same file scores the same through lm-eval). "answer" is 0-based.

Code generation (greedy completion of the prompt, scored by pass@1 and BLEU):

    {"prompt": "def add(a, b):\\n    \\"\\"\\"Return a + b.\\"\\"\\"\\n", "tests": ["assert add(1, 2) == 3"],
     "reference": "    return a + b\\n"}

  The program prompt + completion runs, then the tests (see sandbox.py). "reference" (optional)
  is what BLEU compares the completion with.

Any item may carry an "id" (default: its line number) and a "family"; other fields are ignored.
`write_builtin_tasks` writes the project's own tasks (data/synthetic.py); `convert_mbpp` turns a
local MBPP file (fields text, code, test_list) into a code task.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_code.data.corpus import write_jsonl
from megatron_code.data.synthetic import EVAL_SEED, EVAL_SIZES, ChoiceItem, CodeItem, generate

MULTIPLE_CHOICE, CODE = "multiple_choice", "code"


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    kind: str
    """MULTIPLE_CHOICE or CODE."""
    items: tuple[ChoiceItem, ...] | tuple[CodeItem, ...]


def _strings(value, where: str, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise TaskError(f"{where}: {field!r} must be a non-empty list of strings")
    return tuple(value)


def _item(record: dict, where: str, default_id: str) -> tuple[str, ChoiceItem | CodeItem]:
    item_id = str(record.get("id", default_id))
    if "options" in record:
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str):
            raise TaskError(f"{where}: multiple-choice items need a string 'question'")
        options = _strings(record["options"], where, "options")
        if len(options) < 2:
            raise TaskError(f"{where}: 'options' needs at least two choices")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
            raise TaskError(f"{where}: 'answer' must be the 0-based index of the correct option, got {answer!r}")
        return MULTIPLE_CHOICE, ChoiceItem(item_id, question, options, answer, str(record.get("family", "")))
    if "tests" in record:
        prompt, reference = record.get("prompt"), record.get("reference", "")
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise TaskError(f"{where}: code items need a string 'prompt' (and 'reference', when given)")
        return CODE, CodeItem(item_id, prompt, _strings(record["tests"], where, "tests"), reference,
                              str(record.get("family", "")))
    raise TaskError(f"{where}: neither a multiple-choice item (question, options, answer) nor a code item "
                    "(prompt, tests)")


def load_task(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist (make the built-in ones with "
                        "`python tools/evaluate.py make-tasks`)")
    kinds, items = set(), []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{where}: each line must be a JSON object")
            kind, item = _item(record, where, str(line_no))
            kinds.add(kind)
            items.append(item)
    if not items:
        raise TaskError(f"{path}: no items")
    if len(kinds) > 1:
        raise TaskError(f"{path}: mixes multiple-choice and code items; use one file per task")
    return Task(path.stem, path, kinds.pop(), tuple(items))


def load_eval_tasks(paths: list[str]) -> list[Task]:
    """The `train.eval_tasks` files: multiple choice only (scored inside training)."""
    tasks = []
    for path in paths:
        try:
            task = load_task(path)
        except TaskError as e:
            raise TaskError(f"train.eval_tasks: {e}") from None
        tasks.append(task)
        if task.kind != MULTIPLE_CHOICE:
            raise TaskError(f"train.eval_tasks: {task.path} is a {task.kind} task; only multiple-choice "
                            "files are scored during training (tools/evaluate.py runs code tasks)")
    return tasks


def write_builtin_tasks(out_dir: str | Path, scale: int = 1) -> list[Path]:
    """The project's own tasks (arithmetic, logic, python_functions) from the eval split,
    `scale` times the default sizes; the same files for the same arguments."""
    return [write_jsonl(Path(out_dir) / f"{name}.jsonl",
                        (item.to_json() for item in generate(name, size * scale, EVAL_SEED, "eval")))
            for name, size in EVAL_SIZES.items()]


def convert_mbpp(path: str | Path, out: str | Path) -> Path:
    """A local MBPP-format JSONL (task_id, text, code, test_list, test_setup_code) as a code
    task: the prompt is the description and the first test in a docstring, as in the MBPP paper."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"MBPP file {path} does not exist")
    records = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("text", "code", "test_list") if k not in row]
            if missing:
                raise TaskError(f"{path}:{line_no}: not an MBPP record (missing {', '.join(missing)})")
            setup = row.get("test_setup_code") or ""
            records.append({"id": str(row.get("task_id", line_no)),
                            "prompt": f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n',
                            "reference": row["code"].replace("\r\n", "\n"),
                            "tests": ([setup] if setup else []) + list(row["test_list"])})
    return write_jsonl(out, records)
