"""Rotary position embeddings (rotate-half convention, as Llama and Hugging Face): PyTorch
reference and Triton kernel."""
from __future__ import annotations

import torch

from ._launch import alloc as _alloc  # a module-level name, so tests can patch it per kernel
from ._launch import check_launch as _check_launch
from ._launch import jit as _jit
from ._launch import tl, triton


def rope_tables(head_dim: int, max_positions: int, theta: float,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_positions, head_dim // 2), fp32: shared by all heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, Hq, D), k (B, T, Hk, D); positions (B, T) int, so packed documents can restart at 0."""
    c = cos[positions].unsqueeze(2)  # (B, T, 1, D/2)
    s = sin[positions].unsqueeze(2)
    return _rotate(q, c, s), _rotate(k, c, s)


# ---------------------------------------------------------------------------------------------
# Triton path: one program rotates all q heads and all k heads of a block of tokens (one token
# when the heads fill a tile); each token's cos/sin row is loaded once and broadcast over heads.
# Inputs are read through their strides, so the q/k views of a fused qkv projection are not copied.


_TILE_BUDGET = 2048  # elements per program and half-rotation on a GPU
_INTERPRETER_TILE_BUDGET = 32768


@_jit
def _rotate_heads(X, OUT, x_base, out_base, stride_xh, stride_xd, stride_oh, H, HALF, c, s, tok_mask,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """OUT[h, :HALF] = x1 c - x2 s and OUT[h, HALF:] = x2 c + x1 s for every head h of a block of
    tokens. x_base / out_base / tok_mask are (BLOCK_T, 1, 1); c and s are (BLOCK_T, 1, BLOCK_HALF)."""
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = tok_mask & (h < H) & (d < HALF)
    x_ptr = X + x_base + h * stride_xh + d * stride_xd
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
    o_ptr = OUT + out_base + h * stride_oh + d
    tl.store(o_ptr, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=mask)


@_jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, POS, T, n_tokens,
                 stride_qb, stride_qt, stride_qh, stride_qd,
                 stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_qob, stride_qot, stride_qoh, stride_kob, stride_kot, stride_koh,
                 stride_pb, stride_pt, stride_cos, HQ, HK, HALF,
                 INVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat b * T + t
    tok_mask = token < n_tokens
    b = token // T
    t = token % T
    pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=tok_mask, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cs_mask = tok_mask[:, None] & (d < HALF)
    c = tl.load(COS + pos[:, None] * stride_cos + d, mask=cs_mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos[:, None] * stride_cos + d, mask=cs_mask, other=0.0).to(tl.float32)
    if INVERSE:  # the backward rotates by -angle
        s = -s
    c = c[:, None, :]  # (BLOCK_T, 1, BLOCK_HALF): shared by every head
    s = s[:, None, :]
    b = b[:, None, None]
    t = t[:, None, None]
    tok_mask = tok_mask[:, None, None]
    _rotate_heads(Q, QO, b * stride_qb + t * stride_qt, b * stride_qob + t * stride_qot,
                  stride_qh, stride_qd, stride_qoh, HQ, HALF, c, s, tok_mask, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KO, b * stride_kb + t * stride_kt, b * stride_kob + t * stride_kot,
                  stride_kh, stride_kd, stride_koh, HK, HALF, c, s, tok_mask, BLOCK_HK, BLOCK_HALF)


def _launch_rope(q, k, cos, sin, positions, inverse: bool):
    """Rotated copies of q (B, T, Hq, D) and k (B, T, Hk, D), contiguous, in their dtypes."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B, T, Hq, D) and k (B, T, Hk, D), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    bsz, seq, hq, dim = q.shape
    hk = k.shape[2]
    if dim % 2 or cos.shape[-1] != dim // 2 or positions.shape != (bsz, seq):
        raise ValueError(f"head_dim {dim}, cos {tuple(cos.shape)} and positions {tuple(positions.shape)} "
                         f"do not match q {tuple(q.shape)}")
    _check_launch(_rope_kernel, q)
    q_out = _alloc((bsz, seq, hq, dim), q)
    k_out = _alloc((bsz, seq, hk, dim), k)
    n_tokens = bsz * seq
    if n_tokens == 0:
        return q_out, k_out
    cos, sin = cos.contiguous(), sin.contiguous()
    half = dim // 2
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    block_half = triton.next_power_of_2(half)
    tile = (block_hq + block_hk) * block_half  # elements per token and half
    # GPU: about 2K elements per program and half; the interpreter pays per op, not per element
    budget = _TILE_BUDGET if q.is_cuda else _INTERPRETER_TILE_BUDGET
    block_t = min(triton.next_power_of_2(n_tokens), 1 << max(0, (budget // tile).bit_length() - 1))
    warps = 1 if block_t * tile <= 256 else 2 if block_t * tile <= 512 else 4 if block_t * tile <= 2048 else 8
    _rope_kernel[(triton.cdiv(n_tokens, block_t),)](
        q, k, q_out, k_out, cos, sin, positions, seq, n_tokens,
        *q.stride(), *k.stride(), *q_out.stride()[:3], *k_out.stride()[:3],
        *positions.stride(), cos.stride(0), hq, hk, half,
        INVERSE=inverse, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_HALF=block_half, num_warps=warps)
    return q_out, k_out


class _RopeFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions):
        ctx.save_for_backward(cos, sin, positions)
        return _launch_rope(q, k, cos, sin, positions, inverse=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, positions = ctx.saved_tensors
        dq_in, dk_in = _launch_rope(dq, dk, cos, sin, positions, inverse=True)
        return dq_in, dk_in, None, None, None


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `apply_rope_torch`; q and k are rotated in one launch, into new tensors."""
    return _RopeFunction.apply(q, k, cos, sin, positions)
