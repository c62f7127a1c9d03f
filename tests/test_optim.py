"""LR schedules against their closed forms, and which parameters get weight decay."""
import math

import pytest
import torch

from megatron_code.config import OptimConfig, PRESETS, ModelConfig
from megatron_code.model import GPT
from megatron_code.training.optim import build_optimizer, lr_at


def test_cosine():
    c = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 110, c) == pytest.approx(0.1) and lr_at(9, 110, c) == pytest.approx(1.0)
    assert lr_at(59, 110, c) == pytest.approx(0.55)  # half way through the decay
    assert lr_at(109, 110, c) == pytest.approx(0.1)
    for s in range(10, 109):
        expected = 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 9) / 100))
        assert lr_at(s, 110, c) == pytest.approx(expected)


def test_wsd_and_linear():
    wsd = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, 100, wsd) for s in (5, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(89, 100, wsd) == pytest.approx(0.5) and lr_at(99, 100, wsd) == pytest.approx(0.0)
    linear = OptimConfig(lr=1.0, min_lr=1e-6, warmup_steps=0, schedule="linear")
    assert lr_at(49, 100, linear) == pytest.approx(1.0 + (1e-6 - 1.0) * 0.5)
    assert lr_at(99, 100, linear) == pytest.approx(1e-6)


def test_no_weight_decay_on_norms():
    model = GPT(ModelConfig(**{**PRESETS["tiny"], "vocab_size": 64, "norm": "layernorm"}))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert opt.param_groups[1]["weight_decay"] == 0.0
