"""Kernels for the training hot path, chosen per run.

Each kernel stem (rms_norm, rope, swiglu, cross_entropy, flash_attention) holds the PyTorch
reference beside its Triton implementation, so the two can be compared anywhere. The model never
imports a kernel directly: it receives a `KernelOps` built here from `model.kernels` and an
attention function built from `model.attention`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .cross_entropy import IGNORE_INDEX, cross_entropy_torch
from .flash_attention import attention_torch
from .rms_norm import layer_norm_torch, rms_norm_torch
from .rope import apply_rope_torch, rope_tables
from .swiglu import gelu_torch, swiglu_torch

__all__ = ["IGNORE_INDEX", "KernelOps", "TORCH_OPS", "attention_torch", "build_ops", "build_attention", "rope_tables"]


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


TORCH_OPS = KernelOps("torch", rms_norm_torch, layer_norm_torch, apply_rope_torch, swiglu_torch,
                      gelu_torch, cross_entropy_torch)


def build_ops(choice: str, device: torch.device) -> KernelOps:
    """`auto` is the PyTorch reference path on CPU (Triton kernels arrive with the kernels issue)."""
    if choice in ("auto", "torch"):
        return TORCH_OPS
    raise KernelUnavailable(f"model.kernels={choice!r} is not available in this build; available: auto, torch")


def build_attention(choice: str, device: torch.device) -> Callable:
    """`auto` and `sdpa` use torch's scaled_dot_product_attention (cuDNN / flash backends on GPU)."""
    if choice in ("auto", "sdpa"):
        return attention_torch
    raise KernelUnavailable(f"model.attention={choice!r} is not available in this build; available: auto, sdpa")
