"""The GPT decoder: shapes, causality, agreement with transformers' Llama, and learning."""
import pytest
import torch
import torch.nn.functional as F

from megatron_code.config import PRESETS, ModelConfig, ParallelConfig
from megatron_code.model import GPT
from megatron_code.model.hf import to_hf_model
from megatron_code.parallel.pipeline_parallel import apply_pp, stage_layers


def tiny(**overrides) -> ModelConfig:
    config = ModelConfig(**{**PRESETS["tiny"], "vocab_size": 128, **overrides})
    config.validate()
    return config


ARCHS = {
    "llama": {},
    "llama-mha-untied": {"num_kv_heads": 4, "tie_embeddings": False},
    "pangu": {"norm": "layernorm", "activation": "gelu", "position_embedding": "learned"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_causality(arch):
    torch.manual_seed(0)
    model = GPT(tiny(**ARCHS[arch]))
    tokens = torch.randint(0, 128, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, 128)
    changed = tokens.clone()
    changed[:, 15:] = torch.randint(0, 128, (2, 9))
    other = model(changed)
    torch.testing.assert_close(other[:, :15], logits[:, :15])  # future tokens change nothing before
    assert not torch.allclose(other[:, 15:], logits[:, 15:])
    assert model(tokens, return_hidden=True).shape == (2, 24, 64)


def test_pipeline_stage_is_the_model_with_modules_removed():
    torch.manual_seed(0)
    model = GPT(tiny())
    tokens = torch.randint(0, 128, (2, 10))
    full = model(tokens)

    def build():
        copy = GPT(tiny())
        copy.load_state_dict(model.state_dict())
        return copy
    first, last = apply_pp(build, [0, 1], stage_layers(2, ParallelConfig(pipeline=2)))
    assert last.embedding is not None  # tied: the last stage's head reads the embedding weight
    hidden = first(tokens)
    torch.testing.assert_close(last(hidden), full)  # the stage was told its input is hidden states
    assert set(first.state_dict()) < set(model.state_dict())  # names unchanged by the split
    with pytest.raises(RuntimeError, match="indices"):  # the whole model embeds: never guessed from the dtype
        model(hidden)


@pytest.mark.parametrize("arch", ["llama", "llama-mha-untied"])
def test_matches_transformers_llama(arch):
    torch.manual_seed(0)
    model = GPT(tiny(**ARCHS[arch])).double().eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    pytest.importorskip("transformers")
    hf = to_hf_model(model).eval()
    tokens = torch.randint(0, 128, (2, 33))
    with torch.no_grad():  # both keep fp32 RoPE tables, computed differently: ~1e-7 apart
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-6, atol=1e-6)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny())
    tokens = torch.randint(0, 128, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05  # from ln(128) = 4.85: memorized


def test_vocab_must_be_known():
    with pytest.raises(ValueError, match="vocab_size must be set"):
        GPT(tiny(vocab_size=0))
