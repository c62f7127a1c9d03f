"""What the elementwise and row-wise kernels share: the optional Triton import, output
allocation (one place tests patch to NaN-fill), launch checks, and viewing tensors as rows."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux-only; the reference path must still import elsewhere
    triton = tl = None

jit = triton.jit if triton is not None else (lambda fn: fn)


def alloc(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every kernel output is allocated here (uninitialized); tests patch it to NaN-fill."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def check_launch(kernel, t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed: use the torch kernels (model.kernels=torch)")
    if t.device.type == "cpu" and isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("Triton kernels need a GPU tensor; on CPU set TRITON_INTERPRET=1 "
                           "before importing megatron_code.kernels, or use model.kernels=torch")


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) -> (rows, n) with unit column stride; a view whenever possible."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()
