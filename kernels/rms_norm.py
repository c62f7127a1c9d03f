"""RMSNorm (optionally fused with the residual add) and LayerNorm: PyTorch reference and Triton kernels.

The Triton path keeps one row per program in the forward (BLOCK = next_power_of_2(hidden), masked),
statistics in fp32. The backward walks a contiguous run of rows per program and writes per-program
partial sums of dweight (and dbias), reduced afterwards in fp32.

Dtypes (both paths): statistics in fp32; the normalized output takes the activation dtype
(`_launch.activation_dtype`: the autocast dtype inside autocast, else the input's), so with fp32
weights and an fp32 residual stream under bf16 autocast the output is bf16 while the residual sum
returned beside it stays fp32. Gradients come back in each input's own dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._launch import activation_dtype
from ._launch import alloc as _alloc  # a module-level name, so tests can patch it per kernel
from ._launch import as_rows as _as_rows
from ._launch import check_launch as _check_launch
from ._launch import jit as _jit
from ._launch import tl, triton

MAX_HIDDEN = 65536  # one row must fit one program's registers


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None):
    """y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32, y in the activation dtype
    (module docstring). With `residual`, normalizes x + residual and also returns that sum (the
    new residual stream, in the promoted dtype of x and residual)."""
    if residual is not None:
        x = x + residual
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight).to(activation_dtype(x))
    return y if residual is None else (y, x)


def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, in the activation dtype."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(activation_dtype(x))


# ---------------------------------------------------------------------------------------------
# launch helpers


def _block_and_warps(n: int) -> tuple[int, int]:
    if n > MAX_HIDDEN:
        raise ValueError(f"hidden size {n} > {MAX_HIDDEN}: too wide for one program per row")
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else 32
    return block, warps


def _bwd_programs(rows: int, device: torch.device) -> tuple[int, int]:
    """(number of programs, rows per program) for the backward: a few programs per SM."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: few programs, but still more than one, so the reduction is tested
    per_program = triton.cdiv(rows, min(rows, target))
    return triton.cdiv(rows, per_program), per_program


# ---------------------------------------------------------------------------------------------
# RMSNorm kernels


@_jit
def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, N, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # as the reference: normalize in fp32, round to the input dtype, then scale by the weight
    xn = (xf * rstd).to(x.dtype).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xn * w).to(Y.dtype.element_ty), mask=mask)


@_jit
def _rms_norm_bwd_kernel(DY, DS, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_ds, stride_x,
                         stride_dx, M, N, rows_per_program,
                         HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = (tl.minimum(row_start + rows_per_program, M) - row_start).to(tl.int32)
    for i in range(0, n_rows):
        row = row_start + i
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x.to(tl.float32) * rstd
        if COMPUTE_DW:
            dw += dy * xhat.to(x.dtype).to(tl.float32)
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)


class _RMSNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, eps, residual, out_dtype):
        shape, n = x.shape, x.shape[-1]
        x2 = _as_rows(x, n)
        rows = x2.shape[0]
        block, warps = _block_and_warps(n)
        _check_launch(_rms_norm_fwd_kernel, x)
        if residual is not None:
            r2 = _as_rows(residual, n)
            s2 = _alloc((rows, n), x, torch.promote_types(x.dtype, residual.dtype))
        else:
            r2 = s2 = None
        normed = x2 if s2 is None else s2
        y2 = _alloc((rows, n), x, out_dtype)
        rstd = _alloc((rows,), x, torch.float32)
        weight_c = weight.contiguous()
        if rows:
            _rms_norm_fwd_kernel[(rows,)](
                x2, r2, weight_c, y2, s2, rstd,
                x2.stride(0), 0 if r2 is None else r2.stride(0), y2.stride(0),
                0 if s2 is None else s2.stride(0), n, eps,
                HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(normed, weight_c, rstd)
        ctx.has_residual = residual is not None
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, weight.dtype)
        ctx.shape = shape
        ctx.set_materialize_grads(False)
        y = y2.view(shape)
        return y if residual is None else (y, s2.view(shape))

    @staticmethod
    def backward(ctx, dy, ds=None):
        normed, weight, rstd = ctx.saved_tensors
        x_dtype, r_dtype, w_dtype = ctx.dtypes
        rows, n = normed.shape
        if dy is None:
            dy = torch.zeros(ctx.shape, dtype=weight.dtype, device=normed.device)
        dy2 = _as_rows(dy, n)
        ds2 = None if ds is None else _as_rows(ds, n)
        dx2 = _alloc((rows, n), normed)
        compute_dw = ctx.needs_input_grad[1]
        block, warps = _block_and_warps(n)
        programs, per_program = _bwd_programs(rows, normed.device) if rows else (0, 0)
        dw_partial = _alloc((programs, n), normed, torch.float32) if compute_dw else None
        if rows:
            _rms_norm_bwd_kernel[(programs,)](
                dy2, ds2, normed, weight, rstd, dx2, dw_partial,
                dy2.stride(0), 0 if ds2 is None else ds2.stride(0), normed.stride(0),
                dx2.stride(0), rows, n, per_program,
                HAS_DS=ds2 is not None, COMPUTE_DW=compute_dw, BLOCK=block, num_warps=warps)
        dw = None
        if compute_dw:
            dw = dw_partial.sum(0).to(w_dtype) if rows else torch.zeros_like(weight)
        dx = dx2.view(ctx.shape)
        dres = dx.to(r_dtype) if ctx.has_residual else None
        return dx.to(x_dtype), dw, None, dres, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None):
    """Same contract as `rms_norm_torch`: y, or (y, x + residual) when `residual` is given."""
    normed_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return _RMSNormFunction.apply(x, weight, eps, residual, activation_dtype(x, normed_dtype))


# ---------------------------------------------------------------------------------------------
# LayerNorm kernels


@_jit
def _layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, N, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / N + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@_jit
def _layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_x,
                           stride_dx, M, N, rows_per_program, HAS_W: tl.constexpr,
                           COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = (tl.minimum(row_start + rows_per_program, M) - row_start).to(tl.int32)
    for i in range(0, n_rows):
        row = row_start + i
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
        g = dy
        if HAS_W:
            g = dy * w
        dx = rstd * (g - (tl.sum(g, axis=0) + xhat * tl.sum(g * xhat, axis=0)) / N)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid.to(tl.int64) * N + cols, db, mask=mask)


class _LayerNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        shape, n = x.shape, x.shape[-1]
        x2 = _as_rows(x, n)
        rows = x2.shape[0]
        block, warps = _block_and_warps(n)
        _check_launch(_layer_norm_fwd_kernel, x)
        y2 = _alloc((rows, n), x, out_dtype)
        mean = _alloc((rows,), x, torch.float32)
        rstd = _alloc((rows,), x, torch.float32)
        weight_c = None if weight is None else weight.contiguous()
        bias_c = None if bias is None else bias.contiguous()
        if rows:
            _layer_norm_fwd_kernel[(rows,)](
                x2, weight_c, bias_c, y2, mean, rstd, x2.stride(0), y2.stride(0), n, eps,
                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight_c, mean, rstd)
        ctx.shape = shape
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y2.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        w_dtype, b_dtype = ctx.param_dtypes
        rows, n = x2.shape
        dy2 = _as_rows(dy, n)
        dx2 = _alloc((rows, n), x2)
        compute_dw, compute_db = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        block, warps = _block_and_warps(n)
        programs, per_program = _bwd_programs(rows, x2.device) if rows else (0, 0)
        dw_partial = _alloc((programs, n), x2, torch.float32) if compute_dw else None
        db_partial = _alloc((programs, n), x2, torch.float32) if compute_db else None
        if rows:
            _layer_norm_bwd_kernel[(programs,)](
                dy2, x2, weight, mean, rstd, dx2, dw_partial, db_partial,
                dy2.stride(0), x2.stride(0), dx2.stride(0), rows, n, per_program,
                HAS_W=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                BLOCK=block, num_warps=warps)
        dw = db = None
        if compute_dw:
            dw = dw_partial.sum(0).to(w_dtype) if rows else torch.zeros_like(weight)
        if compute_db:
            db = db_partial.sum(0).to(b_dtype) if rows else torch.zeros(n, dtype=b_dtype, device=x2.device)
        return dx2.view(ctx.shape), dw, db, None, None


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """Same contract as `layer_norm_torch` (output in the activation dtype; weight and bias may be None)."""
    return _LayerNormFunction.apply(x, weight, bias, eps, activation_dtype(x))
