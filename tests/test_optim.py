"""LR schedules against their closed forms, and which parameters get weight decay."""
import math

import pytest

from megatron_code.config import OptimConfig, PRESETS, ModelConfig
from megatron_code.model import GPT
from megatron_code.training.optim import build_optimizer, lr_at, lr_plan_notes


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


def _saved(steps: int, **optim) -> dict:
    """The part of a checkpoint's config the LR plan reads."""
    return {"train": {"steps": steps}, "optim": {**vars(OptimConfig(**optim)), "a_field_of_the_future": 1}}


def test_lr_plan_notes_say_what_a_resume_changes():
    cosine = dict(lr=2e-3, min_lr=2e-4, warmup_steps=30, schedule="cosine")
    assert lr_plan_notes(OptimConfig(**cosine), 300, 120, _saved(300, **cosine)) == []  # the same plan
    assert lr_plan_notes(OptimConfig(**cosine), 600, 0, None) == []  # a fresh run
    assert lr_plan_notes(OptimConfig(**cosine), 600, 0, _saved(300, **cosine)) == []  # weights only: its own plan
    # 300 steps extended to 600 (the quickstart's `--steps 600`, its warmup a tenth of the steps)
    (note,) = lr_plan_notes(OptimConfig(**{**cosine, "warmup_steps": 60}), 600, 300, _saved(300, **cosine))
    replanned = 2e-4 + 0.5 * 1.8e-3 * (1 + math.cos(math.pi * (300 - 60 + 1) / 540))
    assert note.startswith(f"note: the LR schedule is re-planned from step 300 (train.steps 300 -> 600, "
                           f"optim.warmup_steps 30 -> 60): step 300 ran at LR 0.0002, the new plan gives "
                           f"{replanned:.3g} at step 301; optim.schedule=wsd extends cleanly")
    # wsd from inside its decay re-raises the LR: say from where it would not
    wsd = dict(lr=1.0, min_lr=0.1, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    (note,) = lr_plan_notes(OptimConfig(**wsd), 200, 90, _saved(100, **wsd))
    assert (f"step 90 ran at LR {0.1 + 0.9 * 0.5:.3g}, the new plan gives 1 at step 91 (the checkpoint's plan: "
            f"{1 - 0.9 * 11 / 20:.3g}); this checkpoint is inside the old plan's decay (from step 80)") in note
    (note,) = lr_plan_notes(OptimConfig(**wsd), 200, 80, _saved(100, **wsd))  # from the decay's start: no jump
    assert "step 80 ran at LR 1, the new plan gives 1 at step 81 (the checkpoint's plan: 0.955)" in note
    assert "inside the old plan's decay" not in note and "extends cleanly" not in note
    (note,) = lr_plan_notes(OptimConfig(**{**wsd, "lr": 0.5}), 100, 50, _saved(100, **wsd))
    assert "(optim.lr 1.0 -> 0.5): step 50 ran at LR 1, the new plan gives 0.5 at step 51" in note


def test_a_warmup_the_run_never_finishes_is_noted():
    # the README's 125M recipe shrunk to 30 steps, before its command set a shorter warmup
    (note,) = lr_plan_notes(OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=500), 30, 0, None)
    assert note == ("note: optim.warmup_steps=500 is not shorter than the run's 30 steps: the LR only climbs, to "
                    f"{6e-4 * 30 / 500:.3g} of optim.lr=0.0006, and the cosine schedule never starts; shorten the "
                    "warmup")
    assert lr_plan_notes(OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=3), 30, 0, None) == []


def test_no_weight_decay_on_norms():
    model = GPT(ModelConfig(**{**PRESETS["tiny"], "vocab_size": 64, "norm": "layernorm"}))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert opt.param_groups[1]["weight_decay"] == 0.0
