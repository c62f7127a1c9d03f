"""The pretraining recipes: every one parses and validates at paper scale and shrunk; the
continued runs and cooldowns continue the recipes the papers continue; one runs shrunk to the
tiny model on real data with its schedule's phases in the metrics; the cooldown chain runs at
tiny scale from its starting checkpoints with the LR plan printed; a recipe whose warmup exceeds
its run stops with one line."""
import json
from pathlib import Path

import pytest

from megatron_code.config import load_config
from megatron_code.data.schedule import configured_schedule

FOLDER = Path(__file__).parent.parent / "examples" / "recipes"
RECIPES = sorted([*FOLDER.glob("*.yaml"), *FOLDER.glob("cohere_2.8b/*.yaml"), *FOLDER.glob("extensions/*.yaml")])
TINY = ["--model.preset=tiny", "--data.seq_length=128", "--train.steps=60", "--train.global_batch_size=8",
        "--train.micro_batch_size=8", "--optim.warmup_steps=6", "--train.eval_interval=30"]
PAPER_ARMS = {"ma_nl", "ma_code", "ma_nl_13b", *(f"cohere_code_{s}" for s in (0, 25, 50, 75, 90, 100)),
              "cohere_text_400b", "cohere_balanced_400b", "cohere_balanced_to_text", "cohere_code_to_text",
              "cohere_cooldown_with_code", "cohere_cooldown_without_code",
              *(f"cohere_2.8b/cohere_{n}" for n in ("code_50", "code_100", "text_400b", "balanced_400b",
                                                     "balanced_to_text", "code_to_text"))}
# billions of tokens of each run (a continued run: its own tokens, after its starting checkpoint's)
BUDGET = {"ma": 42, "code": 200, "400b": 400, "to_text": 200, "cooldown": 40}


def name(path: Path) -> str:
    return str(path.relative_to(FOLDER).with_suffix(""))


def test_one_recipe_per_pretraining_arm_and_our_extensions_apart():
    assert {name(p) for p in RECIPES if not name(p).startswith("extensions/")} == PAPER_ARMS
    assert {name(p) for p in RECIPES if name(p).startswith("extensions/")} == {
        "extensions/adaptive_code",
        *(f"extensions/ma_{s}" for s in ("uniform", "stepwise_increase", "stepwise_decrease"))}
    for path in RECIPES:
        header = path.read_text().split("\nmodel:")[0]
        assert "Unit: samples of" in header, path  # each recipe says what its weights count
        assert ("Ours, not a paper arm" in header) == name(path).startswith("extensions/"), path


@pytest.mark.parametrize("recipe", RECIPES, ids=name)
def test_recipe_validates_at_paper_scale_and_tiny(recipe):
    config = load_config(recipe)
    phases, _ = configured_schedule(config.data, config.train.steps)
    tokens = config.train.steps * config.train.global_batch_size * config.data.seq_length
    stem = recipe.stem
    kind = ("ma" if stem.startswith(("ma_", "adaptive"))
            else next(k for k in ("cooldown", "to_text", "400b", "code") if k in stem))
    assert tokens / 1e9 == pytest.approx(BUDGET[kind], rel=0.01)
    assert config.model.preset == ("2.8b" if "2.8b" in str(recipe) else "13b-pangu" if "13b" in stem
                                   else "470m" if stem.startswith("cohere") else "2.6b-pangu")
    starts_from = config.checkpoint.continue_from
    if kind in ("to_text", "cooldown"):  # continued runs start from the recipe the paper continues
        start = {"balanced_to_text": "code_50", "code_to_text": "code_100"}.get(stem.removeprefix("cohere_"),
                                                                                "balanced_to_text")
        folder = recipe.parent
        assert starts_from == load_config(folder / f"cohere_{start}.yaml").train.output_dir
        share = {"to_text": 0.1, "cooldown": 0.2 if "with_code" in stem else 0.0}[kind]
        assert [p.weights.get("code", 0) for p in phases] == [pytest.approx(share)]
    else:
        assert not starts_from and not config.checkpoint.init_from
    if kind == "cooldown":  # linear to 1e-6, from the LR the starting run ended at, without warmup
        start = load_config(recipe.parent / "cohere_balanced_to_text.yaml").optim
        assert (config.optim.schedule, config.optim.min_lr, config.optim.warmup_steps) == ("linear", 1e-6, 0)
        assert config.optim.lr == start.min_lr
    tiny = load_config(recipe, TINY)
    assert tiny.model.hidden_size == 64


def test_a_recipe_runs_tiny_on_real_data(tiny_corpus, tiny_indexed, tmp_path):
    from megatron_code.training.trainer import Trainer

    sources = ", ".join(f"{{name: {n}, prefix: '{p}'}}" for n, p in tiny_indexed.items())
    config = load_config(FOLDER / "extensions" / "ma_stepwise_increase.yaml",
                         [*TINY, "--data.seq_length=64", "--train.steps=8", "--train.eval_interval=8",
                          "--train.progress=false", f"--data.sources=[{sources}]", "--data.split=80,20,0",
                          f"--data.tokenizer={tiny_corpus.tokenizer}", f"--train.output_dir={tmp_path}"])
    result = Trainer(config).train()
    assert result.step == 8 and set(result.valid_losses) == {"text", "code"}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["weight/code"] for r in lines] == pytest.approx([0.3] * 4 + [0.4] * 2 + [0.5] * 2)
    assert [r["samples/code"] for r in lines[-2:]] == [4, 4] and all("loss/code" in r for r in lines)

    from megatron_code.training.plots import plot_runs
    written = plot_runs([tmp_path], tmp_path / "plots")
    for png in written[:3]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = written[3].read_text()
    tokens = ", ".join(f"{k} {v:,}" for k, v in result.tokens_per_source.items())
    assert f"| {tmp_path} | 8 | {tokens} | {result.losses[0]:.3f} -> {result.losses[-1]:.3f} |" in summary
    assert "- from step 6: text 0.500, code 0.500" in summary


def test_the_cooldown_chain_runs_tiny_from_its_starting_checkpoints(tiny_corpus, tiny_indexed, tmp_path, capsys):
    """Aryabumi et al.'s cooldown as the recipes chain it, shrunk: the balanced initialization
    (cohere_code_50), balanced->text continuing it, then both cooldowns continuing that; each
    continued run counts its steps on from its start, prints its LR plan and mixes its own share."""
    from megatron_code.training.trainer import Trainer

    shrink = [*TINY, "--data.seq_length=64", "--train.eval_interval=0", "--train.progress=false",
              "--data.split=80,20,0", f"--data.tokenizer={tiny_corpus.tokenizer}",
              f"--data.cache_dir={tmp_path / 'cache'}"]

    def run(recipe, steps, warmup, start=None):
        out = tmp_path / recipe
        weights = {s.name: s.weight for s in load_config(FOLDER / f"{recipe}.yaml").data.sources}
        sources = ", ".join(f"{{name: {n}, prefix: '{p}', weight: {weights[n]}}}" for n, p in tiny_indexed.items())
        overrides = [*shrink, f"--data.sources=[{sources}]", f"--train.steps={steps}",
                     f"--optim.warmup_steps={warmup}", f"--train.output_dir={out}"]
        capsys.readouterr()
        result = Trainer(load_config(FOLDER / f"{recipe}.yaml", overrides + (
            [f"--checkpoint.continue_from={start}"] if start else []))).train()
        printed = capsys.readouterr().out
        return result, printed, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    init, _, _ = run("cohere_code_50", 8, 2)
    balanced, printed, logged = run("cohere_balanced_to_text", 8, 2, tmp_path / "cohere_code_50")  # a run folder
    assert f"continuing from {init.checkpoint} at step 8" in printed
    assert "learning rate over steps 8..15: 0.00015 at step 8, 0.0003 at step 9 (end of warmup), 3e-05 at step 15 " \
           "(end of cosine)" in printed
    assert [r["step"] for r in logged] == list(range(9, 17)) and balanced.step == 16
    assert [r["weight/code"] for r in logged] == pytest.approx([0.1] * 8)
    for recipe, share in (("cohere_cooldown_with_code", 0.2), ("cohere_cooldown_without_code", 0.0)):
        cooled, printed, logged = run(recipe, 4, 0, balanced.checkpoint)
        assert f"continuing from {balanced.checkpoint} at step 16" in printed and "its last LR 3e-05" in printed
        first_lr = 3e-5 + (1e-6 - 3e-5) / 4
        assert f"learning rate over steps 16..19: {first_lr:.3g} at step 16, 1e-06 at step 19 (end of linear)" in printed
        assert [r["step"] for r in logged] == [17, 18, 19, 20] and cooled.checkpoint.name == "step_0000020"
        assert [r["lr"] for r in logged] == pytest.approx([3e-5 + (1e-6 - 3e-5) * k / 4 for k in (1, 2, 3, 4)])
        assert [r["weight/code"] for r in logged] == pytest.approx([share] * 4)
        assert sum(r["samples/code"] for r in logged) == round(share * 4 * 8)


def test_a_recipe_whose_warmup_exceeds_its_run_stops_with_one_line(capsys):
    from megatron_code import train

    with pytest.raises(SystemExit) as stop:
        train.main(["--config", str(FOLDER / "cohere_code_25.yaml"), "--model.preset=tiny", "--data.seq_length=128",
                    "--train.steps=60"])
    message = str(stop.value.code)
    assert message == ("error: override --train.steps=60: optim.warmup_steps=1325 is longer than the run's 60 steps "
                       "(train.steps): the LR never reaches optim.lr=0.0003 and never decays (shorten the warmup, "
                       "lengthen the run, or set optim.allow_incomplete_schedule=true to run it anyway)")
