"""The instruction-tuning recipes at paper scale, and the mini-study at its smallest size: every
arm trained from its recipe, evaluated and tabled; a second run reuses everything and continues
an interrupted arm exactly; a third, after a pretraining arm's recipe changed, trains that arm,
the arms tuned from it and their evaluations again. The study runs from the installed package
alone."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_code.config import load_config
from megatron_code.data.schedule import configured_schedule

SFT_RECIPES = sorted((Path(__file__).parent.parent / "examples" / "recipes" / "sft").glob("*.yaml"))
CODE_SHARE = {  # Ma et al.'s code share of the examples, per phase (of four, for the dynamic strategies)
    "ma_sft_nn": [0.0], "ma_sft_nc": [3 / 8], "ma_sft_cc": [3 / 8], "ma_sft_cc_uniform": [3 / 8] * 4,
    "ma_sft_cc_stepwise_increase": [0.3, 0.3, 0.4, 0.5], "ma_sft_cc_stepwise_decrease": [0.5, 0.4, 0.3, 0.3],
    "ma_sft_nn_13b": [0.0], "ma_sft_nc_13b": [3 / 8],
}
ZHANG_SHARES = (0, 50, 100)  # Zhang et al.'s three sets, each one source built by megatron_code.data.ift_mixtures


def test_one_recipe_per_instruction_tuning_arm():
    assert {p.stem for p in SFT_RECIPES} == {*CODE_SHARE, *(f"zhang_sft_code_{s}" for s in ZHANG_SHARES)}


@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=lambda p: p.stem)
def test_sft_recipe_at_paper_scale_and_tiny(recipe):
    config = load_config(recipe)
    assert config.train.stage == "sft" and config.checkpoint.init_from and config.train.epochs >= 1
    assert not config.data.pack  # one example per padded sequence, as the authors tuned
    if recipe.stem.startswith("ma_"):  # Ma et al.: PanGu 2.6B or 13B, cosine 2e-5 -> 1e-6, one epoch of 32 x 1024
        phases, _ = configured_schedule(config.data, 1000)
        assert [p.weights.get("code", 0.0) for p in phases] == pytest.approx(CODE_SHARE[recipe.stem])
        big = "13b" in recipe.stem
        assert (config.model.hidden_size, config.optim.lr, config.optim.min_lr) == (5120 if big else 2560, 2e-5, 1e-6)
        assert (config.train.epochs, config.train.global_batch_size, config.data.seq_length) == (1, 32, 1024)
        start = ("ma_code" if "_cc" in recipe.stem else "ma_nl") + ("_13b" if big else "")
        assert config.checkpoint.init_from.endswith(start)
    else:  # Zhang et al.: one set per arm, its share counted in conversations
        (source,) = config.data.sources
        assert source.prefix.endswith(f"code_{recipe.stem.rsplit('_', 1)[1]}")
    tiny = load_config(recipe, ["--model.preset=tiny", "--data.seq_length=64", "--train.epochs=0",
                                "--train.steps=40", "--train.global_batch_size=8", "--train.micro_batch_size=8",
                                "--optim.warmup_steps=4"])
    assert tiny.model.hidden_size == 64 and tiny.train.steps == 40


def test_the_study_needs_only_what_the_package_installs(tmp_path, monkeypatch):
    """setup.py ships the recipes as package data beside the modules, and the study, imported from
    that build alone, finds them there; it reads nothing from the quickstart or the checkout."""
    from megatron_code import study

    root = Path(__file__).parent.parent
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=root,
                   check=True, capture_output=True)
    shipped = tmp_path / "megatron_code" / "recipes"
    assert ({p.relative_to(shipped) for p in shipped.rglob("*.yaml")}
            == {p.relative_to(root / "examples" / "recipes") for p in (root / "examples" / "recipes").rglob("*.yaml")})
    names = [*study.PRETRAIN_ARMS.values(), *(recipe for recipe, _ in study.TUNE_ARMS.values())]
    found = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
         f"from megatron_code.study import recipe_file; print([str(recipe_file(n)) for n in {names!r}])"],
        cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert json.loads(found.replace("'", '"')) == [str(shipped / f"{n}.yaml") for n in names]

    tree = ast.parse(Path(study.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "megatron_code.quickstart" not in imported and "importlib.util" not in imported
    assert "__file__" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    monkeypatch.setattr(study, "RECIPES", "megatron_code.not_installed")
    with pytest.raises(SystemExit, match="the recipes are not installed .* reinstall megatron_code"):
        study.recipe_file("ma_nl")


def test_a_stage_that_cannot_import_stops_the_study_before_any_work(tmp_path):
    """As when the checkout's kernels/ shadowed PyPI's `kernels`: transformers, which only the
    evaluation needs, fails to import. The study stops at start-up naming the stage and the module,
    and builds nothing (it used to build the data and train all 7 arms, then die at evaluation)."""
    broken = tmp_path / "site" / "transformers"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError(\"cannot import name 'CUDAProperties' from 'kernels'\")\n")
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "megatron_code.study", "--name", "code_stage", "--size", "ci",
                           "--out", str(out), "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 1 and done.stdout == "", done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "error: the study's evaluation stage needs transformers.LlamaForCausalLM, which does not import here "
        "(ImportError: cannot import name 'CUDAProperties' from 'kernels'); stopped before any work"]
    assert not out.exists()


def test_every_import_of_the_study_is_checked_at_start_up():
    """The start-up check covers every module a stage of the study imports on its way."""
    from megatron_code import study

    checked = {need.partition(":")[0] for needs in study.STAGE_IMPORTS.values() for need in needs}
    tree = ast.parse(Path(study.__file__).read_text())
    lazy = set()
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name != "check_stages"):
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom):
                lazy.add(node.module)
            elif isinstance(node, ast.Import):
                lazy.update(alias.name for alias in node.names)
    assert {"megatron_code.training.trainer", "megatron_code.evaluation.lm", "matplotlib"} <= lazy
    assert not {m for m in lazy if not any(c == m or c.startswith(m + ".") for c in checked)}


def test_a_run_that_cannot_start_stops_before_building_anything(tmp_path, monkeypatch):
    """A device that is not there, or an arm whose overridden recipe does not validate, stops the
    study before the corpus, tokenizer or any arm is built."""
    import torch

    from megatron_code import study

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match="train.device=cuda but no CUDA device is visible.*stopped before any work"):
        study.run(["--name", "code_stage", "--size", "ci", "--out", str(out), "--no-progress", "--device", "cuda"])
    assert not out.exists()
    recipes = tmp_path / "recipes"
    shutil.copytree(study.recipe_file("ma_nl").parent, recipes)
    (recipes / "sft" / "ma_sft_cc.yaml").write_text((recipes / "sft" / "ma_sft_cc.yaml").read_text()
                                                   .replace("schedule: cosine", "schedule: cosine_typo"))
    monkeypatch.setattr(study, "recipe_file", lambda name: recipes / f"{name}.yaml")
    with pytest.raises(SystemExit, match=r"arm CC \(.*ma_sft_cc.yaml\): .*optim.schedule.*stopped before any work"):
        study.run(["--name", "code_stage", "--size", "ci", "--out", str(out), "--no-progress"])
    assert not out.exists()


def test_the_mini_study_runs_every_arm_and_resumes_an_interrupted_one(tmp_path, capsys, monkeypatch):
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
        cells = [line.split(" | ") for line in lines[2:] if line.startswith("|")]
        assert "Scores are fractions from 0 to 1 (accuracies, pass@1, and BLEU divided by 100)." in lines
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

    # The NL arm's recipe changes (less weight decay): NL trains again from the start, then NN and NC
    # from its new checkpoint, and those three are evaluated again; the CODE side is reused.
    recipes = tmp_path / "recipes"
    shutil.copytree(study.recipe_file("ma_nl").parent, recipes)
    text = (recipes / "ma_nl.yaml").read_text()
    (recipes / "ma_nl.yaml").write_text(text.replace("weight_decay: 0.1\n", "weight_decay: 0.05\n"))
    monkeypatch.setattr(study, "recipe_file", lambda name: recipes / f"{name}.yaml")
    tuned_before = {arm: study.checkpoint_digest(tmp_path / "tune" / arm) for arm in study.TUNE_ARMS}
    study.run(argv)
    out = capsys.readouterr().out
    assert f"NL: its config changed since {tmp_path / 'pretrain' / 'NL'} was trained" in out
    assert json.loads((tmp_path / "pretrain" / "NL" / "config.json").read_text())["optim"]["weight_decay"] == 0.05
    for arm in ("NN", "NC"):
        assert f"{arm}: its base checkpoint changed since" in out
        assert study.checkpoint_digest(tmp_path / "tune" / arm) != tuned_before[arm]
    for arm in ("NL", "NN", "NC"):
        assert f"{arm}: evaluated" not in out
        marker = json.loads((tmp_path / "eval" / f"{arm}.stage.json").read_text())
        run_dir = tmp_path / ("pretrain" if arm == "NL" else "tune") / arm
        assert marker["inputs"]["checkpoint"] == study.checkpoint_digest(run_dir)
    for arm in ("CODE", "CC", "CC_stepwise_increase", "CC_stepwise_decrease"):
        assert f"{arm}: trained" in out and f"{arm}: evaluated" in out
        if arm != "CODE":
            assert study.checkpoint_digest(tmp_path / "tune" / arm) == tuned_before[arm]
