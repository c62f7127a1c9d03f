"""Scoring a model on task files: the one loop tools/evaluate.py and the study share, and the
prompt format it feeds the model.

A task's text reaches the model raw (as written: what lm-evaluation-harness feeds, so the two
agree on the same file) or as the user turn of a chat template, the very template data/chat.py
builds instruction data with (multiple_choice.py and code.py say what is scored then).
`chat_template` chooses:

- `none`: raw;
- `role_tokens`, `hf`, `text`: that kind of template for the model's tokenizer;
- `auto`: for a checkpoint of ours tuned here (train.stage=sft), the template recorded with its
  instruction data (`<prefix>.meta.json`), checked against its tokenizer; for any other model,
  its tokenizer folder's own Jinja template (a Hugging Face instruct model, or one imported
  from it) when it has one; else raw.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from megatron_code.data.chat import TEMPLATE_KINDS, ChatTemplate, hf_chat_template, template_for
from megatron_code.data.errors import DataError
from megatron_code.data.sft import check_sft_dataset
from megatron_code.data.tokenizer import HFTokenizer
from megatron_code.evaluation.code import score_code
from megatron_code.evaluation.lm import LanguageModel
from megatron_code.evaluation.multiple_choice import score_multiple_choice
from megatron_code.evaluation.results import SCALE_NOTE, TaskScores, prompt_format
from megatron_code.evaluation.sandbox import Limits, sandbox_features
from megatron_code.evaluation.tasks import MULTIPLE_CHOICE, Task

CHAT_TEMPLATES = ("auto", "none", *TEMPLATE_KINDS[1:])
_EXPLICIT = f"--chat-template {'|'.join(TEMPLATE_KINDS[1:])} (or none for raw prompts)"


def chat_template_for(model: LanguageModel, choice: str) -> ChatTemplate | None:
    """The chat template `choice` names for `model` (module docstring); None for raw prompts."""
    if choice not in CHAT_TEMPLATES:
        raise DataError(f"chat template {choice!r} is not one of {', '.join(CHAT_TEMPLATES)}")
    if choice == "none":
        return None
    if choice != "auto":
        return template_for(model.tokenizer, choice)
    if model.tuned_on:
        return _tuned_template(model)
    tokenizer = model.tokenizer
    if isinstance(tokenizer, HFTokenizer) and hf_chat_template(Path(tokenizer.path)):
        return template_for(tokenizer, "hf")
    return None


def _tuned_template(model: LanguageModel) -> ChatTemplate:
    """The one template every instruction source of a model tuned here was made with."""
    found: dict[str, ChatTemplate] = {}
    for prefix in model.tuned_on:
        if not Path(f"{prefix}.meta.json").is_file():
            raise DataError(f"chat template auto: {model.path} was tuned on {prefix}, whose {prefix}.meta.json "
                            f"(the chat template it was made with) is not there; pass {_EXPLICIT}")
        try:
            found[prefix] = check_sft_dataset(prefix, model.tokenizer)
        except DataError as e:
            raise DataError(f"chat template auto: {model.path} was tuned on {e}") from None
    kinds = {json.dumps(t.describe(), sort_keys=True): prefix for prefix, t in found.items()}
    if len(kinds) > 1:
        made = ", ".join(f"{p}: {found[p].describe()['kind']}" for p in kinds.values())
        raise DataError(f"chat template auto: {model.path} was tuned on data made with different chat templates "
                        f"({made}); pass {_EXPLICIT}")
    return found[model.tuned_on[0]]


def score_tasks(model: LanguageModel, tasks: list[Task], chat_template: str = "none", limits: Limits = Limits(),
                max_new_tokens: int = 128, batch_size: int = 16, progress: bool = False,
                log: Callable[[str], None] = print) -> tuple[list[TaskScores], dict]:
    """Every task scored (multiple choice by option log-likelihood, code by greedy generation
    run in the sandbox), one line logged per task; and what a results file records beside the
    scores: the prompt format (and the chat template) and, when code ran, the sandbox."""
    template = chat_template_for(model, chat_template)
    log(f"prompt format: {prompt_format(template)}; {SCALE_NOTE[0].lower()}{SCALE_NOTE[1:]}")
    scores = []
    for task in tasks:
        if task.kind == MULTIPLE_CHOICE:
            scores.append(score_multiple_choice(task, model.sample_losses, model.tokenizer, model.max_length,
                                                batch_size, model.device, template))
        else:
            scores.append(score_code(task, model, limits, max_new_tokens, batch_size, progress=progress,
                                     template=template))
        log(f"{task.name}: " + ", ".join(f"{m} {v:.4f}" for m, v in scores[-1].metrics.items())
            + f" (n={scores[-1].n})")
    record: dict = {"prompt_format": prompt_format(template)}
    if template is not None:
        record["chat_template"] = template.describe()
    if any(task.kind != MULTIPLE_CHOICE for task in tasks):
        record["sandbox"] = {**sandbox_features(), "limits": asdict(limits)}
    return scores, record
