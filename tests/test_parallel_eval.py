"""Scoring multiple-choice tasks during training (`train.eval_tasks`) under pipeline and sequence
parallel layouts: the evaluation forward pads samples of any width to what the layout runs, and
the numbers equal a single process's."""
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_code.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from distributed_utils import run_distributed  # noqa: E402

LAYOUTS = {"pp2": ("--parallel.pipeline=2",), "tp2-sp": ("--parallel.tensor=2", "--parallel.sequence_parallel=true")}
WIDTH = 37
"""Tokens per sample of the odd batch: neither data.seq_length nor a multiple of T."""


def train_and_score(args: list[str]) -> dict:
    """One step with the tasks scored at its end, then the evaluation forward on 5 samples of
    WIDTH tokens (a batch that is no whole number of micro batches either)."""
    from megatron_code.training.trainer import Trainer

    trainer = Trainer(load_config(None, args))
    result = trainer.train()
    tokens = torch.stack([trainer.data.sources[0].valid[i]["tokens"][:WIDTH + 1] for i in range(5)])
    mask = torch.ones(5, WIDTH)
    mask[1, :20] = 0
    sums, counts = trainer.model.evaluate({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"tasks": {k: v for k, v in record.items() if k.startswith("task/")}, "loss": result.losses,
            "sums": sums.tolist(), "counts": counts.tolist()}


def _layouts(rank: int, world_size: int, runs: list[list[str]]) -> list[dict]:
    return [train_and_score(args) for args in runs]


@pytest.fixture(scope="module")
def task(eval_task_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "arithmetic_12.jsonl"
    path.write_text("".join((eval_task_dir / "arithmetic.jsonl").read_text().splitlines(True)[:12]))
    return path


def test_eval_tasks_under_pipeline_and_sequence_parallel_match_one_process(train_args, task, tmp_path):
    def args(name, *extra):
        return train_args(tmp_path / name, "--train.steps=1", "--optim.warmup_steps=0", "--train.eval_interval=1",
                          f"--train.eval_tasks=[{task}]",
                          *extra)
    reference = train_and_score(args("reference"))
    assert set(reference["tasks"]) == {f"task/arithmetic_12/{m}" for m in ("acc", "acc_norm", "acc_ppl")}
    runs = run_distributed(_layouts, world_size=2, timeout_s=300,
                           args=([args(name, *extra) for name, extra in LAYOUTS.items()],))[0]
    for name, run in zip(LAYOUTS, runs):
        assert run["tasks"] == reference["tasks"], name
        assert run["counts"] == reference["counts"], name
        torch.testing.assert_close(torch.tensor(run["loss"]), torch.tensor(reference["loss"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(run["sums"]), torch.tensor(reference["sums"]), rtol=1e-5, atol=0)
