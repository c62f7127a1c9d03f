"""A tiny model trained with the Triton kernels follows the PyTorch reference path (on CPU the
kernels run under TRITON_INTERPRET=1, set by conftest.py)."""
import pytest
import torch

from megatron_code.config import PRESETS, ModelConfig
from megatron_code.kernels.ops import KernelUnavailable, build_attention, build_ops
from megatron_code.model import GPT
from megatron_code.model.loss import sample_losses


def train_losses(kernels: str, attention: str, arch: dict, steps: int = 12) -> list[float]:
    config = ModelConfig(**{**PRESETS["tiny"], "vocab_size": 96, "max_seq_len": 16, **arch})
    device = torch.device("cpu")
    ops = build_ops(kernels, device)
    torch.manual_seed(0)
    model = GPT(config, ops=ops, attention=build_attention(attention, device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Four fixed sequences, drawn again and again: learnable in a few steps (the interpreter is slow).
    patterns = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(1))
    order = torch.randint(0, 4, (steps, 2), generator=torch.Generator().manual_seed(2))
    losses = []
    for batch in patterns[order]:
        tokens, labels = batch[:, :-1], batch[:, 1:].clone()
        labels[0, :3] = -100  # ignored positions take part too
        positions = torch.arange(16).expand(2, 16)
        mask = (labels != -100).float()
        hidden = model(tokens, positions, return_hidden=True)
        loss = sample_losses(model, hidden, labels, mask, ops).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch, attention", [
    ({}, "triton"),
    # the older architecture's kernels; attention is covered above, and the interpreter is slow
    ({"norm": "layernorm", "activation": "gelu", "position_embedding": "learned"}, "sdpa"),
], ids=["llama", "pangu"])
def test_triton_kernels_train_like_torch(arch, attention):
    reference = train_losses("torch", "sdpa", arch)
    triton = train_losses("triton", attention, arch)
    assert reference[-1] < reference[0] - 0.5  # it learns, so the comparison means something
    torch.testing.assert_close(torch.tensor(triton), torch.tensor(reference), rtol=1e-4, atol=1e-4)


def test_unavailable_choices_say_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("on a GPU every Triton choice is available")
    with pytest.raises(KernelUnavailable, match="need a CUDA device.*available: auto, torch"):
        build_ops("triton", torch.device("cpu"))
    with pytest.raises(KernelUnavailable, match="flash-attn needs a CUDA device.*available: auto, sdpa"):
        build_attention("flash_attn", torch.device("cpu"))
    assert build_ops("auto", torch.device("cpu")).name == "torch"


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fused_linear_cross_entropy_trains_like_plain_loss(kernels):
    plain = train_losses(kernels, "sdpa", {}, steps=5)
    fused = train_losses(kernels, "sdpa", {"fused_linear_cross_entropy": True}, steps=5)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-5, atol=1e-5)
