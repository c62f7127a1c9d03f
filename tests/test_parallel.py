"""Parallel training on CPU ranks (gloo, one process per rank) against one process: every layout
trains the same (losses, gradient norms, parameters, validation), checkpoints load into other
layouts, and layouts that cannot run stop with a message before any work.

Ranks are expensive to start (each imports torch), so each spawned group trains several layouts
one after another; each layout is then checked by its own test.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_code.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_utils import run_distributed  # noqa: E402

STEPS = 5
RTOL = 1e-5


def record_batches(data) -> list[list[tuple]]:
    """Per step, (source, tokens) of every sample the data pipeline hands this rank to train on."""
    trained, next_step = [], data.next_step

    def recording():
        batch = next_step()
        trained.append([(int(s), tuple(t.tolist())) for micro in batch.micro_batches
                        for s, t in zip(micro["source"], micro["tokens"])])
        return batch
    data.next_step = recording
    return trained


def run_in_process(args: list[str]) -> dict:
    """Train, recording what each step trained on; then evaluate three held-out samples given
    alike to every rank (the evaluation forward other tools use: per-sample loss sums and token
    counts)."""
    from megatron_code.training.trainer import Trainer

    trainer = Trainer(load_config(None, args))
    trained = record_batches(trainer.data)
    result = trainer.train()
    valid = trainer.data.sources[0].valid
    batch = {k: torch.stack([valid[i][k] for i in range(3)]) for k in ("tokens", "labels", "loss_mask")}
    per_sample = torch.stack(trainer.model.evaluate(batch)).tolist()
    return {"losses": result.losses, "valid": result.valid_losses, "run_dir": str(result.run_dir),
            "per_sample": per_sample, "trained": trained}


def _train_runs(rank: int, world_size: int, runs: list[list[str]]) -> list[dict]:
    return [run_in_process(args) for args in runs]


def metric(run_dir, name: str) -> list[float]:
    return [json.loads(line)[name] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def model_at(run_dir, step: int) -> dict[str, torch.Tensor]:
    from megatron_code.training.checkpoint import load_model_state

    return load_model_state(Path(run_dir) / "checkpoints" / f"step_{step:07d}")


def assert_trains_like(run: dict, reference: dict, steps: int = STEPS) -> None:
    """Losses, gradient norms, validation losses and the evaluation forward's per-sample results
    within RTOL; each parameter after `steps` within RTOL in Frobenius norm. (Single elements can differ more: Adam divides by sqrt(v),
    which turns a rounding difference in a near-zero gradient into a visible one.)"""
    torch.testing.assert_close(torch.tensor(run["losses"][:steps]), torch.tensor(reference["losses"][:steps]),
                               rtol=RTOL, atol=0)
    for name in ("grad_norm", "loss/text", "loss/code"):
        torch.testing.assert_close(torch.tensor(metric(run["run_dir"], name)[:steps]),
                                   torch.tensor(metric(reference["run_dir"], name)[:steps]), rtol=RTOL, atol=0)
    if steps == STEPS:
        assert run["valid"].keys() == reference["valid"].keys() == {"text", "code"}
        for name, value in reference["valid"].items():
            assert run["valid"][name] == pytest.approx(value, rel=RTOL), name
        torch.testing.assert_close(torch.tensor(run["per_sample"]), torch.tensor(reference["per_sample"]),
                                   rtol=RTOL, atol=0)
    ours, theirs = model_at(run["run_dir"], steps), model_at(reference["run_dir"], steps)
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        assert ours[name].shape == expected.shape, name
        error = ((ours[name] - expected).norm() / expected.norm()).item()
        assert error < RTOL, f"{name}: relative difference {error:.2e}"


# ----------------------------------------------------------------------------------------------
# single-process references, built once

FOUR_LAYERS = ("--model.num_layers=4",)
FUSED_LOSS = ("--model.fused_linear_cross_entropy=true",)
DATA_MIX = "data mix"
"""The key of `data_mix`'s overrides."""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def data_mix(tiny_indexed, code_shards) -> tuple[str, ...]:
    """Data that changes under the run: text:code 2:1, then 1:3 from step 3, the code source
    made of two files drawn 3:1."""
    code = ", ".join(f"{{prefix: '{code_shards[n]}', weight: {w}}}" for n, w in (("large", 3), ("small", 1)))
    return (f"--data.sources=[{{name: text, prefix: '{tiny_indexed['text']}'}}, {{name: code, prefix: [{code}]}}]",
            "--data.schedule=[{start: 0, weights: {text: 2, code: 1}}, {start: 3, weights: {text: 1, code: 3}}]")


@pytest.fixture(scope="module")
def references(train_args, root, data_mix) -> dict[tuple | str, dict]:
    """One process, keyed by the model (or data) overrides the layouts share. The fused-loss run
    goes on to 8 steps with a checkpoint at 5: the reshard tests continue from there."""
    out = {}
    for key, extra in {(): (), FOUR_LAYERS: FOUR_LAYERS, DATA_MIX: data_mix,
                       FUSED_LOSS: FUSED_LOSS + ("--train.steps=8", "--checkpoint.interval=5")}.items():
        out[key] = run_in_process(train_args(root / f"reference{len(out)}", *extra))
    return out


# ----------------------------------------------------------------------------------------------
# two ranks: one spawned group trains every layout in turn

TWO_RANK_LAYOUTS = {
    # name: (model or data overrides shared with a reference, parallel overrides)
    "tp2-selective-ac": ((), ("--parallel.tensor=2", "--parallel.activation_checkpointing=selective")),
    "pp2-1f1b": ((), ("--parallel.pipeline=2", "--parallel.schedule=1f1b")),
    "pp2-interleaved-full-ac": (FOUR_LAYERS, ("--parallel.pipeline=2", "--parallel.schedule=interleaved_1f1b",
                                              "--parallel.virtual_stages=2", "--parallel.activation_checkpointing=full")),
    "pp2-zero-bubble-uneven": (FOUR_LAYERS, ("--parallel.pipeline=2", "--parallel.schedule=zero_bubble",
                                             "--parallel.layers_per_stage=[3, 1]")),
    "dp2": (DATA_MIX, ("--parallel.dp_shard=none",)),
    "dp2-zero2": ((), ("--parallel.dp_shard=zero2",)),
}


@pytest.fixture(scope="module")
def two_rank_runs(train_args, root, references, data_mix) -> dict[str, dict]:
    """Rank 0's results, with what each rank trained on as `trained_by_rank`."""
    runs = [train_args(root / name, *(data_mix if shared == DATA_MIX else shared), *parallel)
            for name, (shared, parallel) in TWO_RANK_LAYOUTS.items()]
    first, second = run_distributed(_train_runs, world_size=2, timeout_s=600, args=(runs,))
    for run, other in zip(first, second):
        run["trained_by_rank"] = [run["trained"], other["trained"]]
    return dict(zip(TWO_RANK_LAYOUTS, first))


@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS)
def test_two_rank_layout_trains_like_one_process(layout, two_rank_runs, references):
    assert_trains_like(two_rank_runs[layout], references[TWO_RANK_LAYOUTS[layout][0]])
    record = json.loads((Path(two_rank_runs[layout]["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert record["layout"] == {"tp2": "tp2-pp1-dp1", "pp2": "tp1-pp2-dp1", "dp2": "tp1-pp1-dp2"}[layout[:3]]


def test_data_parallel_ranks_train_on_disjoint_halves_of_the_global_batch(two_rank_runs, references):
    """Through the Trainer on 2 gloo ranks, across a schedule phase change and with a source of
    two files: each step rank 0 trains on the first half of the single-process run's global
    batch and rank 1 on the second; no sample twice; the same per-source metrics."""
    whole, ranks = references[DATA_MIX]["trained"], two_rank_runs["dp2"]["trained_by_rank"]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == STEPS
    for step, first, second in zip(whole, *ranks):
        assert len(first) == len(second) == 4 and first + second == step
    rows = [row for step in whole for _, row in step]
    assert len(set(rows)) == len(rows)
    code = [sum(source == 1 for source, _ in step) for step in whole]
    assert sum(code[:3]) == 8 and code[3:] == [6, 6]  # 24 samples at 2:1, then 16 at 1:3
    for name in ("samples/text", "samples/code", "weight/code"):
        assert metric(two_rank_runs["dp2"]["run_dir"], name) == metric(references[DATA_MIX]["run_dir"], name)


def test_stage_layout():
    from megatron_code.config import ParallelConfig
    from megatron_code.parallel.pipeline_parallel import local_stage_ids, stage_layers

    interleaved = ParallelConfig(pipeline=2, virtual_stages=2, schedule="interleaved_1f1b")
    assert stage_layers(8, interleaved) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [local_stage_ids(r, interleaved) for r in (0, 1)] == [[0, 2], [1, 3]]
    assert stage_layers(4, ParallelConfig(pipeline=2, layers_per_stage=[3, 1])) == [range(0, 3), range(3, 4)]


# ----------------------------------------------------------------------------------------------
# eight ranks: (T, P, DP) = (2, 2, 2) with ZeRO-3, sequence parallel and the fused loss; then its
# step-5 checkpoint resharded to (1, 2, 4) there and to (1, 1, 1) here

def _eight_rank_runs(rank: int, world_size: int, full: list[str], resharded: list[str]) -> list[dict]:
    return [run_in_process(full), run_in_process(resharded)]


@pytest.fixture(scope="module")
def eight_rank_runs(train_args, root, references) -> dict[str, dict]:
    base = FUSED_LOSS + ("--train.steps=8",)
    full = train_args(root / "tp2-pp2-dp2", *base, "--checkpoint.interval=5",
                      "--parallel.tensor=2", "--parallel.pipeline=2", "--parallel.dp_shard=zero3",
                      "--parallel.sequence_parallel=true")
    step5 = root / "tp2-pp2-dp2" / "checkpoints" / "step_0000005"
    resharded = train_args(root / "tp1-pp2-dp4", *base, "--parallel.pipeline=2",
                           f"--checkpoint.load={step5}")
    results = run_distributed(_eight_rank_runs, world_size=8, timeout_s=900, args=(full, resharded))[0]
    return {"tp2-pp2-dp2": results[0], "tp1-pp2-dp4": results[1], "step5": step5}


def test_tp_pp_dp_zero3_sequence_parallel_trains_like_one_process(eight_rank_runs, references):
    assert_trains_like(eight_rank_runs["tp2-pp2-dp2"], references[FUSED_LOSS])


def test_checkpoint_reshards_to_other_layouts(eight_rank_runs, references, train_args, root):
    """Saved under (2, 2, 2), loaded under (1, 2, 4) and (1, 1, 1): the 3 steps that follow
    match the run that kept its layout, and the single-process run."""
    continued = eight_rank_runs["tp2-pp2-dp2"]["losses"][STEPS:]
    single = run_in_process(train_args(root / "tp1-pp1-dp1", *FUSED_LOSS, "--train.steps=8",
                                       f"--checkpoint.load={eight_rank_runs['step5']}"))
    for run in (eight_rank_runs["tp1-pp2-dp4"], single):
        assert len(run["losses"]) == 3
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(continued), rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(single["losses"]), torch.tensor(references[FUSED_LOSS]["losses"][STEPS:]),
                               rtol=RTOL, atol=0)
    saved = json.loads((eight_rank_runs["step5"] / "trainer_state.json").read_text())
    assert saved["layout"] == "tp2-pp2-dp2" and saved["step"] == 5


# ----------------------------------------------------------------------------------------------
# one process: activation checkpointing, the per-source loss

def test_activation_checkpointing_gives_the_same_gradients(train_args, root):
    from megatron_code.training.loss import LossTotals
    from megatron_code.training.trainer import Trainer

    grads = {}
    for mode in ("none", "selective", "full"):
        trainer = Trainer(load_config(None, train_args(root / f"ac-{mode}",
                                                       f"--parallel.activation_checkpointing={mode}")))
        batches = trainer.data.next_step().micro_batches
        trainer.model.forward_backward(batches, LossTotals(2, torch.device("cpu")))
        grads[mode] = {name.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                       for name, p in trainer.model.parts[0].named_parameters()}
    assert grads["none"].keys() == grads["full"].keys() == grads["selective"].keys()
    for mode in ("selective", "full"):
        for name, grad in grads["none"].items():
            assert torch.equal(grads[mode][name], grad), (mode, name)


def test_per_source_training_loss(train_args, root, references):
    """The first step's loss per source against a float64 cross-entropy of the same samples with
    the same initial weights; the sources' token-weighted mean is the step's loss."""
    import torch.nn.functional as F

    from megatron_code.training.trainer import Trainer

    trainer = Trainer(load_config(None, train_args(root / "per-source")))
    micro_batches = trainer.data.next_step().micro_batches
    batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
    model = trainer.model.parts[0].double()
    logits = model(batch["tokens"], batch["position_ids"])
    losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(8, -1)
    first = json.loads((Path(references[()]["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    for index, name in enumerate(("text", "code")):
        expected = losses[batch["source"] == index].mean().item()
        assert first[f"loss/{name}"] == pytest.approx(expected, rel=1e-6), name
        assert first[f"samples/{name}"] == int((batch["source"] == index).sum())
    weighted = sum(first[f"loss/{n}"] * first[f"samples/{n}"] for n in ("text", "code")) / 8
    assert weighted == pytest.approx(first["loss"], rel=1e-9)


# ----------------------------------------------------------------------------------------------
# the command line under torchrun, through the launchers in examples/launch

LAUNCH = Path(__file__).resolve().parents[1] / "examples" / "launch"


def launch(script: str, env: dict, *args) -> "subprocess.CompletedProcess":
    import os
    import subprocess

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's torchrun
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": path, **env})


def test_torchrun_launchers(train_args, root):
    from distributed_utils import find_free_port

    out = root / "torchrun"
    done = launch("single_node.sh", {"NPROC_PER_NODE": "2"},
                  *train_args(out, "--train.steps=3", "--train.eval_interval=3", "--parallel.pipeline=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 3") == 1  # rank 0 prints
    assert (out / "checkpoints" / "step_0000003" / "trainer_state.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["layout"] == "tp1-pp2-dp1"
    assert "valid_loss/code" in records[-1]
    bad = launch("multi_node.sh", {"NNODES": "1", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(find_free_port())},
                 *train_args(root / "torchrun-bad", "--parallel.tensor=2", "--parallel.pipeline=2"))
    assert bad.returncode != 0
    assert "error: world size 2 is not divisible by parallel.tensor x parallel.pipeline = 2 x 2" in bad.stderr


# ----------------------------------------------------------------------------------------------
# layouts that cannot run: a message naming the field, before any work

BASE = ["--data.sources=[{name: text, prefix: /x/text}]", "--data.tokenizer=/x/spm.model", "--model.preset=tiny",
        "--data.seq_length=64", "--train.micro_batch_size=1", "--train.global_batch_size=8"]


@pytest.mark.parametrize("overrides, world_size, message", [
    (["--parallel.tensor=2", "--parallel.pipeline=2"], 6,
     "world size 6 is not divisible by parallel.tensor x parallel.pipeline = 2 x 2"),
    (["--parallel.tensor=3"], 3, "parallel.tensor=3 does not divide model.num_heads=4"),
    (["--parallel.tensor=4"], 4, "parallel.tensor=4 does not divide model.num_kv_heads=2"),
    (["--parallel.pipeline=2", "--parallel.virtual_stages=2", "--parallel.schedule=interleaved_1f1b"], 2,
     "model.num_layers=2 is not divisible by parallel.pipeline x parallel.virtual_stages = 2 x 2"),
    (["--parallel.pipeline=4", "--model.num_layers=4", "--train.micro_batch_size=4"], 4,
     "parallel.schedule=1f1b with 4 stages needs at least 4 micro batches per step; got 2 micro batches"),
    (["--parallel.pipeline=2", "--parallel.virtual_stages=2", "--parallel.schedule=interleaved_1f1b",
      "--model.num_layers=4", "--train.global_batch_size=5"], 2,
     "parallel.schedule=interleaved_1f1b with parallel.pipeline=2 needs the micro batches per step to be a "
     "multiple of 2; got 5 micro batches"),
    (["--train.global_batch_size=6"], 4,
     "train.global_batch_size=6 is not divisible by train.micro_batch_size x data-parallel size = 1 x 4"),
    (["--parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs parallel.tensor > 1"),
    (["--parallel.sequence_parallel=true", "--parallel.tensor=2", "--data.seq_length=63"], 2,
     "parallel.sequence_parallel=true needs data.seq_length=63 divisible by parallel.tensor=2"),
    (["--parallel.pipeline=2", "--parallel.layers_per_stage=[1, 2]"], 2,
     "parallel.layers_per_stage=[1, 2] sums to 3, not model.num_layers=2"),
    (["--parallel.dp_shard=zero1"], 1, "parallel.dp_shard='zero1' is not one of none, zero2, zero3"),
], ids=["world", "heads", "kv-heads", "layers", "1f1b-micro", "interleaved-micro", "global-batch",
        "sp-without-tp", "sp-seq-length", "layers-per-stage", "dp-shard"])
def test_bad_layouts_are_named(overrides, world_size, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + overrides).validate(world_size=world_size)
    assert message in str(err.value)
