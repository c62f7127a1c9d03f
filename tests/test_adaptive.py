"""Online mixing (Online Data Mixing, Albalak et al. 2023): the update against the published rule
computed here in float64; on CPU, `[{start: 0, adaptive: {every: 5}}]` moves the weights over 40
steps, two data-parallel ranks get exactly the single process's weights, samples and losses, and a
kill -9 plus resume is bit-identical, weights included."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_code.config import load_config
from megatron_code.data.adaptive import GRID, OnlineDataMixing, on_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_utils import run_distributed  # noqa: E402
from subprocess_training import records, train, train_and_kill  # noqa: E402

ADAPTIVE = "--data.schedule=[{start: 0, adaptive: {every: 5}}]"


def odm_reference(prior: dict, windows: list[list[dict]], smoothing: float, min_weight: float) -> list[np.ndarray]:
    """ODM's weights after each update, in float64: eps_t = min(1/K, sqrt(ln K / (K t))); the
    reward estimate moves to each window's mean loss over the weight in force by
    (1 - smoothing); weights are (1 - K u) prior exp(eps_{t-1} R) / sum + u with
    u = max(eps_t, min_weight). The weights in force are on the grid: multiples of 1 / GRID by
    largest remainder."""
    names = list(prior)
    base = np.array([prior[n] for n in names], dtype=np.float64)
    base /= base.sum()

    def grid(w):
        units = np.floor(w * GRID)
        units[np.argsort(-(w * GRID - units), kind="stable")[: GRID - int(units.sum())]] += 1
        return units / GRID

    k, estimate, out, in_force = len(names), np.zeros(len(names)), [], grid(base)

    def eps(t):
        return 1 / k if t == 0 else min(1 / k, math.sqrt(math.log(k) / (k * t)))

    for t, window in enumerate(windows, start=1):
        for d, name in enumerate(names):
            seen = [losses[name] for losses in window if name in losses]
            if seen:
                estimate[d] = smoothing * estimate[d] + (1 - smoothing) * np.mean(seen) / in_force[d]
        gibbs = base * np.exp(eps(t - 1) * estimate)
        u = max(eps(t), min_weight)
        out.append((1 - k * u) * gibbs / gibbs.sum() + u)
        in_force = grid(out[-1])
    return out


@pytest.mark.parametrize("smoothing, min_weight", [(0.9, 0.0), (0.5, 0.2), (0.0, 0.05)])
def test_the_update_is_the_published_rule_on_a_grid(smoothing, min_weight):
    """Three sources, code's loss highest: after each window of 4 steps (math missing from some
    steps) the weights are the reference's rounded to multiples of 1e-4 that sum to exactly 1."""
    rng = np.random.default_rng(0)
    prior = {"text": 5, "code": 3, "math": 2}
    windows = [[{"text": 3 + rng.random(), "code": 5 + rng.random(), **({"math": 4.0} if s % 2 else {})}
                for s in range(4)] for _ in range(12)]
    mixer = OnlineDataMixing({n: w / 10 for n, w in prior.items()}, smoothing, min_weight)
    assert mixer.weights == {"text": 0.5, "code": 0.3, "math": 0.2}
    for window, expected in zip(windows, odm_reference(prior, windows, smoothing, min_weight)):
        for losses in window:
            mixer.observe(losses)
        got = mixer.update()
        units = {n: round(w * GRID) for n, w in got.items()}
        assert all(units[n] / GRID == w for n, w in got.items()) and sum(units.values()) == GRID
        assert np.abs(np.array(list(got.values())) - expected).max() <= 1 / GRID
        assert min(got.values()) >= min_weight - 1 / GRID
    assert got["code"] > got["text"]  # the source the model finds hardest gets the most
    resumed = OnlineDataMixing({n: w / 10 for n, w in prior.items()}, smoothing, min_weight)
    resumed.load_state_dict(json.loads(json.dumps(mixer.state_dict())))
    for mixer_ in (mixer, resumed):
        mixer_.observe({"text": 1.0, "code": 2.0})
    assert resumed.update() == mixer.update()


def test_on_grid_keeps_the_sum_and_moves_each_weight_by_less_than_a_step():
    rng = np.random.default_rng(1)
    for _ in range(200):
        w = rng.random(int(rng.integers(2, 9)))
        w /= w.sum()
        got = on_grid({f"s{i}": float(x) for i, x in enumerate(w)})
        assert sum(round(v * GRID) for v in got.values()) == GRID
        assert np.abs(np.array(list(got.values())) - w).max() < 1 / GRID


def adaptive_args(train_args, out_dir) -> list[str]:
    return train_args(out_dir, ADAPTIVE, "--train.steps=40", "--train.micro_batch_size=4", "--train.eval_interval=0",
                      "--train.log_interval=40", "--checkpoint.interval=10")


def weights_of(run_records: list[dict]) -> list[tuple]:
    return [(r["weight/text"], r["weight/code"]) for r in run_records if "event" not in r]


def _train_and_record(rank: int, world_size: int, args: list[str]) -> dict:
    from megatron_code.training.trainer import Trainer

    trainer = Trainer(load_config(None, args))
    trained, next_step = [], trainer.data.next_step

    def recording():
        batch = next_step()
        trained.append([(int(s), tuple(t.tolist())) for micro in batch.micro_batches
                        for s, t in zip(micro["source"], micro["tokens"])])
        return batch
    trainer.data.next_step = recording
    result = trainer.train()
    return {"losses": result.losses, "trained": trained, "adaptive": trainer.data.state_dict()["adaptive"]}


@pytest.fixture(scope="module")
def single(train_args, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("adaptive") / "single"
    return {**_train_and_record(0, 1, adaptive_args(train_args, out)), "run_dir": out}


def test_adaptive_weights_move_over_40_steps(single):
    """The prior (data.sources' 2:1, on the grid) until step 5, then a new grid point at every
    5th step; each step's samples follow the weights in force within half a sample per update
    segment."""
    run = records(single["run_dir"])
    weights = weights_of(run)
    assert len(weights) == 40 and weights[:5] == [(0.6667, 0.3333)] * 5
    segments = [weights[i: i + 5] for i in range(0, 40, 5)]
    assert all(len(set(segment)) == 1 for segment in segments)  # constant between updates
    assert len({segment[0] for segment in segments}) >= 5  # and moved at the updates
    assert all(round(w * GRID) / GRID == w for segment in segments[1:] for w in segment[0])
    assert single["adaptive"]["updates"] == 7
    for i, segment in enumerate(segments):
        code = np.cumsum([r["samples/code"] for r in run[5 * i: 5 * i + 5]])
        assert np.abs(code - 8 * segment[0][1] * np.arange(1, 6)).max() <= 0.5


def test_two_data_parallel_ranks_get_the_single_process_weights_samples_and_losses(single, train_args, tmp_path):
    out = tmp_path / "dp2"
    ranks = run_distributed(_train_and_record, world_size=2, timeout_s=600, args=(adaptive_args(train_args, out),))
    assert weights_of(records(out)) == weights_of(records(single["run_dir"]))
    assert ranks[0]["adaptive"] == ranks[1]["adaptive"]
    assert ranks[0]["adaptive"]["weights"] == single["adaptive"]["weights"]
    for step, (a, b) in enumerate(zip(ranks[0]["trained"], ranks[1]["trained"])):
        assert a + b == single["trained"][step], step
    # each rank's micro batch is one of the single process's, and a sum of two gradients does not
    # depend on its order: the losses are the single process's to the bit
    assert ranks[0]["losses"] == ranks[1]["losses"] == single["losses"]


def test_a_kill_9_and_resume_is_bit_identical_weights_included(single, train_args, tmp_path):
    """The uninterrupted run vs one killed at step 12 (after the checkpoint of step 10) and
    launched again, both as a user runs them: every record (loss, per-source losses, weights,
    samples) and the final checkpoint's data state (the adaptive state included) and model
    weights are equal."""
    from megatron_code.training.checkpoint import load_model_state

    killed, whole = tmp_path / "killed", single["run_dir"]
    train_and_kill(adaptive_args(train_args, killed), killed, at_step=12)
    assert (killed / "checkpoints" / "latest").read_text() == "step_0000010"
    assert max(r["step"] for r in records(killed)) >= 12  # steps past the checkpoint, trained again below
    train(adaptive_args(train_args, killed))
    assert records(killed) == records(whole)
    states = [json.loads((d / "checkpoints" / "step_0000040" / "trainer_state.json").read_text())["data"]
              for d in (killed, whole)]
    assert states[0] == states[1] and states[0]["adaptive"]["updates"] == 7
    ours, theirs = (load_model_state(d / "checkpoints" / "step_0000040") for d in (killed, whole))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
