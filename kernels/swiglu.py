"""Activations applied to the MLP's up-projection output: PyTorch reference and Triton kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._launch import alloc as _alloc  # a module-level name, so tests can patch it per kernel
from ._launch import as_rows as _as_rows
from ._launch import check_launch as _check_launch
from ._launch import jit as _jit
from ._launch import tl, triton


def swiglu_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2F) holds [gate | up] along the last dim; returns silu(gate) * up (..., F)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_torch(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2, PanGu)."""
    return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------------------------------------
# Triton path: 2D grids of (row block, column block) tiles over the input viewed as rows; math in
# fp32, one rounding to the output dtype. The backward recomputes from the saved input.


def _tiles(rows: int, cols: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, BLOCK_M, BLOCK_N, num_warps) for an elementwise pass over a (rows, cols) matrix."""
    block_n = min(triton.next_power_of_2(cols), 1024)
    block_m = min(triton.next_power_of_2(rows), max(1, 2048 // block_n))
    warps = 4 if block_m * block_n <= 1024 else 8
    return (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n)), block_m, block_n, warps


@_jit
def _swiglu_fwd_kernel(GU, OUT, M, FF, stride_gu, stride_out,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < FF)
    gate_ptr = GU + rows * stride_gu + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + FF, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + rows * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)


@_jit
def _swiglu_bwd_kernel(DOUT, GU, DGU, M, FF, stride_dout, stride_gu, stride_dgu,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < FF)
    gate_ptr = GU + rows * stride_gu + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + FF, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + rows * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dout * up * (sig + silu * (1.0 - sig))
    dgu_ptr = DGU + rows * stride_dgu + cols
    tl.store(dgu_ptr, dgate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + FF, (dout * silu).to(DGU.dtype.element_ty), mask=mask)


class _SwiGLUFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, gate_up):
        if gate_up.shape[-1] % 2:
            raise ValueError(f"gate_up last dim must be even ([gate | up]), got {gate_up.shape[-1]}")
        _check_launch(_swiglu_fwd_kernel, gate_up)
        f = gate_up.shape[-1] // 2
        gu = _as_rows(gate_up, 2 * f)
        out = _alloc((gu.shape[0], f), gate_up)
        if out.numel():
            grid, block_m, block_n, warps = _tiles(gu.shape[0], f)
            _swiglu_fwd_kernel[grid](gu, out, gu.shape[0], f, gu.stride(0), out.stride(0),
                                     BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(gu)
        ctx.shape = gate_up.shape
        return out.view(*gate_up.shape[:-1], f)

    @staticmethod
    def backward(ctx, dout):
        (gu,) = ctx.saved_tensors
        rows, f = gu.shape[0], gu.shape[1] // 2
        dout2 = _as_rows(dout, f)
        dgu = _alloc((rows, 2 * f), gu)
        if dgu.numel():
            grid, block_m, block_n, warps = _tiles(rows, f)
            _swiglu_bwd_kernel[grid](dout2, gu, dgu, rows, f, dout2.stride(0), gu.stride(0),
                                     dgu.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        return dgu.view(ctx.shape)


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Same contract as `swiglu_torch`: (..., 2F) = [gate | up] -> silu(gate) * up, (..., F)."""
    return _SwiGLUFunction.apply(gate_up)


# GELU, tanh approximation: 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
# Written through sigmoid (an exp) because libdevice's tanh is unavailable in the interpreter;
# the sigmoid form also keeps full relative precision for large negative x. 0.79788... = sqrt(2/pi).


@_jit
def _gelu_fwd_kernel(X, Y, M, N, stride_x, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u2 = (2.0 * 0.7978845608028654) * (x + 0.044715 * x * x * x)
    y = x * tl.sigmoid(u2)
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@_jit
def _gelu_bwd_kernel(DY, X, DX, M, N, stride_dy, stride_x, stride_dx,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    u2 = (2.0 * 0.7978845608028654) * (x + 0.044715 * x * x * x)
    du2 = (2.0 * 0.7978845608028654) * (1.0 + 3.0 * 0.044715 * x * x)
    sig = tl.sigmoid(u2)
    dx = dy * (sig + x * sig * (1.0 - sig) * du2)
    tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


class _GeLUFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):
        _check_launch(_gelu_fwd_kernel, x)
        n = x.shape[-1] if x.dim() else 1
        x2 = _as_rows(x, n)
        y = _alloc(x2.shape, x)
        if y.numel():
            grid, block_m, block_n, warps = _tiles(*x2.shape)
            _gelu_fwd_kernel[grid](x2, y, *x2.shape, x2.stride(0), y.stride(0),
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dy2 = _as_rows(dy, x2.shape[1])
        dx = _alloc(x2.shape, x2)
        if dx.numel():
            grid, block_m, block_n, warps = _tiles(*x2.shape)
            _gelu_bwd_kernel[grid](dy2, x2, dx, *x2.shape, dy2.stride(0), x2.stride(0), dx.stride(0),
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        return dx.view(ctx.shape)


def gelu_triton(x: torch.Tensor) -> torch.Tensor:
    """Same contract as `gelu_torch` (tanh approximation)."""
    return _GeLUFunction.apply(x)
