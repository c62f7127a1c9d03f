"""Multiple choice by per-option log-likelihood.

Raw prompts: each option is scored as the continuation " " + option after the question,
tokenized as lm-evaluation-harness does (the whole text is encoded and split where the
question's own encoding ends, with the question's trailing whitespace moved to the
continuation), so our numbers and lm-eval's agree on the same file.

With a chat template (an instruction-tuned model): the question is a user turn and the option
the assistant's reply, encoded by data/chat.py as instruction data is; the scored continuation
is what the tuning loss falls on there, the option and the end of the turn (so "1" does not
win as the start of "12"; lm-eval's chat mode scores the option alone).

Three rules pick the answer:

- acc:      the highest summed log-likelihood;
- acc_norm: the highest log-likelihood per character of the option (lm-eval's acc_norm);
- acc_ppl:  the lowest perplexity, i.e. the highest mean log-likelihood per token of the
            option (the rule Ma et al. (ICLR 2024) evaluate with).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_code.data.chat import ChatTemplate
from megatron_code.data.tokenizer import Tokenizer
from megatron_code.evaluation.lm import SampleLosses
from megatron_code.evaluation.results import TaskScores, prompt_format
from megatron_code.evaluation.tasks import MULTIPLE_CHOICE, Task

METRICS = ("acc", "acc_norm", "acc_ppl")
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class _Request:
    item: int
    option: int
    tokens: list[int]
    """context + continuation ids, cut on the left to fit the model."""
    continuation: int
    """How many of the last ids are the continuation."""


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm-evaluation-harness splits them."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation)
    n_context = len(tokenizer.encode(stripped))
    return whole[:n_context], whole[n_context:]


def encode_chat_pairs(template: ChatTemplate, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each (question, answer) as data/chat.py encodes the
    conversation user: question, assistant: answer: the continuation is the run carrying the loss."""
    out = []
    for ids, mask in template.encode_batch([[{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}] for question, answer in pairs]):
        learned = np.flatnonzero(mask)
        out.append((ids[:learned[0]].tolist(), ids[learned[0]: learned[-1] + 1].tolist()))
    return out


def _requests(task: Task, tokenizer: Tokenizer, max_length: int,
              template: ChatTemplate | None = None) -> list[_Request]:
    pairs = [(i, j, item.question, option)
             for i, item in enumerate(task.items) for j, option in enumerate(item.options)]
    if template is None:
        encoded = [encode_pair(tokenizer, question, TARGET_DELIMITER + option) for _, _, question, option in pairs]
    else:
        encoded = encode_chat_pairs(template, [(question, option) for _, _, question, option in pairs])
    out = []
    for (i, j, _, _), (context, continuation) in zip(pairs, encoded):
        if not continuation:
            raise ValueError(f"{task.path}: item {task.items[i].id} option {j} encodes to no tokens")
        out.append(_Request(i, j, (context + continuation)[-(max_length + 1):], len(continuation)))
    return out


@torch.no_grad()
def option_log_likelihoods(requests: list[_Request], sample_losses: SampleLosses, batch_size: int,
                           device) -> tuple[list[float], list[int]]:
    """Summed log-likelihood and token count of every request's continuation."""
    log_likelihoods, counts = [0.0] * len(requests), [0] * len(requests)
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r].tokens))  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        batch = [requests[r] for r in order[start: start + batch_size]]
        width = max(len(r.tokens) for r in batch) - 1
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width)
        for b, r in enumerate(batch):  # right padding: causal attention never sees it
            n = len(r.tokens) - 1
            tokens[b, :n] = torch.tensor(r.tokens[:-1])
            labels[b, :n] = torch.tensor(r.tokens[1:])
            mask[b, n - r.continuation: n] = 1
        loss_sums, token_counts = sample_losses(tokens.to(device), labels.to(device), mask.to(device))
        for b, r in enumerate(order[start: start + batch_size]):
            log_likelihoods[r], counts[r] = -float(loss_sums[b]), int(token_counts[b])
    return log_likelihoods, counts


def score_multiple_choice(task: Task, sample_losses: SampleLosses, tokenizer: Tokenizer, max_length: int,
                          batch_size: int = 16, device="cpu", template: ChatTemplate | None = None) -> TaskScores:
    """acc, acc_norm and acc_ppl of a multiple-choice task; raw prompts, or each question as a
    user turn of `template`."""
    if task.kind != MULTIPLE_CHOICE:
        raise ValueError(f"{task.path} is a {task.kind} task, not multiple choice")
    requests = _requests(task, tokenizer, max_length, template)
    lls, counts = option_log_likelihoods(requests, sample_losses, batch_size, device)
    per_option: list[list[tuple[float, int, int]]] = [[] for _ in task.items]
    for r, ll, count in zip(requests, lls, counts):
        per_option[r.item].append((ll, count, len(task.items[r.item].options[r.option])))
    rules = {"acc": lambda ll, tokens, chars: ll, "acc_norm": lambda ll, tokens, chars: ll / chars,
             "acc_ppl": lambda ll, tokens, chars: ll / tokens}
    per_item = {name: [] for name in METRICS}
    for item, options in zip(task.items, per_option):
        for name, rule in rules.items():
            scores = [rule(*o) for o in options]
            per_item[name].append(float(scores.index(max(scores)) == item.answer))  # ties: the first, as lm-eval
    return TaskScores.from_items(task.name, task.kind, [item.id for item in task.items], per_item,
                                 prompt_format=prompt_format(template))
