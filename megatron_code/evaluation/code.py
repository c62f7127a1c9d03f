"""Code generation: greedy completion of each prompt, scored by pass@1 (the program and its test
asserts run in the sandbox) and by BLEU against the reference solution (Ma et al. score MBPP by
BLEU; it still moves when a small model passes nothing).

A completion ends at the first line that starts in column 0 and does not begin another
definition (`def`, `class`, `import`, `from`, a decorator): for a prompt that opens a function,
that is the end of its body.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from megatron_code.evaluation.lm import LanguageModel
from megatron_code.evaluation.results import TaskScores
from megatron_code.evaluation.sandbox import Limits, run_python, sandbox_features
from megatron_code.evaluation.tasks import CODE, Task

METRICS = ("pass@1", "bleu")
_END = re.compile(r"\n(?=[^\s@])(?!(?:def|class|import|from)\b)")
_CODE_TOKEN = re.compile(r"\w+|[^\w\s]")


def truncate_completion(text: str) -> str:
    match = _END.search(text)
    return text if match is None else text[: match.start() + 1]


def code_tokens(text: str) -> list[str]:
    """Identifiers and numbers whole, every other non-space character alone."""
    return _CODE_TOKEN.findall(text)


def sentence_bleu(hypothesis: list[str], reference: list[str], max_order: int = 4) -> float:
    """BLEU (0-100) of one tokenized hypothesis against one reference, for sentence-level use:
    orders with no n-grams in the hypothesis are left out, and a zero n-gram match count is
    smoothed geometrically (the NIST mteval rule, method 3 of Chen and Cherry 2014)."""
    if not hypothesis or not reference:
        return 0.0
    log_precisions, smoothing = [], 1.0
    for n in range(1, max_order + 1):
        hyp = Counter(tuple(hypothesis[i: i + n]) for i in range(len(hypothesis) - n + 1))
        total = sum(hyp.values())
        if total == 0:
            break
        ref = Counter(tuple(reference[i: i + n]) for i in range(len(reference) - n + 1))
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items())
        if matches == 0 and n == 1:
            return 0.0
        if matches == 0:
            smoothing *= 2
            log_precisions.append(math.log(1 / (smoothing * total)))
        else:
            log_precisions.append(math.log(matches / total))
    brevity = min(0.0, 1 - len(reference) / len(hypothesis))
    return 100 * math.exp(brevity + sum(log_precisions) / len(log_precisions))


def complete(model: LanguageModel, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             progress: bool = False) -> list[str]:
    """Greedy completions of `prompts`, each cut where its function ends (or at end of document)."""
    tokenizer = model.tokenizer
    eod = tokenizer.eod_id

    def finished(ids: list[int]) -> bool:
        return ids[-1] == eod or _END.search(tokenizer.decode(ids)) is not None
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress):
        batch = [tokenizer.encode(p) for p in prompts[start: start + batch_size]]
        for ids in model.generate(batch, max_new_tokens, finished):
            out.append(truncate_completion(tokenizer.decode(ids[:-1] if ids[-1] == eod else ids)))
    return out


def score_code(task: Task, model: LanguageModel, limits: Limits = Limits(), max_new_tokens: int = 128,
               batch_size: int = 16, workers: int = 2, progress: bool = False) -> TaskScores:
    """pass@1 (greedy) and BLEU for every item of a code task."""
    if task.kind != CODE:
        raise ValueError(f"{task.path} is a {task.kind} task, not code generation")
    sandbox_features()  # refuse early, before generating, where code cannot run contained
    completions = complete(model, [item.prompt for item in task.items], max_new_tokens, batch_size, progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = list(pool.map(lambda pair: run_python(pair[0].prompt + pair[1], "\n".join(pair[0].tests), limits),
                             zip(task.items, completions)))
    bleu = [sentence_bleu(code_tokens(c), code_tokens(item.reference)) if item.reference else math.nan
            for item, c in zip(task.items, completions)]
    per_item = {"pass@1": [float(r.passed) for r in runs]}
    if not any(math.isnan(b) for b in bleu):
        per_item["bleu"] = bleu
    samples = [{"id": item.id, "completion": c, "status": r.status, "output": r.output[-2000:]}
               for item, c, r in zip(task.items, completions, runs)]
    return TaskScores.from_items(task.name, task.kind, [item.id for item in task.items], per_item, samples=samples)
