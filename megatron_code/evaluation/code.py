"""Code generation: greedy completion of each prompt, scored by pass@1 (the program and its test
asserts run in the sandbox) and by BLEU against the reference solution (Ma et al. score MBPP by
BLEU; it still moves when a small model passes nothing), both from 0 to 1.

A completion ends at the first line that starts in column 0 and does not begin another
definition (`def`, `class`, `import`, `from`, a decorator): for a prompt that opens a function,
that is the end of its body.

With a chat template (an instruction-tuned model), the prompt is a user turn and the reply
follows the assistant header; generation stops at the end-of-turn token. The reply's code (its
first fenced block when it has one, without the prompt when the reply repeats it, as a model
tuned to answer with the whole function does) is cut as above; the program is still prompt +
code, which holds whether the reply is a body or a whole function (the later `def` wins).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from megatron_code.data.chat import ChatTemplate
from megatron_code.evaluation.lm import LanguageModel
from megatron_code.evaluation.results import TaskScores, prompt_format
from megatron_code.evaluation.sandbox import Limits, SandboxUnavailable, run_python, sandbox_features
from megatron_code.evaluation.tasks import CODE, Task

METRICS = ("pass@1", "bleu")
_END = re.compile(r"\n(?=[^\s@])(?!(?:def|class|import|from)\b)")
_CODE_TOKEN = re.compile(r"\w+|[^\w\s]")
_FENCE = re.compile(r"```[\w+-]*\n(.*?)(?:```|\Z)", re.DOTALL)


def truncate_completion(text: str) -> str:
    match = _END.search(text)
    return text if match is None else text[: match.start() + 1]


def code_tokens(text: str) -> list[str]:
    """Identifiers and numbers whole, every other non-space character alone."""
    return _CODE_TOKEN.findall(text)


def sentence_bleu(hypothesis: list[str], reference: list[str], max_order: int = 4) -> float:
    """BLEU of one tokenized hypothesis against one reference as a fraction from 0 to 1 (the
    usual 0-100 figure divided by 100, the scale of every score here), for sentence-level use:
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
    return math.exp(brevity + sum(log_precisions) / len(log_precisions))


def reply_code(reply: str, prompt: str) -> str:
    """The code of a chat reply to `prompt`: its first fenced block when it has one, without the
    prompt when it repeats it."""
    fenced = _FENCE.search(reply)
    code = fenced.group(1) if fenced else reply
    return code.removeprefix(prompt)


def complete(model: LanguageModel, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             progress: bool = False, template: ChatTemplate | None = None) -> list[str]:
    """Greedy completions of `prompts`, each cut where its function ends: raw, generation stops
    there or at end of document; with `template`, each prompt is a user turn and generation
    stops at the end of the assistant's turn."""
    tokenizer = model.tokenizer
    stop = template.stop_ids if template is not None else {tokenizer.eod_id}

    def finished(ids: list[int]) -> bool:
        return ids[-1] in stop or (template is None and _END.search(tokenizer.decode(ids)) is not None)

    def encode(prompt: str) -> list[int]:
        if template is None:
            return tokenizer.encode(prompt)
        return template.prompt_ids([{"role": "user", "content": prompt}])
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress):
        batch = prompts[start: start + batch_size]
        for prompt, ids in zip(batch, model.generate([encode(p) for p in batch], max_new_tokens, finished)):
            text = tokenizer.decode(ids[:-1] if ids and ids[-1] in stop else ids)
            out.append(truncate_completion(text if template is None else reply_code(text, prompt)))
    return out


def score_code(task: Task, model: LanguageModel, limits: Limits = Limits(), max_new_tokens: int = 128,
               batch_size: int = 16, workers: int = 2, progress: bool = False,
               template: ChatTemplate | None = None) -> TaskScores:
    """pass@1 (greedy) and BLEU for every item of a code task; raw prompts, or each prompt as a
    user turn of `template`."""
    if task.kind != CODE:
        raise ValueError(f"{task.path} is a {task.kind} task, not code generation")
    sandbox_features()  # refuse early, before generating, where code cannot run contained
    completions = complete(model, [item.prompt for item in task.items], max_new_tokens, batch_size, progress,
                           template)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = list(pool.map(lambda pair: run_python(pair[0].prompt + pair[1], "\n".join(pair[0].tests), limits),
                             zip(task.items, completions)))
    unrun = [r for r in runs if r.status == "sandbox_error"]
    if unrun:  # counted as failures they would lower pass@1 without a word
        raise SandboxUnavailable(f"{task.name}: the sandbox could not run {len(unrun)} of {len(runs)} programs; "
                                 f"the first: {unrun[0].output.strip()}")
    bleu = [sentence_bleu(code_tokens(c), code_tokens(item.reference)) if item.reference else math.nan
            for item, c in zip(task.items, completions)]
    per_item = {"pass@1": [float(r.passed) for r in runs]}
    if not any(math.isnan(b) for b in bleu):
        per_item["bleu"] = bleu
    samples = [{"id": item.id, "completion": c, "status": r.status, "output": r.output[-2000:]}
               for item, c, r in zip(task.items, completions, runs)]
    return TaskScores.from_items(task.name, task.kind, [item.id for item in task.items], per_item, samples=samples,
                                 prompt_format=prompt_format(template))
