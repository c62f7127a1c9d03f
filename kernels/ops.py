"""Which kernel serves each op of the training hot path, chosen per run.

Each kernel stem (rms_norm, rope, swiglu, cross_entropy, flash_attention) holds the PyTorch
reference beside its Triton implementation, so the two can be compared anywhere. The model never
imports a kernel directly: it receives a `KernelOps` built here from `model.kernels` and an
attention function built from `model.attention`.

`kernels/` has no `__init__.py` on purpose: a regular package named `kernels` at the repository
root would shadow the PyPI package `kernels` that transformers imports at start-up whenever the
root is on sys.path (`python -m ...` and pytest from the root); this folder installs as the
namespace package `megatron_code.kernels`.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .cross_entropy import (IGNORE_INDEX, cross_entropy_torch, cross_entropy_triton,
                            fused_linear_cross_entropy_torch, fused_linear_cross_entropy_triton)
from .flash_attention import SUPPORTED_HEAD_DIMS, attention_torch, flash_attention_triton
from .rms_norm import layer_norm_torch, layer_norm_triton, rms_norm_torch, rms_norm_triton
from .rope import apply_rope_torch, apply_rope_triton, rope_tables
from .swiglu import gelu_torch, gelu_triton, swiglu_torch, swiglu_triton

__all__ = ["IGNORE_INDEX", "AutoAttention", "KernelOps", "KernelUnavailable", "TORCH_OPS", "TRITON_OPS",
           "attention_torch", "build_ops", "build_attention", "describe_attention", "rope_tables"]


class KernelUnavailable(RuntimeError):
    """The requested kernel choice cannot run here; the message says why and what can."""


@dataclass(frozen=True)
class KernelOps:
    name: str
    rms_norm: Callable
    layer_norm: Callable
    apply_rope: Callable
    swiglu: Callable
    gelu: Callable
    cross_entropy: Callable
    fused_linear_cross_entropy: Callable


TORCH_OPS = KernelOps("torch", rms_norm_torch, layer_norm_torch, apply_rope_torch, swiglu_torch,
                      gelu_torch, cross_entropy_torch, fused_linear_cross_entropy_torch)
TRITON_OPS = KernelOps("triton", rms_norm_triton, layer_norm_triton, apply_rope_triton, swiglu_triton,
                       gelu_triton, cross_entropy_triton, fused_linear_cross_entropy_triton)


def _triton_problem(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on `device`, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # the interpreter runs them on CPU tensors (tests)
    return f"Triton kernels need a CUDA device (this run is on {device.type}; TRITON_INTERPRET=1 runs them on CPU for tests)"


def build_ops(choice: str, device: torch.device) -> KernelOps:
    """`auto`: Triton on CUDA when available, else the PyTorch reference path."""
    device = torch.device(device)
    problem = _triton_problem(device)
    if choice == "torch" or (choice == "auto" and (problem or device.type != "cuda")):
        return TORCH_OPS
    if choice in ("auto", "triton") and problem is None:
        return TRITON_OPS
    if choice == "triton":
        raise KernelUnavailable(f"model.kernels=triton is unavailable: {problem}; available: auto, torch")
    raise KernelUnavailable(f"model.kernels={choice!r} is unknown; choose auto, triton or torch")


def _flash_attn_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device (this run is on {device.type})"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed (it has no PyPI wheel; build it from source)"
    return None


def _is_hopper_or_newer(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def flash_attn_attention(q, k, v, document_ids=None, scale=None):
    """The flash-attn package behind our attention contract: (B, H, T, D) in and out; packed
    documents go through its variable-length entry point."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, Hq, T, D = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, T, H, D)
    if document_ids is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True).transpose(1, 2)
    # Each contiguous run of one document id within a row becomes its own sequence.
    starts = torch.ones(B, T, dtype=torch.bool, device=q.device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    positions = torch.nonzero(starts.flatten()).flatten()
    cu_seqlens = torch.cat([positions, positions.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_attn_varlen_func(q.reshape(B * T, Hq, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                 cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale, causal=True)
    return out.view(B, T, Hq, D).transpose(1, 2)


_ATTENTION_NAMES = {attention_torch: "sdpa", flash_attn_attention: "flash_attn", flash_attention_triton: "triton"}


@dataclass(frozen=True)
class AutoAttention:
    """`model.attention=auto`, decided per call. Batches without document ids go to `unpacked`.
    Packed batches (document_ids) go to `packed`: on CUDA, flash-attn's variable-length entry
    point when installed, else our Triton kernel, which skips key blocks of other documents
    (SDPA with a (B, T, T) document mask loses its flash backend and visits every key block);
    on CPU, SDPA with the mask (the reference)."""
    unpacked: Callable
    packed: Callable

    def __call__(self, q, k, v, document_ids=None, scale=None):
        if document_ids is None:
            return self.unpacked(q, k, v, None, scale)
        return self.packed(q, k, v, document_ids, scale)


def describe_attention(attention: Callable) -> str:
    """What serves each kind of batch, for the run's start-up line."""
    if isinstance(attention, AutoAttention):
        return (f"auto: {_ATTENTION_NAMES[attention.unpacked]}, "
                f"packed sequences: {_ATTENTION_NAMES[attention.packed]}")
    return _ATTENTION_NAMES[attention]


def _triton_attention_problem(device: torch.device, head_dim: int | None) -> str | None:
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        return f"the Triton attention kernel takes head dims {SUPPORTED_HEAD_DIMS}, this model's is {head_dim}"
    return _triton_problem(device)


def _auto_attention(device: torch.device, head_dim: int | None) -> AutoAttention:
    cuda, flash_attn = device.type == "cuda", _flash_attn_problem(device) is None
    unpacked = flash_attn_attention if flash_attn and not _is_hopper_or_newer(device) else attention_torch
    if not cuda:
        packed = attention_torch
    elif flash_attn:
        packed = flash_attn_attention
    elif _triton_attention_problem(device, head_dim) is None:
        packed = flash_attention_triton
    else:
        packed = attention_torch
    return AutoAttention(unpacked, packed)


def build_attention(choice: str, device: torch.device, head_dim: int | None = None) -> Callable:
    """`auto`: see AutoAttention; unpacked batches take cuDNN SDPA on Hopper, flash-attn elsewhere
    on CUDA when installed, else SDPA. `head_dim` (when given) rules out the Triton kernel for
    head sizes it does not take, here rather than at the first packed batch."""
    device = torch.device(device)
    if choice == "auto":
        return _auto_attention(device, head_dim)
    if choice == "sdpa":
        return attention_torch
    if choice == "flash_attn":
        problem = _flash_attn_problem(device)
        if problem:
            raise KernelUnavailable(f"model.attention=flash_attn is unavailable: {problem}; available: auto, sdpa"
                                    + (", triton" if _triton_attention_problem(device, head_dim) is None else ""))
        return flash_attn_attention
    if choice == "triton":
        problem = _triton_attention_problem(device, head_dim)
        if problem:
            raise KernelUnavailable(f"model.attention=triton is unavailable: {problem}; available: auto, sdpa")
        return flash_attention_triton
    raise KernelUnavailable(f"model.attention={choice!r} is unknown; choose auto, sdpa, flash_attn or triton")
