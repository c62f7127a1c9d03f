"""Causal attention with grouped-query heads and optional document masking: PyTorch reference
path (`attention_torch`) and a FlashAttention-2 style Triton kernel (`flash_attention_triton`).

Triton path, per (batch, head):
  forward   one program per block of queries; online softmax over key blocks left of and on the
            diagonal (blocks above it are never loaded); stores O and the per-row logsumexp.
  backward  `_bwd_preprocess_kernel`: delta = rowsum(dO * O);
            `_bwd_dkdv_kernel`: one program per key block of a kv head, looping over the query
            heads of its group and the query blocks at or below the diagonal (no atomics);
            `_bwd_dq_kernel`: one program per query block, looping over key blocks.
Math is fp32 whatever the input dtype (fp16, bf16, fp32); outputs come back in the input dtype.
The logsumexp is kept in base 2 (scores are pre-multiplied by scale * log2(e)) so the kernels use
exp2. With `document_ids`, each program first finds the key (or query) blocks that can share a
document with its own block and skips the others; scores across documents are masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms (macOS, Windows)
    triton = None

__all__ = ["attention_torch", "flash_attention_triton", "attention_flops", "AttentionBlocks"]

_LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    document_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """q (B, Hq, T, D), k and v (B, Hk, T, D) with Hq a multiple of Hk; causal.
    document_ids (B, T): tokens attend only within their own document (packed sequences)."""
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    same_doc = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)  # (B, T, T)
    mask = (causal & same_doc).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention_flops(B: int, Hq: int, T: int, D: int, causal: bool = True, backward: bool = False) -> float:
    """Matmul FLOPs of one attention call, the FlashAttention benchmark convention: forward is
    QK^T and PV, 2 * 2 * B * Hq * T^2 * D, halved when causal; backward (five matmuls) is 2.5x
    the forward and is returned alone when `backward=True` (add both for a training step)."""
    flops = 4.0 * B * Hq * T * T * D
    if causal:
        flops /= 2
    return 2.5 * flops if backward else flops


@dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes and launch settings. Forward / dQ: BLOCK_M queries x BLOCK_N keys per step,
    BLOCK_M a multiple of BLOCK_N. dK/dV: BLOCK_N keys per program x BLOCK_M queries per step,
    BLOCK_N a multiple of BLOCK_M."""
    fwd_m: int
    fwd_n: int
    fwd_warps: int
    fwd_stages: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int
    bwd_warps: int
    bwd_stages: int
    pre_m: int = 128


def _select_blocks(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttentionBlocks:
    """H100 settings on CUDA (16-bit inputs: 128x64 forward tiles; 128-key dK/dV programs with
    32-query steps; 128-query dQ programs with 32-key steps); fp32 halves the tiles to fit shared
    memory. Under the interpreter (CPU) small tiles keep tests fast and still cross block edges."""
    if device.type != "cuda":
        return AttentionBlocks(32, 16, 1, 1, 16, 32, 32, 16, 1, 1, pre_m=32)
    if dtype == torch.float32:
        return AttentionBlocks(64, 32, 4, 2, 32, 64, 64, 32, 4, 2)
    if head_dim == 128:
        return AttentionBlocks(128, 64, 8, 3, 32, 128, 128, 32, 8, 2)
    return AttentionBlocks(128, 64, 4, 3, 32, 128, 128, 32, 4, 3)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output / gradient / statistics buffer of the kernels comes from here, so tests can
    hand out NaN-filled buffers and catch any element a kernel forgets to write."""
    return torch.empty(shape, dtype=dtype, device=device)


if triton is not None:

    @triton.jit
    def _doc_hits(DOC_b, stride_dt, offs, T, lo_doc, hi_doc):
        """1 when some valid token at `offs` has a document id in [lo_doc, hi_doc], else 0."""
        d = tl.load(DOC_b + offs * stride_dt, mask=offs < T, other=0)
        inside = (d >= lo_doc) & (d <= hi_doc) & (offs < T)
        return tl.max(inside.to(tl.int32), axis=0)

    @triton.jit
    def _first_key_block(DOC_b, stride_dt, T, q_doc_min, q_doc_max, end, BLOCK_N: tl.constexpr):
        """Start of the first key block in [0, end) holding a document of the query block; `end`
        if none does. Keys before it cannot be attended by any query of the block."""
        first = end
        for start_n in range(0, end, BLOCK_N):
            hit = _doc_hits(DOC_b, stride_dt, start_n + tl.arange(0, BLOCK_N), T, q_doc_min, q_doc_max)
            first = tl.minimum(first, tl.where(hit > 0, start_n, end))
        return first

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, K_h, V_h, stride_kt, stride_kd, stride_vt, stride_vd,
                   DOC_b, stride_dt, q_doc, offs_m, offs_d, T, lo, hi, qk_scale,
                   BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, HAS_DOC: tl.constexpr,
                   PRECISION: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_ptrs = K_h + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
            v_ptrs = V_h + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
            if DIAGONAL:  # the only blocks that can reach past T
                k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
                v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (M, N), log2 units
            if DIAGONAL:
                s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            if HAS_DOC:
                k_doc = tl.load(DOC_b + offs_n * stride_dt, mask=offs_n < T, other=0)
                s = tl.where(q_doc[:, None] == k_doc[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            if HAS_DOC:  # a row may have seen no key of its document yet: keep exp2 NaN-free
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, DOC,
                    stride_qb, stride_qh, stride_qt, stride_qd,
                    stride_kb, stride_kh, stride_kt, stride_kd,
                    stride_vb, stride_vh, stride_vt, stride_vd,
                    stride_ob, stride_oh, stride_ot, stride_od,
                    stride_db, stride_dt,
                    T, H, qk_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
        # longest programs (last query blocks) first
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
        off_bh = tl.program_id(1)
        b = (off_bh // H).to(tl.int64)
        h = (off_bh % H).to(tl.int64)
        kvh = h // GROUP
        m0 = start_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        valid_m = offs_m < T

        Q_h = Q + b * stride_qb + h * stride_qh
        K_h = K + b * stride_kb + kvh * stride_kh
        V_h = V + b * stride_vb + kvh * stride_vh
        q = tl.load(Q_h + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=valid_m[:, None], other=0.0)

        DOC_b = DOC + b * stride_db
        lo = 0
        q_doc = offs_m  # unused without documents
        if HAS_DOC:
            q_doc = tl.load(DOC_b + offs_m * stride_dt, mask=valid_m, other=0)
            q_doc_min = tl.min(tl.where(valid_m, q_doc, 2147483647), axis=0)
            q_doc_max = tl.max(tl.where(valid_m, q_doc, -2147483647), axis=0)
            lo = _first_key_block(DOC_b, stride_dt, T, q_doc_min, q_doc_max, m0, BLOCK_N)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # keys strictly left of the query block: no causal mask
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_h, V_h, stride_kt, stride_kd, stride_vt, stride_vd,
                                   DOC_b, stride_dt, q_doc, offs_m, offs_d, T, lo, m0, qk_scale,
                                   BLOCK_N, False, HAS_DOC, PRECISION)
        # keys on the diagonal: causal mask; nothing above it is loaded
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_h, V_h, stride_kt, stride_kd, stride_vt, stride_vd,
                                   DOC_b, stride_dt, q_doc, offs_m, offs_d, T, m0,
                                   tl.minimum(m0 + BLOCK_M, T), qk_scale,
                                   BLOCK_N, True, HAS_DOC, PRECISION)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past T, which are not stored
        out = acc / l_safe[:, None]
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=valid_m[:, None])
        tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_safe), mask=valid_m)

    @triton.jit
    def _bwd_preprocess_kernel(O, DO, DELTA,
                               stride_ob, stride_oh, stride_ot, stride_od,
                               stride_dob, stride_doh, stride_dot, stride_dod,
                               T, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        off_bh = tl.program_id(1)
        b = (off_bh // H).to(tl.int64)
        h = (off_bh % H).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        valid = offs_m[:, None] < T
        o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                    mask=valid, other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                     + offs_d[None, :] * stride_dod, mask=valid, other=0.0).to(tl.float32)
        tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_qd, stride_dot, stride_dod,
                    DOC_b, stride_dt, k_doc, offs_n, offs_d, T, lo, hi, qk_scale,
                    BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr, HAS_DOC: tl.constexpr,
                    PRECISION: tl.constexpr):
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            valid_m = offs_m < T
            q = tl.load(Q_h + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                        mask=valid_m[:, None], other=0.0)
            do = tl.load(DO_h + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                         mask=valid_m[:, None], other=0.0)
            # +inf logsumexp turns rows past T into zero probabilities
            lse = tl.load(LSE_h + offs_m, mask=valid_m, other=float("inf"))
            delta = tl.load(DELTA_h + offs_m, mask=valid_m, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (N, M)
            p_t = tl.math.exp2(s_t - lse[None, :])
            if DIAGONAL:
                p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
            if HAS_DOC:
                q_doc = tl.load(DOC_b + offs_m * stride_dt, mask=valid_m, other=0)
                p_t = tl.where(k_doc[:, None] == q_doc[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC,
                         stride_qb, stride_qh, stride_qt, stride_qd,
                         stride_kb, stride_kh, stride_kt, stride_kd,
                         stride_vb, stride_vh, stride_vt, stride_vd,
                         stride_dob, stride_doh, stride_dot, stride_dod,
                         stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                         stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                         stride_db, stride_dt,
                         T, HQ, HK, qk_scale, sm_scale,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
        start_n = tl.program_id(0)
        off_bkv = tl.program_id(1)
        b = (off_bkv // HK).to(tl.int64)
        kvh = (off_bkv % HK).to(tl.int64)
        n0 = start_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        valid_n = offs_n < T
        k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=valid_n[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=valid_n[:, None], other=0.0)

        DOC_b = DOC + b * stride_db
        diag_end = tl.minimum(n0 + BLOCK_N, T)
        q_end = T
        k_doc = offs_n  # unused without documents
        if HAS_DOC:
            k_doc = tl.load(DOC_b + offs_n * stride_dt, mask=valid_n, other=0)
            k_doc_min = tl.min(tl.where(valid_n, k_doc, 2147483647), axis=0)
            k_doc_max = tl.max(tl.where(valid_n, k_doc, -2147483647), axis=0)
            # end of the last query block below the diagonal that shares a document with these keys
            q_end = diag_end
            for start_m in range(n0 + BLOCK_N, T, BLOCK_M):
                hit = _doc_hits(DOC_b, stride_dt, start_m + tl.arange(0, BLOCK_M), T, k_doc_min, k_doc_max)
                q_end = tl.where(hit > 0, start_m + BLOCK_M, q_end)

        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for g in range(GROUP):  # the query heads sharing this kv head
            h = kvh * GROUP + g
            bh = b * HQ + h
            Q_h = Q + b * stride_qb + h * stride_qh
            DO_h = DO + b * stride_dob + h * stride_doh
            LSE_h = LSE + bh * T
            DELTA_h = DELTA + bh * T
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_qd,
                                 stride_dot, stride_dod, DOC_b, stride_dt, k_doc, offs_n, offs_d, T,
                                 n0, diag_end, qk_scale, BLOCK_M, True, HAS_DOC, PRECISION)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_qd,
                                 stride_dot, stride_dod, DOC_b, stride_dt, k_doc, offs_n, offs_d, T,
                                 n0 + BLOCK_N, q_end, qk_scale, BLOCK_M, False, HAS_DOC, PRECISION)
        dk = dk * sm_scale
        tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=valid_n[:, None])
        tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=valid_n[:, None])

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, K_h, V_h, stride_kt, stride_kd, stride_vt, stride_vd,
                  DOC_b, stride_dt, q_doc, offs_m, offs_d, T, lo, hi, qk_scale,
                  BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, HAS_DOC: tl.constexpr,
                  PRECISION: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_ptrs = K_h + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
            v_ptrs = V_h + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
            if DIAGONAL:
                k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
                v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if DIAGONAL:
                p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            if HAS_DOC:
                k_doc = tl.load(DOC_b + offs_n * stride_dt, mask=offs_n < T, other=0)
                p = tl.where(q_doc[:, None] == k_doc[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC,
                       stride_qb, stride_qh, stride_qt, stride_qd,
                       stride_kb, stride_kh, stride_kt, stride_kd,
                       stride_vb, stride_vh, stride_vt, stride_vd,
                       stride_dob, stride_doh, stride_dot, stride_dod,
                       stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                       stride_db, stride_dt,
                       T, H, qk_scale, sm_scale,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
        off_bh = tl.program_id(1)
        b = (off_bh // H).to(tl.int64)
        h = (off_bh % H).to(tl.int64)
        kvh = h // GROUP
        m0 = start_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        valid_m = offs_m < T
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=valid_m[:, None], other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                     + offs_d[None, :] * stride_dod, mask=valid_m[:, None], other=0.0)
        lse = tl.load(LSE + off_bh.to(tl.int64) * T + offs_m, mask=valid_m, other=float("inf"))
        delta = tl.load(DELTA + off_bh.to(tl.int64) * T + offs_m, mask=valid_m, other=0.0)
        K_h = K + b * stride_kb + kvh * stride_kh
        V_h = V + b * stride_vb + kvh * stride_vh

        DOC_b = DOC + b * stride_db
        lo = 0
        q_doc = offs_m  # unused without documents
        if HAS_DOC:
            q_doc = tl.load(DOC_b + offs_m * stride_dt, mask=valid_m, other=0)
            q_doc_min = tl.min(tl.where(valid_m, q_doc, 2147483647), axis=0)
            q_doc_max = tl.max(tl.where(valid_m, q_doc, -2147483647), axis=0)
            lo = _first_key_block(DOC_b, stride_dt, T, q_doc_min, q_doc_max, m0, BLOCK_N)

        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        dq = _dq_inner(dq, q, do, lse, delta, K_h, V_h, stride_kt, stride_kd, stride_vt, stride_vd,
                       DOC_b, stride_dt, q_doc, offs_m, offs_d, T, lo, m0, qk_scale,
                       BLOCK_N, False, HAS_DOC, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, K_h, V_h, stride_kt, stride_kd, stride_vt, stride_vd,
                       DOC_b, stride_dt, q_doc, offs_m, offs_d, T, m0, tl.minimum(m0 + BLOCK_M, T), qk_scale,
                       BLOCK_N, True, HAS_DOC, PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=valid_m[:, None])


def _check_inputs(q, k, v, document_ids):
    if triton is None:
        raise RuntimeError("flash_attention_triton needs the `triton` package; use attention_torch instead")
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, Hk, T, D) matching q {tuple(q.shape)}; "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    Hk = k.shape[1]
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hk})")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention_triton supports head dims {SUPPORTED_HEAD_DIMS} "
                         f"(powers of two from 16 to 128); got {D}. Use attention_torch for others.")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on the same device")
    if q.device.type != "cuda" and not _interpreted():
        raise RuntimeError("flash_attention_triton runs on CUDA tensors, or on CPU when TRITON_INTERPRET=1 was "
                           "set before megatron_code.kernels was imported; use attention_torch on CPU")
    if document_ids is not None:
        if document_ids.shape != (B, T) or document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
            raise ValueError(f"document_ids must be an integer (B, T) = ({B}, {T}) tensor; "
                             f"got {document_ids.dtype} {tuple(document_ids.shape)}")


def _interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products (no tf32); 16-bit inputs ignore this
    return "ieee" if dtype == torch.float32 else "tf32"


class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, document_ids, scale):
        B, Hq, T, D = q.shape
        Hk = k.shape[1]
        cfg = _select_blocks(D, q.dtype, q.device)
        has_doc = document_ids is not None
        doc = (document_ids.to(device=q.device, dtype=torch.int32) if has_doc
               else torch.zeros(1, 1, dtype=torch.int32, device=q.device))
        o = _alloc((B, Hq, T, D), q.dtype, q.device)
        lse = _alloc((B, Hq, T), torch.float32, q.device)
        grid = (triton.cdiv(T, cfg.fwd_m), B * Hq)
        _fwd_kernel[grid](
            q, k, v, o, lse, doc,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), doc.stride(0), doc.stride(1),
            T, Hq, scale * _LOG2E,
            GROUP=Hq // Hk, HEAD_DIM=D, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, HAS_DOC=has_doc,
            PRECISION=_precision(q.dtype), num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
        ctx.save_for_backward(q, k, v, o, lse, doc)
        ctx.has_doc = has_doc
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc = ctx.saved_tensors
        B, Hq, T, D = q.shape
        Hk = k.shape[1]
        cfg = _select_blocks(D, q.dtype, q.device)
        do = do.to(q.dtype)
        delta = _alloc((B, Hq, T), torch.float32, q.device)
        _bwd_preprocess_kernel[(triton.cdiv(T, cfg.pre_m), B * Hq)](
            o, do, delta, *o.stride(), *do.stride(), T, Hq, HEAD_DIM=D, BLOCK_M=cfg.pre_m)
        dq = _alloc(q.shape, q.dtype, q.device)
        dk = _alloc(k.shape, k.dtype, k.device)
        dv = _alloc(v.shape, v.dtype, v.device)
        scale = ctx.scale
        common = dict(GROUP=Hq // Hk, HEAD_DIM=D, HAS_DOC=ctx.has_doc, PRECISION=_precision(q.dtype),
                      num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
        _bwd_dkdv_kernel[(triton.cdiv(T, cfg.dkdv_n), B * Hk)](
            q, k, v, do, lse, delta, dk, dv, doc,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            doc.stride(0), doc.stride(1), T, Hq, Hk, scale * _LOG2E, scale,
            BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, **common)
        _bwd_dq_kernel[(triton.cdiv(T, cfg.dq_m), B * Hq)](
            q, k, v, do, lse, delta, dq, doc,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            doc.stride(0), doc.stride(1), T, Hq, scale * _LOG2E, scale,
            BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, **common)
        return dq, dk, dv, None, None


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           document_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Same contract as `attention_torch`: q (B, Hq, T, D), k and v (B, Hk, T, D), Hq a multiple
    of Hk, causal, optional document_ids (B, T). D must be a power of two from 16 to 128.
    K/V are never repeated per query head; any strides are accepted."""
    _check_inputs(q, k, v, document_ids)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[2] == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        return attention_torch(q, k, v, document_ids, scale)
    return _FlashAttention.apply(q, k, v, document_ids, scale)
