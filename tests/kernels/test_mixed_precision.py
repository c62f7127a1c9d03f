"""Kernels under bf16 autocast on CPU, as the trainer runs them (fp32 parameters, autocast bf16):
the fused linear + cross-entropy's gradients against the unfused loss, the dtypes its backward
computes in, and every kernel's output dtype against the activation dtype (the autocast dtype
for activations, fp32 for the residual stream, the loss and each gradient's own input).

bf16 autocast runs on any CPU (emulated where the CPU has no bf16 instructions: slow, so the
shapes are small); the Triton kernels run in the interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from megatron_code.kernels import cross_entropy as ce  # noqa: E402
from megatron_code.kernels.ops import (TORCH_OPS, TRITON_OPS, attention_torch, flash_attention_triton,  # noqa: E402
                                       rope_tables)

BF16 = torch.bfloat16
OPS = [TORCH_OPS, TRITON_OPS]
ATTENTION = {"torch": attention_torch, "triton": flash_attention_triton}
FUSED = {ce.fused_linear_cross_entropy_torch: ce.cross_entropy_torch,  # fused loss -> its unfused loss
         ce.fused_linear_cross_entropy_triton: ce.cross_entropy_triton}


def autocast():
    return torch.autocast("cpu", dtype=BF16)


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul that runs while it is active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def _loss_inputs(n_tokens, vocab, hidden_size, hidden_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n_tokens, hidden_size, generator=gen) * 2).to(hidden_dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).requires_grad_()  # an fp32 parameter
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)
    targets[::5] = ce.IGNORE_INDEX
    grad_out = torch.rand(n_tokens, generator=gen)
    return hidden, weight, targets, grad_out


def _relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("hidden_dtype", [BF16, torch.float32], ids=["bf16_hidden", "fp32_hidden"])
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("fn", FUSED, ids=lambda f: f.__name__)
def test_fused_loss_gradients_match_unfused_under_bf16_autocast(fn, chunk_size, hidden_dtype):
    """The trainer's case: fp32 head weight, bf16 autocast; hidden states bf16 (a norm's output)
    or fp32. Logits are bf16 in both paths, so the gradients must agree to bf16 rounding (0 with
    one chunk; 0.2% with several, whose bf16 weight-gradient products are summed in fp32). A
    backward that recomputes the logits in fp32 against the lse of the bf16 logits is 5% off
    here (logits of size ~10 round by ~0.03 in bf16), and one that mixes the bf16 hidden states
    with the fp32 weight fails."""
    hidden, weight, targets, grad_out = _loss_inputs(40, 300, 32, hidden_dtype, seed=5)
    with autocast():
        fused = fn(hidden, weight, targets, chunk_size=chunk_size)
    fused_grads = torch.autograd.grad((fused * grad_out).sum(), (hidden, weight))

    with autocast():
        logits = F.linear(hidden, weight)  # bf16
        unfused = FUSED[fn](logits, targets)
    unfused_grads = torch.autograd.grad((unfused * grad_out).sum(), (hidden, weight))

    assert fused.dtype == unfused.dtype == torch.float32
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    for name, got, want, dtype in zip(("grad_hidden", "grad_weight"), fused_grads, unfused_grads,
                                      (hidden_dtype, torch.float32)):
        assert got.dtype == want.dtype == dtype, (name, got.dtype, want.dtype)
        assert _relative_error(got, want) < 5e-3, (name, _relative_error(got, want))


@pytest.mark.parametrize("fn", FUSED, ids=lambda f: f.__name__)
def test_fused_loss_backward_runs_in_the_forward_autocast_dtype(fn):
    """Autograd runs the backward outside the autocast region: the fused loss's backward must
    still recompute the logits and run its gradient matmuls in bf16, the weight gradient summed
    in fp32 over the chunks."""
    hidden, weight, targets, grad_out = _loss_inputs(24, 96, 16, BF16, seed=6)
    with autocast():
        loss = fn(hidden, weight, targets, chunk_size=8)
    with MatmulDtypes() as forward_backward:
        loss.backward(grad_out)
    assert len(forward_backward.seen) == 3 * 3  # 3 chunks: recompute, grad_hidden, grad_weight
    assert all(set(dtypes) == {BF16} for dtypes in forward_backward.seen), forward_backward.seen
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == BF16


def test_fused_loss_default_chunks_follow_the_memory_budget():
    """Default chunks hold LOGITS_CHUNK_BYTES of logits in the compute dtype: 4096 tokens at a
    128K vocabulary in bf16, 2048 in fp32; never more than the tokens there are."""
    assert ce._default_chunk_size(100_000, 131072, BF16) == 4096
    assert ce._default_chunk_size(100_000, 131072, torch.float32) == 2048
    assert ce._default_chunk_size(1000, 8192, torch.float32) == 1000
    assert ce._default_chunk_size(10, 1 << 40, torch.float32) == 1


@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
def test_kernel_outputs_take_the_activation_dtype_under_autocast(ops):
    """Inside bf16 autocast with fp32 weights: norms emit bf16 activations and keep the fp32
    residual sum; RoPE, SwiGLU, GELU and attention keep bf16; losses are fp32; every gradient
    comes back in its input's dtype."""
    torch.manual_seed(0)
    residual = torch.randn(2, 8, 64, requires_grad=True)  # the fp32 residual stream
    branch = torch.randn(2, 8, 64, dtype=BF16, requires_grad=True)  # an attention / MLP output
    weight, bias = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    cos, sin = rope_tables(16, 8, 10000.0)
    positions = torch.arange(8).expand(2, 8)
    q = torch.randn(2, 8, 4, 16, dtype=BF16, requires_grad=True)
    k = torch.randn(2, 8, 2, 16, dtype=BF16, requires_grad=True)
    gate_up = torch.randn(2, 8, 96, dtype=BF16, requires_grad=True)
    logits = torch.randn(16, 100, dtype=BF16, requires_grad=True)
    head = torch.randn(100, 64, requires_grad=True)
    targets = torch.randint(0, 100, (16,))
    with autocast():
        normed = ops.rms_norm(residual, weight, 1e-5)
        normed_sum, new_residual = ops.rms_norm(branch, weight, 1e-5, residual)
        layer_normed = ops.layer_norm(residual, weight, bias, 1e-5)
        q_rot, k_rot = ops.apply_rope(q, k, cos, sin, positions)
        activated = ops.swiglu(gate_up)
        gelu = ops.gelu(gate_up)
        attended = ATTENTION[ops.name](q_rot.transpose(1, 2), k_rot.transpose(1, 2), k_rot.transpose(1, 2))
        loss = ops.cross_entropy(logits, targets)
        fused = ops.fused_linear_cross_entropy(normed.flatten(0, 1), head, targets)
    outputs = {"rms_norm": (normed, BF16), "rms_norm+residual": (normed_sum, BF16),
               "residual sum": (new_residual, torch.float32), "layer_norm": (layer_normed, BF16),
               "rope q": (q_rot, BF16), "rope k": (k_rot, BF16), "swiglu": (activated, BF16),
               "gelu": (gelu, BF16), "attention": (attended, BF16), "cross_entropy": (loss, torch.float32),
               "fused_linear_cross_entropy": (fused, torch.float32)}
    wrong = {name: out.dtype for name, (out, want) in outputs.items() if out.dtype != want}
    assert not wrong, wrong

    total = sum(out.float().sum() for out, _ in outputs.values())
    inputs = (residual, branch, weight, bias, q, k, gate_up, logits, head)
    grads = torch.autograd.grad(total, inputs)
    wrong = {i: (g.dtype, x.dtype) for i, (g, x) in enumerate(zip(grads, inputs)) if g.dtype != x.dtype}
    assert not wrong, wrong
    assert all(torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("arch", [{}, {"norm": "layernorm", "activation": "gelu", "position_embedding": "learned"}],
                         ids=["llama", "pangu"])
@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
def test_model_under_autocast_feeds_bf16_to_every_matmul_and_keeps_an_fp32_residual(ops, arch):
    """The whole decoder under bf16 autocast with fp32 parameters: every linear layer receives a
    bf16 activation (no fp32 norm output for autocast to cast again), every block hands the next
    an fp32 residual stream, and the parameters' gradients are fp32."""
    from megatron_code.config import PRESETS, ModelConfig
    from megatron_code.model import GPT

    torch.manual_seed(0)
    config = ModelConfig(**{**PRESETS["tiny"], "vocab_size": 96, **arch})
    model = GPT(config, ops=ops)
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "FusedLinear":
            module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].dtype))
        if type(module).__name__ == "Block":
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out.dtype))
    tokens = torch.randint(0, 96, (2, 16))
    with autocast():
        hidden = model(tokens, return_hidden=True)
        loss = ops.cross_entropy(F.linear(hidden, model.output_weight).flatten(0, 1), tokens.flatten()).mean()
    loss.backward()
    linears = {k: v for k, v in seen.items() if not k.startswith("layers.") or k.count(".") > 1}
    blocks = {k: v for k, v in seen.items() if k.startswith("layers.") and k.count(".") == 1}
    assert len(linears) == 4 * config.num_layers and all(v == BF16 for v in linears.values()), linears
    assert len(blocks) == config.num_layers and all(v == torch.float32 for v in blocks.values()), blocks
    assert hidden.dtype == BF16
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed-dtype addmm (bf16 inputs, fp32 sum) is CUDA's")
def test_fused_loss_sums_the_weight_gradient_in_fp32_by_addmm_on_cuda():
    """On CUDA the weight gradient's chunks go into the fp32 sum by one addmm each (bf16 inputs,
    out_dtype=float32), no 16-bit product in between; gradients as the unfused loss's."""
    hidden, weight, targets, grad_out = _loss_inputs(300, 1000, 64, BF16, seed=7)
    hidden, weight = (t.detach().cuda().requires_grad_() for t in (hidden, weight))
    targets, grad_out = targets.cuda(), grad_out.cuda()
    with torch.autocast("cuda", dtype=BF16):
        fused = ce.fused_linear_cross_entropy_triton(hidden, weight, targets, chunk_size=64)
    fused_grads = torch.autograd.grad((fused * grad_out).sum(), (hidden, weight))
    assert ce._MIXED_ADDMM["cuda"], "torch refused addmm(bf16, bf16, out_dtype=float32) into an fp32 sum"
    with torch.autocast("cuda", dtype=BF16):
        unfused = ce.cross_entropy_triton(F.linear(hidden, weight), targets)
    unfused_grads = torch.autograd.grad((unfused * grad_out).sum(), (hidden, weight))
    for got, want in zip(fused_grads, unfused_grads):
        assert got.dtype == want.dtype
        assert _relative_error(got, want) < 5e-3
