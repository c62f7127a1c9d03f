"""MFU: the FLOP formula against a hand count and against torch's FLOP counter on a real forward
and backward (with and without activation recomputation), and the GPU peak table matched by the
names torch.cuda.get_device_name() really returns."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from megatron_code.config import PRESETS, ModelConfig
from megatron_code.model import GPT
from megatron_code.parallel.activation_checkpointing import apply_ac
from megatron_code.training import metrics
from megatron_code.training.metrics import flops_per_token, hardware_flops_per_token, peak_flops, peak_flops_for_name


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**PRESETS["tiny"], "vocab_size": 1024, **overrides})


def test_flops_per_token_by_hand():
    """tiny: hidden 64, 2 layers, 4 heads of 16 (2 kv heads), SwiGLU FFN 192, vocabulary 1024, at
    sequence length 256."""
    qkv = 64 * (4 + 2 + 2) * 16        # 8192
    attention_out = 64 * 64            # 4096
    mlp = 3 * 64 * 192                 # 36864: gate, up, down
    head = 64 * 1024                   # 65536: tied, but still a matmul
    n_matmul = 2 * (qkv + attention_out + mlp) + head
    assert n_matmul == 163_840
    attention = 12 * 2 * 64 * 256      # 12 L H s
    assert flops_per_token(tiny(), 256) == 6 * n_matmul + attention == 1_376_256
    assert hardware_flops_per_token(tiny(), 256, "none") == 1_376_256
    assert hardware_flops_per_token(tiny(), 256, "selective") == 1_376_256 + 4 * 2 * 64 * 256
    down = 64 * 192  # not recomputed: no backward reads its output
    assert hardware_flops_per_token(tiny(), 256, "full") == 1_376_256 + 2 * 2 * (qkv + attention_out + mlp - down) \
        + 4 * 2 * 64 * 256
    gelu = tiny(activation="gelu", ffn_hidden_size=256, num_kv_heads=4)  # 2 MLP matrices, no GQA
    assert flops_per_token(gelu, 256) == 6 * (2 * (64 * 12 * 16 + 4096 + 2 * 64 * 256) + head) + attention


def test_standard_formula_ratio_for_the_presets():
    """The issue's figures: the old count (causal half of attention) gave 0.87x of the standard
    MFU for 125m at seq 2048 and 0.73x for 470m at seq 8192."""
    for preset, seq, old_over_new in (("125m", 2048, 0.87), ("470m", 8192, 0.73)):
        config = ModelConfig(**{**PRESETS[preset], "vocab_size": 32000})
        attention = 12 * config.num_layers * config.hidden_size * seq
        new = flops_per_token(config, seq)
        assert (new - attention / 2) / new == pytest.approx(old_over_new, abs=0.01)


ARCHS = {"llama": {}, "pangu": {"norm": "layernorm", "activation": "gelu", "position_embedding": "learned",
                                "tie_embeddings": False}}
# the fused CPU attention kernel training runs, counted by torch's own SDPA formulas (its backward
# counts the kernel's internal recomputation too, so only forward differences are compared below)
FUSED_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def counted_flops(config, recompute, batch, seq, attention_backend=None):
    """torch's FlopCounterMode over a real forward and backward of the model, recomputation included."""
    torch.manual_seed(0)
    model = GPT(config)
    apply_ac(model, recompute)
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    backend = sdpa_kernel(attention_backend) if attention_backend else contextlib.nullcontext()
    with backend, FlopCounterMode(display=False, custom_mapping=FUSED_ATTENTION) as counter:
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ARCHS)
def test_model_flops_match_torchs_flop_counter(arch):
    """Every matmul of a forward and backward, attention's QK^T and AV included (SDPA's math
    backend: plain bmm, the whole sequence whether causal or not)."""
    config, batch, seq = tiny(**ARCHS[arch]), 2, 32
    assert counted_flops(config, "none", batch, seq, SDPBackend.MATH) == flops_per_token(config, seq) * batch * seq


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("arch", ARCHS)
def test_recomputed_flops_match_torchs_flop_counter(arch, recompute):
    """What recomputation adds, as it runs: the fused attention kernel training uses, and torch's
    checkpointing, which stops recomputing once the backward has what it needs."""
    config, batch, seq = tiny(**ARCHS[arch]), 2, 32
    extra = counted_flops(config, recompute, batch, seq) - counted_flops(config, "none", batch, seq)
    assert extra == (hardware_flops_per_token(config, seq, recompute) - flops_per_token(config, seq)) * batch * seq


# torch.cuda.get_device_name() as it reads on each board (nvidia-smi and torch print the same names)
KNOWN = {
    "NVIDIA H100 80GB HBM3": 989e12,     # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA B200": 2250e12,
}
UNKNOWN = [
    "NVIDIA H100",                        # some SXM boards report only this: SXM or not cannot be told
    "NVIDIA H800",
    "NVIDIA B300 SXM6 AC",
    "NVIDIA GeForce RTX 4090",
    "NVIDIA A100-SXM4-40GB MIG 1g.5gb",   # a known name and more: no prefix or substring match
    "Tesla V100-SXM2-16GB",
    "AMD Instinct MI300X",
]


@pytest.mark.parametrize("name, peak", KNOWN.items())
def test_peak_of_known_gpus(name, peak):
    assert peak_flops_for_name(name) == peak


@pytest.mark.parametrize("name", UNKNOWN)
def test_no_peak_for_unknown_gpus(name):
    assert peak_flops_for_name(name) is None


def test_peak_flops_says_where_it_comes_from(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(cuda, torch.bfloat16) == (756e12, "MFU against NVIDIA H100 PCIe's dense bf16 peak, 756 TFLOP/s")
    peak, note = peak_flops(cuda, torch.float32)
    assert peak is None and "bf16 peaks and this run computes in torch.float32" in note
    assert peak_flops(cuda, torch.float32, peak_tflops=60)[0] == 60e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    peak, note = peak_flops(cuda, torch.bfloat16)
    assert peak is None and "'NVIDIA H100' is not in the peak table" in note and "train.peak_tflops" in note
    assert peak_flops(torch.device("cpu"), torch.float32)[0] is None
    assert peak_flops(torch.device("cpu"), torch.float32, peak_tflops=0.5)[0] == 0.5e12
    assert set(KNOWN) <= set(metrics.PEAK_BF16_FLOPS)
