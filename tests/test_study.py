"""The instruction-tuning recipes at paper scale, and the mini-study at its smallest size: every
arm trained from its recipe, evaluated and tabled; a second run reuses everything and continues
an interrupted arm exactly."""
import json
import shutil
from pathlib import Path

import pytest

from megatron_code.config import load_config
from megatron_code.data.schedule import configured_schedule

SFT_RECIPES = sorted((Path(__file__).parent.parent / "examples" / "recipes" / "sft").glob("*.yaml"))
CODE_SHARE = {  # per phase of four
    "ma_sft_nn": [0.0], "ma_sft_nc": [3 / 8] * 4, "ma_sft_cc": [3 / 8] * 4,
    "ma_sft_cc_stepwise_increase": [0.3, 0.3, 0.4, 0.5], "ma_sft_cc_stepwise_decrease": [0.5, 0.4, 0.3, 0.3],
    "zhang_sft_code_0": [0.0], "zhang_sft_code_25": [0.25], "zhang_sft_code_50": [0.5], "zhang_sft_code_100": [1.0],
}


def test_one_recipe_per_instruction_tuning_arm():
    assert {p.stem for p in SFT_RECIPES} == set(CODE_SHARE)


@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=lambda p: p.stem)
def test_sft_recipe_at_paper_scale_and_tiny(recipe):
    config = load_config(recipe)
    phases, _ = configured_schedule(config.data, 1000)
    assert [p.weights.get("code", 0.0) for p in phases] == pytest.approx(CODE_SHARE[recipe.stem])
    assert config.train.stage == "sft" and config.checkpoint.init_from and config.train.epochs >= 1
    if recipe.stem.startswith("ma_"):  # Ma et al.: PanGu 2.6B, cosine 2e-5 -> 1e-6, one epoch of 32 x 1024
        assert (config.model.hidden_size, config.optim.lr, config.optim.min_lr) == (2560, 2e-5, 1e-6)
        assert (config.train.epochs, config.train.global_batch_size, config.data.seq_length) == (1, 32, 1024)
        assert config.checkpoint.init_from.endswith("ma_code" if "_cc" in recipe.stem else "ma_nl")
    tiny = load_config(recipe, ["--model.preset=tiny", "--data.seq_length=64", "--train.epochs=0",
                                "--train.steps=40", "--train.global_batch_size=8", "--train.micro_batch_size=8"])
    assert tiny.model.hidden_size == 64 and tiny.train.steps == 40


def test_the_mini_study_runs_every_arm_and_resumes_an_interrupted_one(tmp_path, capsys):
    from megatron_code import study

    argv = ["--name", "code_stage", "--size", "ci", "--out", str(tmp_path), "--no-progress"]
    first = study.run(argv)
    arms = [*study.PRETRAIN_ARMS, *study.TUNE_ARMS]
    assert "Tiny-scale numbers" in first["report"]
    # pretrained arms get raw prompts, tuned arms their chat template; each table holds one format
    for group, prompt in (("pretrained", "raw"), ("tuned", "chat:role_tokens")):
        lines = first["tables"][group].splitlines()
        group_arms = study.PRETRAIN_ARMS if group == "pretrained" else study.TUNE_ARMS
        assert all(f"| {arm}@" in lines[0] for arm in group_arms) and len(lines[0].split(" | ")) == 3 + 2 * len(
            group_arms) and not any(line.startswith("Note:") for line in lines)
        cells = [line.split(" | ") for line in lines[2:]]
        assert {("| arithmetic", "acc_ppl"), ("| logic", "acc"), ("| python_functions", "pass@1"),
                ("| python_functions", "bleu")} <= {tuple(c[:2]) for c in cells}
        assert {c[3] for c in cells} == {prompt}
        for arm in group_arms:
            assert json.loads(first["results"][arm].read_text())["prompt_format"] == prompt
    for plot in first["plots"]:
        assert plot.is_file() and (plot.suffix != ".png" or plot.read_bytes()[:4] == b"\x89PNG")
    for arm, (recipe, base) in study.TUNE_ARMS.items():  # tuned from its pretrained arm's weights
        config = json.loads((tmp_path / "tune" / arm / "config.json").read_text())
        assert config["checkpoint"]["init_from"] == str(tmp_path / "pretrain" / base)
        assert config["train"]["stage"] == "sft"
    mixture = [json.loads(line)["weight/code"] for line in
               (tmp_path / "tune" / "CC_stepwise_increase" / "metrics.jsonl").read_text().splitlines()]
    assert mixture[0] == pytest.approx(0.3) and mixture[-1] == pytest.approx(0.5)

    # Interrupt one arm after its first checkpoint: the second run continues it, and its
    # evaluation comes out as the uninterrupted run's; everything else is reused.
    interrupted = tmp_path / "tune" / "CC_stepwise_increase" / "checkpoints"
    saved = sorted(p for p in interrupted.iterdir() if p.name.startswith("step_"))
    assert len(saved) == 2
    shutil.rmtree(saved[-1])
    (interrupted / "latest").write_text(saved[0].name)
    before = json.loads(first["results"]["CC_stepwise_increase"].read_text())
    capsys.readouterr()
    second = study.run(argv)
    out = capsys.readouterr().out
    assert f"CC_stepwise_increase: resuming from step {saved[0].name.split('_')[1].lstrip('0')}" in out
    assert all(f"{arm}: trained" in out for arm in arms if arm != "CC_stepwise_increase")
    assert all(f"{arm}: evaluated" in out for arm in arms if arm != "CC_stepwise_increase")
    after = json.loads(second["results"]["CC_stepwise_increase"].read_text())
    assert after["items"] == before["items"] and after["step"] == before["step"]
    assert second["tables"] == first["tables"]
