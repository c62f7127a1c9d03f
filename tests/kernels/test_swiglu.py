"""Triton SwiGLU and GELU (tanh approximation) against float64 references, forward and backward.

Outputs are allocated NaN-filled (the module's `_alloc` is patched), so an element a kernel
forgets to write shows as NaN.
"""
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py has switched on the interpreter without CUDA

from megatron_code.kernels import swiglu as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU")
# sigmoid(z) = 1 / (1 + exp(-z)) overflows exp to inf for very negative z, giving the right 0
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.usefixtures("nan_outputs")]  # tests/kernels/conftest.py
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def assert_close(actual, expected, dtype):
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert not torch.isnan(actual).any(), "unwritten (NaN) elements"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def check(fn, ref_fn, make_input, dtype):
    """fn(x) and its input gradient against ref_fn on a float64 copy of x."""
    x = make_input().to(DEVICE, dtype).requires_grad_()
    y = fn(x)
    g = torch.randn(y.shape, device=DEVICE, dtype=dtype)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    y64 = ref_fn(x64)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    assert y.shape == y64.shape
    assert_close(y, y64, dtype)
    assert_close(dx, dx64, dtype)


# ------------------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("shape", [
    (1, 2 * 1),         # F = 1
    (7, 2 * 100),       # F not a power of two
    (3, 11, 2 * 96),    # leading dims, 33 rows
    (3, 2 * 1100),      # several column blocks
])
def test_swiglu_fp32(shape):
    torch.manual_seed(zlib.crc32(repr(shape).encode()))
    check(K.swiglu_triton, K.swiglu_torch, lambda: 2 * torch.randn(shape), torch.float32)


def test_swiglu_fp16():
    torch.manual_seed(20)
    check(K.swiglu_triton, K.swiglu_torch, lambda: 2 * torch.randn(3, 11, 2 * 200), torch.float16)


def test_swiglu_non_contiguous_input_and_grad():
    torch.manual_seed(21)
    # a column slice (row-strided view) and a transpose (copied)
    check(K.swiglu_triton, K.swiglu_torch, lambda: torch.randn(7, 250)[:, 25:225], torch.float32)
    check(K.swiglu_triton, K.swiglu_torch, lambda: torch.randn(96, 5).t(), torch.float32)
    x = torch.randn(5, 2 * 48, device=DEVICE, requires_grad=True)
    g = torch.randn(48, 5, device=DEVICE).t()  # non-contiguous upstream gradient
    (dx,) = torch.autograd.grad(K.swiglu_triton(x), x, g)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(K.swiglu_torch(x64), x64, g.double())
    assert_close(dx, dx64, torch.float32)


def test_swiglu_empty_and_odd_width():
    x = torch.randn(0, 3, 64, device=DEVICE, requires_grad=True)
    y = K.swiglu_triton(x)
    assert y.shape == (0, 3, 32)
    y.sum().backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError):
        K.swiglu_triton(torch.randn(2, 7, device=DEVICE))


@needs_cuda
@pytest.mark.parametrize("shape", [(7, 2 * 100), (4, 33, 2 * 2816)])
def test_swiglu_bf16(shape):
    torch.manual_seed(22)
    check(K.swiglu_triton, K.swiglu_torch, lambda: 2 * torch.randn(shape), torch.bfloat16)


# --------------------------------------------------------------------------------------------- GELU


@pytest.mark.parametrize("shape", [(1, 1), (7, 200), (3, 11, 96), (3, 1100)])
def test_gelu_fp32(shape):
    torch.manual_seed(zlib.crc32(repr(shape).encode()))
    check(K.gelu_triton, K.gelu_torch, lambda: 3 * torch.randn(shape), torch.float32)


def test_gelu_extreme_inputs():
    """Large |x| must saturate (y -> x or 0, dy/dx -> 1 or 0) without inf or NaN."""
    grid = torch.tensor([-1e4, -100.0, -30.0, -10.0, -1e-3, 0.0, 1e-3, 10.0, 30.0, 100.0, 1e4])
    check(K.gelu_triton, K.gelu_torch, lambda: grid.view(1, -1), torch.float32)
    check(K.gelu_triton, K.gelu_torch, lambda: torch.linspace(-12, 12, 97).view(1, -1), torch.float16)


def test_gelu_fp16_and_non_contiguous():
    torch.manual_seed(23)
    check(K.gelu_triton, K.gelu_torch, lambda: 3 * torch.randn(3, 11, 200), torch.float16)
    check(K.gelu_triton, K.gelu_torch, lambda: torch.randn(7, 130)[:, 17:113], torch.float32)
    check(K.gelu_triton, K.gelu_torch, lambda: torch.randn(2, 96, 5).transpose(1, 2), torch.float32)


@needs_cuda
@pytest.mark.parametrize("shape", [(7, 200), (4, 33, 4096)])
def test_gelu_bf16(shape):
    torch.manual_seed(24)
    check(K.gelu_triton, K.gelu_torch, lambda: 3 * torch.randn(shape), torch.bfloat16)
