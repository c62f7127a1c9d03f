"""The papers' evaluation sets, from the files their authors released, as task files (tasks.py).

Each converter reads one set in the format it is distributed in, which the user downloads:

- Ma et al. (ANCHORS.md 3): logic (C-Eval's `logic` subject, CSV id,question,A,B,C,D,answer),
  JEC-QA (JSONL statement, option_list, answer as a list of letters), ScienceQA (problems.json,
  an object of id -> question, choices, answer, hint, image, split), E-KAR (JSON or JSONL
  question, choices {label, text}, answerKey), CosQA (a JSON list of doc, code, label) and MBPP
  (tasks.convert_mbpp);
- Aryabumi et al.: HumanEval (JSONL task_id, prompt, canonical_solution, test, entry_point) and
  MBPP; their natural-language reasoning set is lm-evaluation-harness tasks (README).

Every item becomes a multiple-choice item scored by option log-likelihood, or a code item scored
by pass@1. Items our evaluators cannot score as the paper did are left out and counted, never
silently: JEC-QA questions with several correct options, ScienceQA questions with an image
(the models read text only). A record missing a field is an error naming its file and line.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Iterator

from megatron_code.data.corpus import write_jsonl
from megatron_code.evaluation.tasks import TaskError, convert_mbpp

LETTERS = "ABCDEFGH"


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a CSV with a header, JSONL, a JSON list or a JSON object
    of id -> record (the id becomes the record's "id" when it has none)."""
    if not path.is_file():
        raise TaskError(f"evaluation set {path} does not exist")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for line_no, row in enumerate(csv.DictReader(f), start=2):
                yield f"{path}:{line_no}", row
        return
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        yield from ((f"{path}: record {i}", r) for i, r in enumerate(data))
    elif isinstance(data, dict) and all(isinstance(r, dict) for r in data.values()):
        yield from ((f"{path}: record {k}", {"id": k, **r}) for k, r in data.items())
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path}:{line_no}: not JSON ({e.msg}): expected JSONL, a JSON list or object, "
                                    "or a .csv") from None
                yield f"{path}:{line_no}", record


def _need(record: dict, where: str, *fields: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise TaskError(f"{where}: missing {', '.join(missing)} (fields of this set: {', '.join(fields)})")


def _letter(answer, letters: str, where: str) -> int:
    if not isinstance(answer, str) or answer.strip() not in letters:
        raise TaskError(f"{where}: answer {answer!r} is not one of the option letters {', '.join(letters)}")
    return letters.index(answer.strip())


def _ceval(where: str, r: dict) -> dict | None:
    _need(r, where, "question", "A", "B", "C", "D", "answer")
    return {"id": r.get("id", where), "question": f"{r['question'].strip()}\n答案：",
            "options": [r[k] for k in "ABCD"], "answer": _letter(r["answer"], "ABCD", where)}


def _jec_qa(where: str, r: dict) -> dict | None:
    _need(r, where, "statement", "option_list", "answer")
    letters = "".join(sorted(r["option_list"]))
    if len(r["answer"]) != 1:
        return None  # several correct options: not one option to score
    return {"id": r.get("id", where), "question": f"{r['statement'].strip()}\n答案：",
            "options": [r["option_list"][k] for k in letters], "answer": _letter(r["answer"][0], letters, where)}


def _scienceqa(where: str, r: dict, split: str = "test") -> dict | None:
    _need(r, where, "question", "choices", "answer")
    if r.get("split", split) != split or r.get("image"):
        return None  # another split, or a question about a picture
    context = f"Context: {r['hint'].strip()}\n" if r.get("hint") else ""
    answer = r["answer"]
    if not isinstance(answer, int) or not 0 <= answer < len(r["choices"]):
        raise TaskError(f"{where}: answer {answer!r} is not the index of one of its {len(r['choices'])} choices")
    return {"id": str(r.get("id", where)), "question": f"{context}Question: {r['question'].strip()}\nAnswer:",
            "options": list(r["choices"]), "answer": answer}


def _e_kar(where: str, r: dict) -> dict | None:
    _need(r, where, "question", "choices", "answerKey")
    labels = "".join(r["choices"]["label"])
    return {"id": r.get("id", where), "question": f"类比：{r['question'].strip()}\n答案：",
            "options": list(r["choices"]["text"]), "answer": _letter(r["answerKey"], labels, where)}


def _cosqa(where: str, r: dict) -> dict | None:
    _need(r, where, "doc", "code", "label")
    if r["label"] not in (0, 1):
        raise TaskError(f"{where}: label {r['label']!r} is not 0 or 1")
    return {"id": str(r.get("idx", where)), "question": f"Query: {r['doc'].strip()}\nCode:\n{r['code'].rstrip()}\n"
            "Does the code answer the query?\nAnswer:", "options": ["no", "yes"], "answer": r["label"]}


def _humaneval(where: str, r: dict) -> dict | None:
    _need(r, where, "task_id", "prompt", "canonical_solution", "test", "entry_point")
    return {"id": r["task_id"], "prompt": r["prompt"], "reference": r["canonical_solution"],
            "tests": [r["test"], f"check({r['entry_point']})"]}


SKIPPED = {"jec_qa": "with several correct options", "scienceqa": "with an image or of another split"}
CONVERTERS: dict[str, Callable[[str, dict], dict | None]] = {
    "logic": _ceval, "jec_qa": _jec_qa, "scienceqa": _scienceqa, "e_kar": _e_kar, "cosqa": _cosqa,
    "humaneval": _humaneval}
"""Task name -> converter of one record (None: left out). The task file is <name>.jsonl."""


def convert_paper_set(name: str, path: str | Path, out_dir: str | Path) -> tuple[Path, int, int]:
    """Convert the local file of one of the papers' sets; (task file, items written, items left out)."""
    if name == "mbpp":
        out = convert_mbpp(path, Path(out_dir) / "mbpp.jsonl")
        return out, sum(1 for line in out.read_text().splitlines() if line.strip()), 0
    converted = [CONVERTERS[name](where, r) for where, r in _records(Path(path))]
    kept = [r for r in converted if r is not None]
    if not kept:
        raise TaskError(f"{path}: no {name} item left to score ({len(converted)} read)")
    return write_jsonl(Path(out_dir) / f"{name}.jsonl", kept), len(kept), len(converted) - len(kept)
