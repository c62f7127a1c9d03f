"""A model as the evaluators see it, whatever its format: a checkpoint of ours or a Hugging Face
folder (an export, or any causal LM transformers loads).

Scoring goes through one function, `SampleLosses`: for a batch of tokens, labels and loss mask
it returns each sample's summed masked loss and its token count. The training loop's
evaluation forward has this shape under any parallel layout, so the same scorers run inside
training and here.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_code.data.tokenizer import Tokenizer, load_tokenizer

SampleLosses = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(tokens (B, T), labels (B, T), loss_mask (B, T)) -> (summed loss over masked labels (B,),
number of masked labels (B,)), in nats, fp32."""

NextLogits = Callable[[torch.Tensor], torch.Tensor]
"""tokens (1, T) -> logits of the next token (V,)."""


def masked_sums(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy over masked labels, and their counts."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
    mask = loss_mask.float()
    return (losses * mask).sum(1), mask.sum(1)


def gpt_sample_losses(model: torch.nn.Module, vocab_size: int) -> SampleLosses:
    """SampleLosses of our GPT in one process over the tokenizer's `vocab_size` (padding rows
    cut, as in an export); the caller sets eval mode, no_grad and autocast."""
    return lambda tokens, labels, loss_mask: masked_sums(model(tokens)[..., :vocab_size], labels, loss_mask)


@torch.no_grad()
def greedy(next_logits: NextLogits, prompt: list[int], max_new_tokens: int, max_length: int,
           stop: Callable[[list[int]], bool] = lambda ids: False, device="cpu") -> list[int]:
    """Greedy continuation of `prompt`, recomputing the whole window each step (our GPT has no
    KV cache); stops after `max_new_tokens` or when `stop(new ids)` holds."""
    tokens = torch.tensor([prompt], device=device)
    out: list[int] = []
    while len(out) < max_new_tokens and not stop(out):
        next_id = int(next_logits(tokens[:, -max_length:]).argmax())
        out.append(next_id)
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    return out


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
    next_logits: NextLogits
    device: torch.device


def is_hf_folder(path: str | Path) -> bool:
    """A transformers folder (its config.json names a model_type; a run directory of ours also
    holds a config.json, the training config)."""
    config = Path(path) / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def load_language_model(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> LanguageModel:
    """A checkpoint of ours (run, checkpoints or step directory) or a Hugging Face folder."""
    device = torch.device(device)
    return _load_hf(Path(path), device, dtype) if is_hf_folder(path) else _load_ours(Path(path), device, dtype)


def _load_ours(path: Path, device: torch.device, dtype: torch.dtype) -> LanguageModel:
    from megatron_code.training.weights import load_model

    model, weights = load_model(path, dtype)
    model.to(device)
    tokenizer = load_tokenizer(weights.config.data.tokenizer)
    vocab = tokenizer.vocab_size

    def next_logits(tokens):
        return model(tokens)[0, -1, :vocab].float()
    return LanguageModel(str(weights.path), weights.step, tokenizer, weights.config.model.max_seq_len, vocab,
                         gpt_sample_losses(model, vocab), next_logits, device)


def _load_hf(path: Path, device: torch.device, dtype: torch.dtype) -> LanguageModel:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    max_length = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    vocab = tokenizer.vocab_size

    def next_logits(tokens):
        return model(input_ids=tokens).logits[0, -1, :vocab].float()

    def sample_losses(tokens, labels, loss_mask):
        return masked_sums(model(input_ids=tokens).logits[..., :vocab], labels, loss_mask)
    return LanguageModel(str(path), None, tokenizer, max_length, vocab, sample_losses, next_logits, device)
