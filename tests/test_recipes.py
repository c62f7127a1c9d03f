"""The experiment recipes: every one parses and validates at paper scale, and one runs shrunk to
the tiny model on real data with its schedule's phases in the metrics."""
import json
from pathlib import Path

import pytest

from megatron_code.config import load_config
from megatron_code.data.schedule import configured_schedule

RECIPES = sorted((Path(__file__).parent.parent / "examples" / "recipes").glob("*.yaml"))
TINY = ["--model.preset=tiny", "--data.seq_length=128", "--train.steps=60", "--train.global_batch_size=8",
        "--train.micro_batch_size=8", "--optim.warmup_steps=6", "--train.eval_interval=30"]


def test_one_recipe_per_pretraining_arm():
    names = {p.stem for p in RECIPES}
    assert names == {"ma_nl", "ma_code", "ma_uniform", "ma_stepwise_increase", "ma_stepwise_decrease",
                     "adaptive_code", *(f"cohere_code_{s}" for s in (0, 25, 50, 75, 90, 100)), "cohere_balanced_then_text",
                     "cohere_code_then_text", "cohere_cooldown_with_code", "cohere_cooldown_without_code"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_at_paper_scale_and_tiny(recipe):
    config = load_config(recipe)
    phases, _ = configured_schedule(config.data, config.train.steps)
    tokens = config.train.steps * config.train.global_batch_size * config.data.seq_length
    budget = (42 if recipe.stem.startswith(("ma_", "adaptive")) else 200 if recipe.stem.split("_")[-1].isdigit()
              else 400)
    assert tokens / 1e9 == pytest.approx(budget, rel=0.01)  # billions of tokens, as in the papers
    if "cooldown" in recipe.stem:  # the last 10% of tokens, 20% or 0% code
        assert phases[-1].start == round(0.9 * config.train.steps)
        assert phases[-1].weights.get("code", 0) == (0.2 if "with_code" in recipe.stem else 0)
    tiny = load_config(recipe, TINY)
    assert tiny.model.hidden_size == 64


def test_a_recipe_runs_tiny_on_real_data(tiny_corpus, tiny_indexed, tmp_path):
    from megatron_code.training.trainer import Trainer

    sources = ", ".join(f"{{name: {n}, prefix: '{p}'}}" for n, p in tiny_indexed.items())
    config = load_config(RECIPES[0].parent / "ma_stepwise_increase.yaml",
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
