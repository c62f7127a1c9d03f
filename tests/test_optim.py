"""LR plans against their closed forms (float64, written out per step), the start-up checks of a
plan the run cannot complete, and which parameters get weight decay."""
import math

import pytest

from megatron_code.config import PRESETS, ConfigError, LRPhaseConfig, ModelConfig, OptimConfig, load_config
from megatron_code.model import GPT
from megatron_code.training.lr_schedule import check_lr_plan, lr_at, lr_plan, lr_plan_notes
from megatron_code.training.optim import build_optimizer

BASE = ["--data.sources=[{name: text, prefix: /x/text}]", "--data.tokenizer=/x/spm.model"]


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


def test_phases_compose_a_cosine_then_a_linear_anneal():
    """[{until: 0.9, kind: cosine}, {kind: linear, to: 1e-6}] over 200 steps after a 20-step
    warmup: cosine from lr to min_lr over steps 20..179, then linear from min_lr to 1e-6."""
    config = load_config(None, BASE + ["--train.steps=200", "--optim.lr=3e-4", "--optim.min_lr=3e-5",
                                       "--optim.warmup_steps=20",
                                       "--optim.schedule=[{until: 0.9, kind: cosine}, {kind: linear, to: 1.0e-6}]"])
    assert config.optim.schedule == [LRPhaseConfig("cosine", 0.9), LRPhaseConfig("linear", None, 1e-6)]
    plan = lr_plan(config.optim, 200)
    for step in range(200):
        if step < 20:
            expected = 3e-4 * (step + 1) / 20
        elif step < 180:
            expected = 3e-5 + 0.5 * (3e-4 - 3e-5) * (1 + math.cos(math.pi * (step - 19) / 160))
        else:
            expected = 3e-5 + (1e-6 - 3e-5) * (step - 179) / 20
        assert plan.lr(step) == pytest.approx(expected, rel=1e-12), step
    assert plan.lr(500) == pytest.approx(1e-6)  # past the plan: its last value
    # the start-up line: the first step and the end of every segment, as steps of the whole training
    assert plan.describe(first_step=1000) == (
        "learning rate over steps 1000..1199: 1.5e-05 at step 1000, 0.0003 at step 1019 (end of warmup), "
        "3e-05 at step 1179 (end of cosine), 1e-06 at step 1199 (end of linear)")
    # a constant phase holds the LR it starts with; `to` moves a phase elsewhere than min_lr
    held = OptimConfig(lr=1.0, min_lr=0.5, warmup_steps=0,
                       schedule=[LRPhaseConfig("constant", 10), LRPhaseConfig("cosine", 20, 0.2),
                                 LRPhaseConfig("constant", 30), LRPhaseConfig("linear")])
    assert [lr_at(s, 40, held) for s in (0, 9, 19, 29, 39)] == pytest.approx([1.0, 1.0, 0.2, 0.2, 0.5])


@pytest.mark.parametrize("overrides, message", [
    (["--train.steps=1562", "--optim.warmup_steps=2000"],
     "optim.warmup_steps=2000 is longer than the run's 1,562 steps (train.steps): the LR never reaches optim.lr=0.0003 "
     "and never decays"),
    (["--train.steps=50", "--optim.warmup_steps=50"],
     "the cosine decay of optim.schedule=cosine gets no step of the run's 50 steps (train.steps) after "
     "optim.warmup_steps=50: the LR never decays from 0.0003 to 3e-05"),
    (["--train.steps=100", "--optim.warmup_steps=95", "--optim.schedule=wsd"],
     "the linear decay of optim.schedule=wsd starts at step 80, inside optim.warmup_steps=95: the LR jumps from the "
     "warmup into the middle of the decay"),
    (["--train.steps=100", "--optim.warmup_steps=10", "--optim.schedule=[{until: 5, kind: cosine}, {kind: constant}]"],
     "the cosine decay of optim.schedule[0] gets no step of the run's 100 steps (train.steps) after "
     "optim.warmup_steps=10"),
])
def test_a_plan_the_run_cannot_complete_stops_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, BASE + overrides)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith("override --")  # where the value came from
    # explicitly allowed: the same sentences come back as warnings, and the run may start
    config = load_config(None, BASE + overrides + ["--optim.allow_incomplete_schedule=true"])
    assert any(message in warning for warning in check_lr_plan(config.optim, config.train.steps))


def test_a_plan_the_run_completes_has_no_warning():
    for steps, warmup in ((51, 50), (1, 0), (2, 1)):
        config = load_config(None, BASE + [f"--train.steps={steps}", f"--optim.warmup_steps={warmup}"])
        assert check_lr_plan(config.optim, steps) == []
    constant = load_config(None, BASE + ["--train.steps=5", "--optim.warmup_steps=5", "--optim.schedule=constant"])
    assert check_lr_plan(constant.optim, 5) == []  # reaches the peak on its last step, and nothing was to decay


@pytest.mark.parametrize("schedule, message", [
    ("[]", "optim.schedule is an empty list"),
    ("[{until: 0.5, kind: cosine}]", "optim.schedule[0].until: the last phase runs to the end of the run"),
    ("[{kind: cosine}, {kind: linear}]", "optim.schedule[0].until: empty, but only the last phase"),
    ("[{until: 0.5, kind: step}, {kind: linear}]", "optim.schedule[0].kind='step' is not one of cosine, linear"),
    ("[{until: 0.5, kind: constant, to: 1.0e-4}, {kind: linear}]", "optim.schedule[0].to=0.0001: a constant phase"),
    ("[{until: 60, kind: cosine}, {until: 0.5, kind: linear}, {kind: constant}]",
     "optim.schedule[1].until is step 50, not after optim.schedule[0].until (step 60) of the run's 100 steps"),
    ("[{until: 0.9, kind: cosine, too: 1}, {kind: linear}]", "unknown field config.optim.schedule[0].too"),
])
def test_bad_phases_are_named(schedule, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(None, BASE + ["--train.steps=100", "--optim.warmup_steps=0", f"--optim.schedule={schedule}"])
    assert message in str(error.value)


def test_no_weight_decay_on_norms():
    model = GPT(ModelConfig(**{**PRESETS["tiny"], "vocab_size": 64, "norm": "layernorm"}))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert opt.param_groups[1]["weight_decay"] == 0.0
