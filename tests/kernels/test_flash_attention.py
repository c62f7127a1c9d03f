"""flash_attention: the Triton kernel (forward and backward) and the PyTorch reference path against
an explicit float64 softmax(QK^T * scale + mask) V, with K/V repeated per query group."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton kernel is defined

import math

import pytest

fa = pytest.importorskip("megatron_code.kernels.flash_attention")
pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and not fa._interpreted():
    pytest.skip("no CUDA and triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels write starts as NaN: an element left unwritten fails the test."""
    monkeypatch.setattr(fa, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                               dtype=dtype, device=device))


def reference_float64(q, k, v, document_ids=None, scale=None):
    """Explicit causal (and same-document) softmax attention on float64 copies."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    T = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def packed_documents(B, T, lengths_per_row):
    """(B, T) document ids: row b holds documents of the given lengths, then one running to T."""
    ids = torch.empty(B, T, dtype=torch.long)
    for b, lengths in enumerate(lengths_per_row):
        pos, doc = 0, 0
        for n in lengths:
            ids[b, pos:pos + n] = doc
            pos, doc = pos + n, doc + 1
        ids[b, pos:] = doc
    return ids


def make_inputs(B, Hq, Hk, T, D, dtype, device=DEVICE, seq_major=False, seed=0):
    """Fresh random q, k, v (leaf tensors). seq_major builds them as (B, T, H, D) and transposes,
    as the model does, so the kernel sees non-contiguous strides."""
    g = torch.Generator().manual_seed(seed)

    def one(H):
        shape = (B, T, H, D) if seq_major else (B, H, T, D)
        x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        x.requires_grad_(True)
        return x

    q, k, v = one(Hq), one(Hk), one(Hk)
    return q, k, v


def as_bhtd(x, seq_major):
    return x.transpose(1, 2) if seq_major else x


def magnitude_close(actual, expected, rel, name):
    """|actual - expected| <= rel * max(1, max|expected|), elementwise, NaN fails."""
    tol = rel * max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs()
    assert not torch.isnan(actual).any(), f"{name}: NaN (unwritten element?)"
    assert err.max().item() <= tol, f"{name}: max error {err.max().item():.3e} > {tol:.3e}"


def check_against_float64(B, Hq, Hk, T, D, dtype, document_ids, rel, seq_major=False, scale=None):
    q, k, v = make_inputs(B, Hq, Hk, T, D, dtype, seq_major=seq_major)
    qh, kh, vh = (as_bhtd(x, seq_major) for x in (q, k, v))
    out = fa.flash_attention_triton(qh, kh, vh, document_ids, scale)
    assert out.dtype == dtype and out.shape == (B, Hq, T, D)
    grad_out = torch.randn(B, T, Hq, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    # gradient through a transpose: dO arrives non-contiguous
    (out.transpose(1, 2) * grad_out).sum().backward()

    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = reference_float64(as_bhtd(q64, seq_major), as_bhtd(k64, seq_major), as_bhtd(v64, seq_major),
                            document_ids, scale)
    (ref.transpose(1, 2) * grad_out.double()).sum().backward()

    magnitude_close(out, ref.detach(), rel, "out")
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert x.grad.dtype == dtype
        magnitude_close(x.grad, x64.grad, rel, name)


FP32_REL = 1e-4
FP16_REL = 2e-3


@pytest.mark.parametrize(
    "B, Hq, Hk, T, D, dtype, docs, seq_major",
    [
        (2, 2, 2, 70, 64, torch.float32, None, False),
        (2, 4, 1, 70, 64, torch.float32, [[20, 30], [5, 35, 3]], True),
        (1, 4, 1, 33, 128, torch.float32, [[12]], False),
        (1, 4, 1, 70, 64, torch.float16, [[40, 1]], False),
        (1, 2, 2, 17, 128, torch.float16, None, True),
        (2, 2, 1, 1, 32, torch.float32, [[], []], False),
    ],
    ids=["fp32-d64-mha-T70", "fp32-d64-gqa4-T70-docs-strided", "fp32-d128-gqa4-T33-docs",
         "fp16-d64-gqa4-T70-docs", "fp16-d128-mha-T17-strided", "fp32-d32-T1-docs"],
)
def test_matches_float64(B, Hq, Hk, T, D, dtype, docs, seq_major):
    document_ids = None if docs is None else packed_documents(B, T, docs).to(DEVICE)
    rel = FP32_REL if dtype == torch.float32 else FP16_REL
    check_against_float64(B, Hq, Hk, T, D, dtype, document_ids, rel, seq_major=seq_major)


def test_scattered_document_ids_and_custom_scale():
    """Document ids need not form contiguous runs (block skipping must stay conservative)."""
    B, T = 2, 40
    document_ids = torch.randint(-1, 2, (B, T), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    check_against_float64(B, 2, 1, T, 16, torch.float32, document_ids, FP32_REL, scale=0.3)


@pytest.mark.parametrize("D, table_dtype", [(64, torch.float16), (128, torch.float16), (64, torch.float32)])
def test_h100_block_sizes(monkeypatch, D, table_dtype):
    """The CUDA tiles (16-bit: 128x64 forward, 128-key dK/dV, 128-query dQ; fp32: halved) run
    under the interpreter too, on fp32 inputs."""
    cuda_blocks = fa._select_blocks(D, table_dtype, torch.device("cuda"))
    monkeypatch.setattr(fa, "_select_blocks", lambda *args: cuda_blocks)
    T = 150
    document_ids = packed_documents(1, T, [[9, 130]]).to(DEVICE)
    check_against_float64(1, 2, 1, T, D, torch.float32, document_ids, FP32_REL)


@pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is not emulated by the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_long_sequences(dtype, D):
    """Error no worse than torch's own attention in the same dtype; bitwise deterministic."""
    B, Hq, Hk, T = 2, 8, 2, 1000
    document_ids = packed_documents(B, T, [[300, 211], [17, 600]]).to(DEVICE)
    for docs in (None, document_ids):
        q, k, v = make_inputs(B, Hq, Hk, T, D, dtype)
        grad_out = torch.randn(B, Hq, T, D, device=DEVICE, dtype=dtype)
        results = []
        for fn in (fa.flash_attention_triton, fa.flash_attention_triton, fa.attention_torch):
            out = fn(q, k, v, docs)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            results.append((out, *grads))
        q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        ref = reference_float64(q64, k64, v64, docs)
        ref_all = (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad_out.double()))
        for ours, again, torch_path, expected, name in zip(*results, ref_all, ("out", "dq", "dk", "dv")):
            assert torch.equal(ours, again), f"{name}: not deterministic"
            err = (ours.double() - expected).abs().max().item()
            torch_err = (torch_path.double() - expected).abs().max().item()
            assert err <= 2 * torch_err + 1e-5 * max(1.0, expected.abs().max().item()), \
                f"{name} {dtype} D={D}: error {err:.3e} vs torch {torch_err:.3e}"


@pytest.mark.parametrize("gqa, docs", [(False, False), (True, True)])
def test_reference_path_matches_float64(gqa, docs):
    B, Hq, T, D = 2, 4, 37, 32
    Hk = 2 if gqa else Hq
    q, k, v = make_inputs(B, Hq, Hk, T, D, torch.float32, device="cpu")
    document_ids = packed_documents(B, T, [[10, 10], [3]]) if docs else None
    out = fa.attention_torch(q, k, v, document_ids)
    magnitude_close(out, reference_float64(q, k, v, document_ids), FP32_REL, "attention_torch")


def test_rejects_unsupported_inputs():
    q = torch.randn(1, 2, 8, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        fa.flash_attention_triton(q, q, q)
    q = torch.randn(1, 2, 8, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        fa.flash_attention_triton(q, q, q)
    q, k = torch.randn(1, 3, 8, 16, device=DEVICE), torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        fa.flash_attention_triton(q, k, k)
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="document_ids"):
        fa.flash_attention_triton(q, q, q, torch.zeros(1, 8, device=DEVICE))


def test_attention_flops():
    assert fa.attention_flops(1, 1, 4, 8, causal=False) == 4 * 16 * 8
    assert fa.attention_flops(2, 3, 4, 8) == 2 * 3 * 4 * 16 * 8 / 2
    assert fa.attention_flops(2, 3, 4, 8, backward=True) == 2.5 * fa.attention_flops(2, 3, 4, 8)


def test_buffers_are_poisoned():
    assert torch.isnan(fa._alloc((3,), torch.float32, "cpu")).all()


# ---------------------------------------------------------------------------------------------
# model.attention=auto: which attention serves which call
# ---------------------------------------------------------------------------------------------

def _auto_on_cuda(monkeypatch, flash_attn: bool, hopper: bool = True, triton: bool = True, head_dim: int = 32):
    """build_attention("auto") for a CUDA device, with flash-attn, the GPU generation and Triton
    as given (the functions that find them out are replaced)."""
    import megatron_code.kernels.ops as K

    monkeypatch.setattr(K, "_flash_attn_problem", lambda device: None if flash_attn else "flash_attn is not installed")
    monkeypatch.setattr(K, "_is_hopper_or_newer", lambda device: hopper)
    monkeypatch.setattr(K, "_triton_problem", lambda device: None if triton else "triton is not installed")
    return K.build_attention("auto", torch.device("cuda"), head_dim)


@pytest.mark.parametrize("flash_attn, hopper, triton, head_dim, unpacked, packed", [
    (True, True, True, 64, "sdpa", "flash_attn"),
    (True, False, True, 64, "flash_attn", "flash_attn"),
    (False, True, True, 64, "sdpa", "triton"),
    (False, False, True, 96, "sdpa", "sdpa"),  # a head size the Triton kernel does not take
    (False, True, False, 64, "sdpa", "sdpa"),  # no Triton
])
def test_auto_attention_choice_on_cuda(monkeypatch, flash_attn, hopper, triton, head_dim, unpacked, packed):
    import megatron_code.kernels.ops as K

    functions = {"sdpa": fa.attention_torch, "flash_attn": K.flash_attn_attention, "triton": fa.flash_attention_triton}
    attention = _auto_on_cuda(monkeypatch, flash_attn, hopper, triton, head_dim)
    assert attention.unpacked is functions[unpacked] and attention.packed is functions[packed]
    assert K.describe_attention(attention) == f"auto: {unpacked}, packed sequences: {packed}"


def test_auto_attention_on_cpu_is_the_reference():
    """On CPU both kinds of batch take SDPA (with the document mask), even where the Triton
    interpreter could run the kernel."""
    import megatron_code.kernels.ops as K

    attention = K.build_attention("auto", torch.device("cpu"), 64)
    assert attention.unpacked is fa.attention_torch and attention.packed is fa.attention_torch
    assert K.describe_attention(attention) == "auto: sdpa, packed sequences: sdpa"
    assert K.describe_attention(K.build_attention("triton", torch.device("cpu"))) == "triton"
    with pytest.raises(K.KernelUnavailable, match=r"head dims \(16, 32, 64, 128\), this model's is 96"):
        K.build_attention("triton", torch.device("cpu"), 96)


def test_auto_attention_sends_packed_batches_to_the_triton_kernel(monkeypatch):
    """Each call goes where the dispatcher says, and both answers equal float64 attention
    (forward and backward): packed batches through the Triton kernel (interpreted on CPU)."""
    import dataclasses

    attention = _auto_on_cuda(monkeypatch, flash_attn=False)
    assert attention.packed is fa.flash_attention_triton
    calls = []

    def recording(name, fn):
        def call(*args):
            calls.append(name)
            return fn(*args)
        return call
    attention = dataclasses.replace(attention, unpacked=recording("unpacked", attention.unpacked),
                                    packed=recording("packed", attention.packed))
    B, Hq, Hk, T, D = 2, 4, 2, 40, 32
    documents = packed_documents(B, T, [[10, 20], [3]]).to(DEVICE)
    for document_ids, expected_call in ((None, "unpacked"), (documents, "packed")):
        q, k, v = make_inputs(B, Hq, Hk, T, D, torch.float32, seed=len(calls))
        out = attention(q, k, v, document_ids)
        assert calls[-1] == expected_call
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        ref = reference_float64(q64, k64, v64, document_ids)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
        for name, ours, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            magnitude_close(ours, expected.detach(), FP32_REL, f"{expected_call} {name}")


@pytest.mark.skipif(not CUDA, reason="the real dispatcher on a GPU needs a CUDA device")
def test_auto_attention_on_this_gpu():
    """build_attention("auto") as a run on this GPU gets it: packed batches leave SDPA (flash-attn
    varlen or the Triton kernel); in bf16 both kinds of batch stay within 2x SDPA's own error of
    float64 attention."""
    import megatron_code.kernels.ops as K

    attention = K.build_attention("auto", DEVICE, 64)
    assert attention.packed in (K.flash_attn_attention, fa.flash_attention_triton)
    B, Hq, Hk, T, D = 2, 8, 2, 512, 64
    documents = packed_documents(B, T, [[100, 211], [17, 300]]).to(DEVICE)
    with torch.no_grad():
        for document_ids in (None, documents):
            q, k, v = make_inputs(B, Hq, Hk, T, D, torch.bfloat16)
            expected = reference_float64(q, k, v, document_ids)
            err, sdpa_err = ((out.double() - expected).abs().max().item()
                             for out in (attention(q, k, v, document_ids), fa.attention_torch(q, k, v, document_ids)))
            assert err <= 2 * sdpa_err + 1e-5, f"document_ids={document_ids is not None}: {err:.3e} vs {sdpa_err:.3e}"
