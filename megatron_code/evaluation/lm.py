"""A model as the evaluators see it, whatever its format: a checkpoint of ours or a Hugging Face
folder (an export, or any causal LM transformers loads).

Scoring goes through one function, `SampleLosses`: for a batch of tokens, labels and loss mask
it returns each sample's summed masked loss and its token count. The training loop's
evaluation forward (`ParallelModel.evaluate`) has this shape under any parallel layout, so the
same scorers run inside training and here, all normalized over the tokenizer's vocabulary
(the training loss leaves the embedding's padding rows out; here and in an export they are cut).
Generation is greedy, in left-padded batches.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_code.data.errors import DataError
from megatron_code.data.tokenizer import Tokenizer, load_tokenizer

SampleLosses = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(tokens (B, T), labels (B, T), loss_mask (B, T)) -> (summed loss over masked labels (B,),
number of masked labels (B,)), in nats, fp32."""

Generate = Callable[[list[list[int]], int, Callable[[list[int]], bool]], list[list[int]]]
"""(prompts, max_new_tokens, finished(new ids)) -> each prompt's greedy new ids, cut where
`finished` first holds."""

NextLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(tokens (B, T), positions (B, T), real (B, T) bool: False on left padding) -> logits of each
row's next token (B, V)."""


def masked_sums(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy over masked labels, and their counts."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
    mask = loss_mask.float()
    return (losses * mask).sum(1), mask.sum(1)


def gpt_sample_losses(model: torch.nn.Module, vocab_size: int) -> SampleLosses:
    """SampleLosses of our GPT in one process over the tokenizer's `vocab_size` (padding rows
    cut, as in an export); the caller sets eval mode, no_grad and autocast."""
    return lambda tokens, labels, loss_mask: masked_sums(model(tokens)[..., :vocab_size], labels, loss_mask)


def gpt_next_logits(model: torch.nn.Module, vocab_size: int) -> NextLogits:
    """Our GPT on left-padded rows: padding is a document of its own, so no real token sees it."""
    return lambda tokens, positions, real: model(tokens, positions, real.long())[:, -1, :vocab_size].float()


@torch.no_grad()
def greedy(next_logits: NextLogits, prompts: list[list[int]], max_new_tokens: int, max_length: int,
           finished: Callable[[list[int]], bool] = lambda ids: False, device="cpu") -> list[list[int]]:
    """Greedy continuations of several prompts at once (left-padded rows), recomputing each
    row's last `max_length` tokens every step (our GPT keeps no KV cache). A row stops after
    `max_new_tokens` or when `finished(its new ids)` holds."""
    outs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    while active:
        rows = [(prompts[i] + outs[i])[-max_length:] for i in active]
        width = max(map(len, rows))
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, ids in enumerate(rows):
            tokens[r, width - len(ids):] = torch.tensor(ids)
            positions[r, width - len(ids):] = torch.arange(len(ids))
            real[r, width - len(ids):] = True
        next_ids = next_logits(tokens.to(device), positions.to(device), real.to(device)).argmax(-1).tolist()
        for i, next_id in zip(active, next_ids):
            outs[i].append(next_id)
        active = [i for i in active if len(outs[i]) < max_new_tokens and not finished(outs[i])]
    return outs


@dataclass
class LanguageModel:
    path: str
    step: int | None
    """Training step of a checkpoint of ours; None for a Hugging Face folder."""
    tokenizer: Tokenizer
    max_length: int
    """Longest token window the model takes."""
    vocab_size: int
    """Rows of the tokenizer's vocabulary (logits beyond are padding and never chosen)."""
    sample_losses: SampleLosses
    generate: Generate
    device: torch.device
    tuned_on: tuple[str, ...] = ()
    """Prefixes of the instruction data a checkpoint of ours was tuned on (train.stage=sft), as
    its config names them; empty for any other model."""


def is_hf_folder(path: str | Path) -> bool:
    """A transformers folder (its config.json names a model_type; a run directory of ours also
    holds a config.json, the training config)."""
    config = Path(path) / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def load_language_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        tokenizer: str | None = None) -> LanguageModel:
    """A checkpoint of ours (run, checkpoints or step directory) or a Hugging Face folder;
    `tokenizer` replaces a checkpoint's data.tokenizer (a path relative to where it trained)."""
    device = torch.device(device)
    if is_hf_folder(path):
        return _load_hf(Path(path), device, dtype)
    return _load_ours(Path(path), device, dtype, tokenizer)


def _load_ours(path: Path, device: torch.device, dtype: torch.dtype, tokenizer_path: str | None) -> LanguageModel:
    """Our GPT scores; generation runs on its transformers twin (model/hf.py, the mapping the
    conversion tests hold to transformers within 1e-4), which keeps a KV cache. A model no
    transformers class expresses generates by recomputing each step."""
    from megatron_code.model.hf import ConversionError, to_hf_model
    from megatron_code.training.checkpoint import check_tokenizer
    from megatron_code.training.weights import load_model

    model, weights = load_model(path, dtype)
    model.to(device)
    try:
        tokenizer = load_tokenizer(tokenizer_path or weights.config.data.tokenizer)
    except DataError as e:
        raise DataError(f"{e}{'' if tokenizer_path else f' (data.tokenizer of {weights.path}; pass --tokenizer)'}") from None
    vocab, max_length = tokenizer.vocab_size, weights.config.model.max_seq_len
    check_tokenizer(weights.config.model, weights.path, vocab, tokenizer_path or weights.config.data.tokenizer)
    try:
        generate = _hf_generate(to_hf_model(model, vocab).eval(), max_length, tokenizer.eod_id, device)
    except ConversionError:
        def generate(prompts, max_new_tokens, finished):
            return greedy(gpt_next_logits(model, vocab), prompts, max_new_tokens, max_length, finished, device)
    config = weights.config
    tuned_on = tuple(s.prefix for s in config.data.sources) if config.train.stage == "sft" else ()
    return LanguageModel(str(weights.path), weights.step, tokenizer, max_length, vocab,
                         gpt_sample_losses(model, vocab), generate, device, tuned_on)


def _load_hf(path: Path, device: torch.device, dtype: torch.dtype) -> LanguageModel:
    from transformers import AutoModelForCausalLM

    from megatron_code.training.checkpoint import CheckpointError
    from megatron_code.training.integrity import safetensors_files

    damage = safetensors_files(path)[1]
    if damage:
        raise CheckpointError(damage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    max_length = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    vocab = tokenizer.vocab_size

    def sample_losses(tokens, labels, loss_mask):
        return masked_sums(model(input_ids=tokens).logits[..., :vocab], labels, loss_mask)
    return LanguageModel(str(path), None, tokenizer, max_length, vocab, sample_losses,
                         _hf_generate(model, max_length, tokenizer.eod_id, device), device)


def _hf_generate(model, max_length: int, pad_id: int, device: torch.device) -> Generate:
    """Greedy decoding through transformers' generate (KV cache), left-padded batches."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    @torch.no_grad()
    def generate(prompts: list[list[int]], max_new_tokens: int, finished) -> list[list[int]]:
        prompts = [p[-(max_length - max_new_tokens):] for p in prompts]  # room for the new tokens
        width = max(map(len, prompts))
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for r, ids in enumerate(prompts):
            tokens[r, width - len(ids):] = torch.tensor(ids)
            attention_mask[r, width - len(ids):] = 1

        class Finished(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([finished(row[width:].tolist()) for row in input_ids], device=input_ids.device)
        out = model.generate(tokens.to(device), attention_mask=attention_mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, stopping_criteria=StoppingCriteriaList([Finished()]),
                             pad_token_id=pad_id, eos_token_id=None)
        rows = [row[width:].tolist() for row in out]
        # a row that finished early goes on generating until the whole batch stops: cut it
        return [next((ids[:k] for k in range(1, len(ids) + 1) if finished(ids[:k])), ids) for ids in rows]
    return generate
