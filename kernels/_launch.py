"""What the elementwise and row-wise kernels share: the optional Triton import, output
allocation (one place tests patch to NaN-fill), launch checks, viewing tensors as rows, and the
dtype an activation output takes under autocast."""
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


def activation_dtype(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of a kernel's activation output for input `x`: inside an autocast region of x's
    device, the autocast dtype (an fp32 residual stream with fp32 weights feeds the next bf16
    matmul a bf16 activation: written once at half the bytes, not written in fp32 and cast again
    by autocast); otherwise `dtype`, by default x's own."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype or x.dtype


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
