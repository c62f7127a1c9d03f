"""Triton RMSNorm (with and without the fused residual add) and LayerNorm against float64 references.

On a machine without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1), so
shapes stay small. Every kernel output is allocated NaN-filled (the module's `_alloc` is patched):
an element a kernel forgets to write shows up as NaN.
"""
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py has switched on the interpreter without CUDA

from megatron_code.kernels import rms_norm as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU")
# (atol, rtol); atol is scaled by the reference's magnitude, so sums (dweight) get room.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}
EPS = 1e-6


pytestmark = pytest.mark.usefixtures("nan_outputs")  # tests/kernels/conftest.py


def assert_close(actual, expected, dtype):
    assert actual.dtype == dtype or dtype is None, (actual.dtype, dtype)
    assert not torch.isnan(actual).any(), "unwritten (NaN) elements"
    atol, rtol = TOL[actual.dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol)


def leaf(t, dtype):
    return t.to(DEVICE, dtype).requires_grad_()


def double_copies(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def grads(outputs, inputs, grad_outputs):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, wanted, grad_outputs))
    return [None if t is None else next(got) for t in inputs]


# ------------------------------------------------------------------------------------------ RMSNorm


def check_rms_norm(shape, dtype, with_residual, make_input=None):
    n = shape[-1]
    x = leaf(torch.randn(shape) if make_input is None else make_input(), dtype)
    w = leaf(1 + 0.5 * torch.randn(n), dtype)
    r = leaf(torch.randn(shape), dtype) if with_residual else None
    out = K.rms_norm_triton(x, w, EPS, r)
    out = out if with_residual else (out,)
    gouts = [torch.randn(o.shape, device=DEVICE, dtype=o.dtype) for o in out]
    got = grads(out, (x, w, r), gouts)

    x64, w64, r64 = double_copies(x, w, r)
    ref = K.rms_norm_torch(x64, w64, EPS, r64)
    ref = ref if with_residual else (ref,)
    want = grads(ref, (x64, w64, r64), [g.double() for g in gouts])
    for o, e in zip(out, ref):
        assert o.shape == e.shape
        assert_close(o, e, dtype)
    for g, e in zip(got, want):
        if e is not None:
            assert_close(g, e, dtype)


@pytest.mark.parametrize("shape", [(1, 96), (7, 200), (3, 11, 96), (2, 3, 5, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp32(shape, with_residual):
    torch.manual_seed(zlib.crc32(repr((shape, with_residual)).encode()))
    check_rms_norm(shape, torch.float32, with_residual)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp16(with_residual):
    torch.manual_seed(1)
    check_rms_norm((3, 11, 200), torch.float16, with_residual)


@needs_cuda
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(7, 200), (4, 33, 4096)])
def test_rms_norm_bf16(shape, with_residual):
    torch.manual_seed(2)
    check_rms_norm(shape, torch.bfloat16, with_residual)


def test_rms_norm_non_contiguous_input():
    torch.manual_seed(3)
    # a column slice (row-strided view, read in place) and a transpose (copied)
    check_rms_norm((7, 96), torch.float32, True, lambda: torch.randn(7, 130)[:, 17:113])
    check_rms_norm((5, 200), torch.float32, False, lambda: torch.randn(200, 5).t())


def test_rms_norm_non_contiguous_grad_and_one_output_used():
    torch.manual_seed(4)
    x, r = leaf(torch.randn(7, 96), torch.float32), leaf(torch.randn(7, 96), torch.float32)
    w = leaf(torch.randn(96), torch.float32)
    x64, w64, r64 = double_copies(x, w, r)
    y, s = K.rms_norm_triton(x, w, EPS, r)
    y64, s64 = K.rms_norm_torch(x64, w64, EPS, r64)
    g = torch.randn(96, 7).t()  # non-contiguous upstream gradient
    for out, ref in ((y, y64), (s, s64)):  # only one of the two outputs reaches the loss
        got = torch.autograd.grad(out, (x, w, r), g, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref, (x64, w64, r64), g.double(), retain_graph=True, allow_unused=True)
        for a, e in zip(got, want):
            if e is None:
                assert a is None or not a.abs().any()
            else:
                assert_close(a, e, torch.float32)


def test_rms_norm_residual_grads_are_separate_tensors():
    torch.manual_seed(5)
    x, r = leaf(torch.randn(3, 96), torch.float32), leaf(torch.randn(3, 96), torch.float32)
    w = torch.ones(96)
    y, s = K.rms_norm_triton(x, w, EPS, r)
    (y.sum() + s.sum()).backward()
    torch.testing.assert_close(x.grad, r.grad)
    x.grad.zero_()
    assert r.grad.abs().sum() > 0


def test_rms_norm_weight_without_grad_and_empty():
    torch.manual_seed(6)
    x = leaf(torch.randn(7, 200), torch.float32)
    w = (1 + torch.randn(200)).to(DEVICE)
    y = K.rms_norm_triton(x, w, EPS)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(K.rms_norm_torch(x64, w.double(), EPS), x64, torch.ones_like(x64))
    assert_close(dx, dx64, torch.float32)
    e = leaf(torch.randn(0, 96), torch.float32)
    y = K.rms_norm_triton(e, torch.ones(96, device=DEVICE, requires_grad=True), EPS)
    assert y.shape == (0, 96)
    y.sum().backward()
    assert e.grad.shape == (0, 96)


# ---------------------------------------------------------------------------------------- LayerNorm


def check_layer_norm(shape, dtype, with_weight=True, with_bias=True, make_input=None):
    n = shape[-1]
    x = leaf(3 + torch.randn(shape) if make_input is None else make_input(), dtype)
    w = leaf(1 + 0.5 * torch.randn(n), dtype) if with_weight else None
    b = leaf(torch.randn(n), dtype) if with_bias else None
    y = K.layer_norm_triton(x, w, b, 1e-5)
    gy = torch.randn(y.shape, device=DEVICE, dtype=dtype)
    got = grads(y, (x, w, b), gy)
    x64, w64, b64 = double_copies(x, w, b)
    ref = K.layer_norm_torch(x64, w64, b64, 1e-5)
    want = grads(ref, (x64, w64, b64), gy.double())
    assert_close(y, ref, dtype)
    for g, e in zip(got, want):
        if e is not None:
            assert_close(g, e, dtype)


@pytest.mark.parametrize("shape", [(1, 96), (7, 200), (3, 11, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm_fp32(shape, with_bias):
    torch.manual_seed(zlib.crc32(repr((shape, with_bias)).encode()))
    check_layer_norm(shape, torch.float32, with_bias=with_bias)


def test_layer_norm_fp16_no_weight_non_contiguous():
    torch.manual_seed(7)
    check_layer_norm((3, 11, 96), torch.float16)
    check_layer_norm((7, 96), torch.float32, with_weight=False, with_bias=False)
    check_layer_norm((7, 96), torch.float32, make_input=lambda: torch.randn(7, 130)[:, 17:113])


@needs_cuda
@pytest.mark.parametrize("shape", [(7, 200), (4, 33, 4096)])
def test_layer_norm_bf16(shape):
    torch.manual_seed(8)
    check_layer_norm(shape, torch.bfloat16)


# ------------------------------------------------------------ both norms on rows where eps matters

NORMS = {"rms_norm_torch": K.rms_norm_torch, "rms_norm_triton": K.rms_norm_triton,
         "layer_norm_torch": K.layer_norm_torch, "layer_norm_triton": K.layer_norm_triton}
ROW_SCALES = {"zero": 0.0, "tiny": 1e-3, "tinier": 1e-6, "unit": 1.0, "huge": 1e4, "huger": 1e12}
"""Rows of randn x scale: at 1e-3 the mean square is eps, at 1e-6 eps dominates it."""
ROW_RTOL = EPS / 2
"""Below eps: moving eps outside the sqrt changes unit rows by eps / 2 and tiny rows by 50%."""


def hand_norm(kind, x, weight, bias, eps):
    """The textbook formulas in float64: RMSNorm x / sqrt(mean(x^2) + eps) * w, LayerNorm
    (x - mean) / sqrt(mean((x - mean)^2) + eps) * w + b."""
    if kind.startswith("rms"):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight
    centered = x - x.mean(-1, keepdim=True)
    return centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + eps) * weight + bias


def row_error(actual, expected):
    """Per row: the largest difference relative to the row's largest reference value."""
    return (actual.double() - expected).abs().amax(-1) / expected.abs().amax(-1).clamp(min=1e-300)


@pytest.mark.parametrize("kind", NORMS)
def test_norm_on_zero_tiny_and_huge_rows_matches_the_formula_within_eps(kind):
    torch.manual_seed(9)
    n, per_scale = 200, 3
    x = leaf(torch.cat([torch.randn(per_scale, n) * s for s in ROW_SCALES.values()]), torch.float32)
    w = leaf(1 + 0.5 * torch.randn(n), torch.float32)
    b = leaf(torch.randn(n), torch.float32)
    args = (x, w, EPS) if kind.startswith("rms") else (x, w, b, EPS)
    y = NORMS[kind](*args)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w) if kind.startswith("rms") else (x, w, b), gy)

    x64, w64, b64 = double_copies(x, w, b)
    ref = hand_norm(kind, x64, w64, b64, EPS)
    want = torch.autograd.grad(ref, (x64, w64) if kind.startswith("rms") else (x64, w64, b64), gy.double())
    assert not torch.isnan(y).any() and all(torch.isfinite(g).all() for g in got)
    errors = row_error(y, ref).view(len(ROW_SCALES), per_scale).amax(1)
    bad = {name: f"{e:.1e}" for name, e in zip(ROW_SCALES, errors.tolist()) if e > ROW_RTOL}
    assert not bad, f"output off by more than {ROW_RTOL:.0e} of the row: {bad}"
    dx_errors = row_error(got[0], want[0]).view(len(ROW_SCALES), per_scale).amax(1)
    bad = {name: f"{e:.1e}" for name, e in zip(ROW_SCALES, dx_errors.tolist()) if e > 2e-6}
    assert not bad, f"input gradient off: {bad}"
    for g, e in zip(got[1:], want[1:]):  # sums over all rows: relative to their largest element
        assert (g.double() - e).abs().max() <= 2e-6 * e.abs().max()


@pytest.mark.parametrize("kind", ["layer_norm_torch", "layer_norm_triton"])
def test_layer_norm_on_rows_with_a_large_mean_and_tiny_spread(kind):
    """mean 1, spread 1e-3 (variance = eps): a variance taken as E[x^2] - E[x]^2 in fp32 loses it
    to cancellation (6% off here); subtracting the mean first keeps the error at the input's own
    fp32 resolution (ulp(1) / 1e-3, about 3e-5)."""
    torch.manual_seed(10)
    x = 1 + 1e-3 * torch.randn(6, 200)
    w, b = 1 + 0.5 * torch.randn(200), torch.randn(200)
    y = NORMS[kind](x, w, b, EPS)
    assert row_error(y, hand_norm(kind, x.double(), w.double(), b.double(), EPS)).max() < 1e-3
