"""Triton RoPE (q and k in one launch) against the float64 reference, forward and backward.

Covers positions that restart inside a row (packed documents), Hq != Hk, and both layouts the
model feeds: contiguous (B, T, H, D) tensors and q/k views of a fused qkv projection. Outputs are
allocated NaN-filled (the module's `_alloc` is patched), so an unwritten element shows as NaN.
"""
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py has switched on the interpreter without CUDA

from megatron_code.kernels import rope as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU")
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
MAX_POS = 64


pytestmark = pytest.mark.usefixtures("nan_outputs")  # tests/kernels/conftest.py


def assert_close(actual, expected, dtype):
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert not torch.isnan(actual).any(), "unwritten (NaN) elements"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def packed_positions(bsz, seq):
    """Each row holds several documents: positions restart at 0 at random boundaries."""
    pos = torch.empty(bsz, seq, dtype=torch.long)
    for b in range(bsz):
        starts = sorted({0, *torch.randint(1, max(seq, 2), (2,)).tolist()})
        for i, s in enumerate(starts):
            e = starts[i + 1] if i + 1 < len(starts) else seq
            pos[b, s:e] = torch.arange(e - s)
    return pos.to(DEVICE)


def make_qk(layout, bsz, seq, hq, hk, dim, dtype):
    """(q, k, leaves): q (B, T, Hq, D) and k (B, T, Hk, D) in the given memory layout; gradients
    are checked on the leaves the views come from."""
    if layout == "contiguous":
        q = torch.randn(bsz, seq, hq, dim, device=DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(bsz, seq, hk, dim, device=DEVICE, dtype=dtype, requires_grad=True)
        return q, k, (q, k)
    if layout == "fused_qkv":  # [q heads | k heads | v heads] of one projection
        qkv = torch.randn(bsz, seq, (hq + 2 * hk) * dim, device=DEVICE, dtype=dtype, requires_grad=True)
        q = qkv[..., : hq * dim].view(bsz, seq, hq, dim)
        k = qkv[..., hq * dim:(hq + hk) * dim].view(bsz, seq, hk, dim)
        return q, k, (qkv,)
    if layout == "heads_first":  # (B, H, T, D) transposed to (B, T, H, D); k with a strided head dim
        q0 = torch.randn(bsz, hq, seq, dim, device=DEVICE, dtype=dtype, requires_grad=True)
        k0 = torch.randn(bsz, seq, dim, hk, device=DEVICE, dtype=dtype, requires_grad=True)
        return q0.transpose(1, 2), k0.transpose(2, 3), (q0, k0)
    raise ValueError(layout)


def check_rope(layout, bsz, seq, hq, hk, dim, dtype, positions=None):
    cos, sin = K.rope_tables(dim, MAX_POS, 10000.0, device=DEVICE)
    pos = packed_positions(bsz, seq) if positions is None else positions
    q, k, leaves = make_qk(layout, bsz, seq, hq, hk, dim, dtype)
    q_rot, k_rot = K.apply_rope_triton(q, k, cos, sin, pos)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    got = torch.autograd.grad((q_rot, k_rot), leaves, (gq, gk))

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64 = make_views(layout, leaves64, bsz, seq, hq, hk, dim)
    ref_q, ref_k = K.apply_rope_torch(q64, k64, cos.double(), sin.double(), pos)
    want = torch.autograd.grad((ref_q, ref_k), leaves64, (gq.double(), gk.double()))

    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q_rot.data_ptr() != q.data_ptr() and k_rot.data_ptr() != k.data_ptr()
    assert_close(q_rot, ref_q, dtype)
    assert_close(k_rot, ref_k, dtype)
    for g, e in zip(got, want):
        assert_close(g, e, dtype)


def make_views(layout, leaves, bsz, seq, hq, hk, dim):
    if layout == "contiguous":
        return leaves
    if layout == "fused_qkv":
        (qkv,) = leaves
        return (qkv[..., : hq * dim].view(bsz, seq, hq, dim),
                qkv[..., hq * dim:(hq + hk) * dim].view(bsz, seq, hk, dim))
    q0, k0 = leaves
    return q0.transpose(1, 2), k0.transpose(2, 3)


@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "heads_first"])
@pytest.mark.parametrize("bsz,seq,hq,hk,dim", [
    (1, 1, 1, 1, 2),    # smallest: one token, half dim 1
    (2, 9, 4, 2, 16),   # GQA, Hq = 2 Hk
    (3, 7, 3, 1, 24),   # MQA, head count and half dim not powers of two
    (1, 33, 6, 6, 64),  # MHA
])
def test_rope_fp32(layout, bsz, seq, hq, hk, dim):
    torch.manual_seed(zlib.crc32(repr((layout, bsz, seq, hq, hk, dim)).encode()))
    check_rope(layout, bsz, seq, hq, hk, dim, torch.float32)


def test_rope_several_token_blocks(monkeypatch):
    """Programs that each rotate a block of tokens, the last block partly masked."""
    torch.manual_seed(12)
    monkeypatch.setattr(K, "_INTERPRETER_TILE_BUDGET", 4 * (4 + 2) * 8)
    monkeypatch.setattr(K, "_TILE_BUDGET", 4 * (4 + 2) * 8)
    check_rope("fused_qkv", 3, 11, 3, 2, 10, torch.float32)  # 33 tokens in blocks of 4


def test_rope_broadcast_positions():
    """positions may be a broadcast view (stride 0 over the batch), as arange(T).expand(B, T)."""
    torch.manual_seed(9)
    pos = torch.arange(7, device=DEVICE).expand(3, 7)
    check_rope("fused_qkv", 3, 7, 4, 2, 16, torch.float32, positions=pos)
    check_rope("contiguous", 2, 5, 4, 2, 16, torch.float32,
               positions=torch.randint(0, MAX_POS, (2, 5), device=DEVICE, dtype=torch.int32))


@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv"])
def test_rope_fp16(layout):
    torch.manual_seed(10)
    check_rope(layout, 2, 9, 4, 2, 24, torch.float16)


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv"])
@pytest.mark.parametrize("bsz,seq,hq,hk,dim", [(2, 9, 4, 2, 16), (2, 64, 32, 8, 128)])
def test_rope_bf16(layout, bsz, seq, hq, hk, dim):
    torch.manual_seed(11)
    check_rope(layout, bsz, seq, hq, hk, dim, torch.bfloat16)
