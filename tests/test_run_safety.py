"""Run safety: a NaN or infinity never trains nor reaches a checkpoint, pre-emption saves and exits
0 and resumes as if uninterrupted, validation never hangs under FSDP, and a step makes one
device-to-host sync. Multi-rank checks run on 2 gloo ranks, with the fault on one rank only."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_code.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_utils import run_distributed  # noqa: E402


FAST = ("--train.steps=4", "--train.micro_batch_size=4", "--train.eval_interval=0")
"""One process: 4 steps of 2 micro batches, no validation."""


def build(args):
    from megatron_code.training.trainer import Trainer

    return Trainer(load_config(None, args))


def command_env() -> dict[str, str]:
    """This environment without the rank variables an in-process run left in it: a command must
    start as a single process of its own, not join this one's process group."""
    return {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def local_state(trainer) -> dict[str, torch.Tensor]:
    """This rank's shards of the weights and of the optimizer's state (moments and step counts;
    the param groups' learning rate is set from the schedule before every step, so it is left out)."""
    from megatron_code.parallel.tensor_parallel import local

    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    state.update({f"optimizer.{k}": v for k, v in trainer.optimizer.state_dict().items() if k.startswith("state.")})
    return {k: local(v).detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def instrument(trainer, poison: dict[int, list[str]] = None, spike: dict[int, float] = None,
               signal_at: int | None = None, wall_at: int | None = None) -> dict:
    """Wrap the trainer's step: after the backward of step s, an infinity in the gradient of each
    parameter named in poison[s] that this rank holds, `spike[s]` added to the loss of each
    token, SIGUSR1 sent to this process (at `signal_at`), or its wall time up (at `wall_at`).
    Returns what it records: the states after each step, the batches each step trained on, the
    guard's verdicts."""
    from megatron_code.parallel.tensor_parallel import local

    seen = {"states": {trainer.step: local_state(trainer)}, "batches": [], "applied": {}}
    forward_backward, train_step, next_step = (trainer.model.forward_backward, trainer.train_step,
                                               trainer.data.next_step)

    def faulty_forward_backward(micro_batches, totals):
        forward_backward(micro_batches, totals)
        step = trainer.step + 1
        for part in trainer.model.parts:
            for name, p in part.named_parameters():
                if name in (poison or {}).get(step, ()) and p.grad is not None and local(p.grad).numel():
                    local(p.grad).view(-1)[0] = math.inf
        if step in (spike or {}) and trainer.model.reports_loss:
            totals.totals[0] += spike[step] * totals.totals[1]
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if step == wall_at:
            trainer.stop.max_wall_seconds = 0.0

    def recording_step():
        metrics, verdict, stopped = train_step()
        seen["states"][trainer.step] = local_state(trainer)
        seen["applied"][trainer.step] = verdict.apply
        return metrics, verdict, stopped

    def recording_next_step():
        batch = next_step()
        seen["batches"].append([tuple(t.tolist()) for micro in batch.micro_batches for t in micro["tokens"]])
        return batch

    trainer.model.forward_backward, trainer.train_step = faulty_forward_backward, recording_step
    trainer.data.next_step = recording_next_step
    return seen


# ----------------------------------------------------------------------------------------------
# non-finite steps, one process

def test_a_nonfinite_step_is_skipped_leaving_weights_and_optimizer_untouched(train_args, tmp_path):
    """Infinities in two gradients at step 3: the step is skipped (weights, Adam's moments and
    step counts bit-identical to step 2's), metrics.jsonl records it naming the first of the two
    parameters in model order, the data moves on, and every other step trains as a run without
    the fault does."""
    reference = build(train_args(tmp_path / "reference", *FAST))
    clean = instrument(reference)
    reference.train()
    trainer = build(train_args(tmp_path / "faulty", *FAST))
    seen = instrument(trainer, poison={3: ["layers.1.mlp.down.weight", "layers.0.attention.out.weight"]})
    result = trainer.train()
    assert result.step == 4 and seen["applied"] == {1: True, 2: True, 3: False, 4: True}
    assert same_state(seen["states"][3], seen["states"][2])
    assert not same_state(seen["states"][2], seen["states"][1])  # the comparison can see a step
    for step in (1, 2):
        assert same_state(seen["states"][step], clean["states"][step])
    assert seen["batches"] == clean["batches"]  # step 4 trains on the 4th global batch: no retry
    lines = records(tmp_path / "faulty")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    skipped = lines[2]
    assert skipped["skipped"] == "nonfinite" and skipped["grad_norm"] == math.inf
    assert skipped["nonfinite_param"] == "layers.0.attention.out.weight" and skipped["skipped_steps"] == 1
    assert math.isfinite(skipped["loss"]) and "skipped" not in lines[3]
    saved = json.loads((tmp_path / "faulty" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert saved["train"]["guard"]["skipped_steps"] == 1


def test_nonfinite_stop_and_skip_limit(train_args, tmp_path):
    """train.nonfinite=stop stops at the first non-finite step, naming it and the parameter;
    under skip, the step after train.max_skipped_steps skips stops. Nothing is saved at or after
    the fault."""
    from megatron_code.training.guard import NonFiniteError

    trainer = build(train_args(tmp_path / "stop", *FAST, "--train.nonfinite=stop", "--checkpoint.interval=1"))
    instrument(trainer, poison={3: ["norm.weight"]})
    with pytest.raises(NonFiniteError, match=r"^step 3: loss [\d.]+ and gradient norm inf; first parameter with a "
                       r"non-finite gradient: norm.weight \(train.nonfinite=stop\); nothing saved: the last "
                       r"checkpoint, .*step_0000002, is kept"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").glob("step_*")) == ["step_0000001",
                                                                                         "step_0000002"]
    assert records(tmp_path / "stop")[-1]["skipped"] == "nonfinite"
    trainer = build(train_args(tmp_path / "limit", *FAST, "--train.max_skipped_steps=1"))
    seen = instrument(trainer, poison={2: ["embedding.weight"], 4: ["embedding.weight"]})
    with pytest.raises(NonFiniteError, match=r"^step 4: .* embedding.weight; non-finite steps skipped so far: 1 "
                       r"\(train.max_skipped_steps=1\); nothing saved: this run has no checkpoint"):
        trainer.train()
    assert seen["applied"] == {1: True, 2: False, 3: True, 4: False}


def test_no_checkpoint_of_nonfinite_weights(train_args, tmp_path):
    """Finite gradients whose update overflows a weight: the save refuses, naming the weight."""
    from megatron_code.training.guard import NonFiniteError

    trainer = build(train_args(tmp_path, *FAST, "--checkpoint.interval=2"))
    step = trainer.optimizer.step

    def overflowing_step():
        step()
        if trainer.step == 1:  # the counter moves after the update: this is step 2's
            with torch.no_grad():
                trainer.model.parts[0].layers["1"].mlp.up.weight.view(-1)[5] = math.nan
    trainer.optimizer.step = overflowing_step
    with pytest.raises(NonFiniteError, match=r"^step 2: weight layers.1.mlp.up.weight is non-finite after the "
                       r"optimizer step; not saved \(this run has no checkpoint to resume from\)"):
        trainer.train()
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def test_the_cli_stops_a_diverging_run_with_one_line_and_keeps_its_good_checkpoints(train_args, tmp_path):
    """--optim.lr=1e4 (the issue's case): the gradient norm turns non-finite at step 5. With the
    defaults the run skips steps 5 to 9, stops at step 10 with exit 1 and one line, and keeps
    finite checkpoints only."""
    from megatron_code.training.checkpoint import load_model_state

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "megatron_code.train",
                           *train_args(run, "--optim.lr=1e4", "--train.steps=12", "--train.micro_batch_size=8",
                                       "--train.eval_interval=0",
                                       "--checkpoint.interval=2", "--checkpoint.keep_last=2")],
                          capture_output=True, text=True, timeout=300, env=command_env())
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: step 10: loss ") and "Traceback" not in done.stderr
    assert "first parameter with a non-finite gradient: embedding.weight" in done.stderr
    lines = records(run)
    assert [line.get("skipped") for line in lines] == [None] * 4 + ["nonfinite"] * 6
    kept = sorted((run / "checkpoints").glob("step_*"))
    assert [p.name for p in kept] == ["step_0000006", "step_0000008"]
    for path in kept:
        assert all(torch.isfinite(v).all() for v in load_model_state(path).values())


def test_loss_spikes_are_logged_or_skipped_and_the_window_is_checkpointed(train_args, tmp_path):
    trainer = build(train_args(tmp_path / "skip", *FAST, "--train.steps=8", "--train.loss_spike=skip",
                               "--train.loss_spike_window=4", "--checkpoint.interval=6"))
    seen = instrument(trainer, spike={6: 50.0})
    trainer.train()
    assert seen["applied"] == {1: True, 2: True, 3: True, 4: True, 5: True, 6: False, 7: True, 8: True}
    assert same_state(seen["states"][6], seen["states"][5])
    lines = records(tmp_path / "skip")
    assert "loss_z" not in lines[0] and "loss_z" in lines[2]  # checked once half the window is filled
    assert lines[5]["skipped"] == "loss_spike" and lines[5]["loss_z"] > 6 and lines[5]["loss_spike"] is True
    window = json.loads((tmp_path / "skip" / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert window["train"]["guard"]["recent_losses"] == [line["loss"] for line in lines[2:6]]
    resumed = build(train_args(tmp_path / "resumed", *FAST, "--train.steps=8", "--train.loss_spike=skip",
                               "--train.loss_spike_window=4",
                               f"--checkpoint.load={tmp_path / 'skip' / 'checkpoints' / 'step_0000006'}"))
    assert resumed.guard.losses == window["train"]["guard"]["recent_losses"]
    assert resumed.train().losses == [line["loss"] for line in lines[6:]]
    logged = build(train_args(tmp_path / "log", *FAST, "--train.steps=6", "--train.loss_spike=log",
                              "--train.loss_spike_window=4"))
    seen = instrument(logged, spike={6: 50.0})
    logged.train()
    assert seen["applied"][6] and records(tmp_path / "log")[5]["loss_spike"] is True


# ----------------------------------------------------------------------------------------------
# one device-to-host sync per step

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
"""Tensor methods that copy a value to the host: on GPU each waits for the device."""


def test_a_step_makes_one_host_sync(train_args, tmp_path, monkeypatch):
    """Counts the host syncs our code makes in a training step (directly, or through a tensor's
    own Python methods such as formatting), on the step's thread: one, carrying the loss, the
    per-source losses, the gradient norm, the non-finite flag and the stop votes."""
    trainer = build(train_args(tmp_path, *FAST, "--checkpoint.save=false"))
    syncs = []
    tensor_methods = str(Path(torch.__file__).parent / "_tensor.py")

    def counted(method):
        original = getattr(torch.Tensor, method)

        def sync(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename == tensor_methods:
                frame = frame.f_back
            if (threading.current_thread() is threading.main_thread() and frame is not None
                    and frame.f_globals.get("__name__", "").startswith("megatron_code")):
                syncs.append(f"{frame.f_globals['__name__']}:{frame.f_lineno} {method}")
            return original(self, *args, **kwargs)
        return sync

    for method in SYNCS:
        monkeypatch.setattr(torch.Tensor, method, counted(method))
    for _ in range(2):
        syncs.clear()
        outcome = trainer.train_step()
        assert len(syncs) == 1 and syncs[0].startswith("megatron_code.training.guard:"), syncs
        assert {"loss", "grad_norm", "loss/text", "loss/code"} <= set(outcome[0])
    monkeypatch.undo()
    trainer.data.close()


# ----------------------------------------------------------------------------------------------
# pre-emption, one process: a real SIGTERM to a running `python -m megatron_code.train`

def test_sigterm_saves_exits_zero_and_the_resumed_run_continues_exactly(train_args, tmp_path):
    args = train_args(tmp_path / "run", *FAST, "--train.steps=8", "--checkpoint.interval=100")
    command = [sys.executable, "-m", "megatron_code.train", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=command_env()) as run:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-2000:]
            time.sleep(0.05)
        signalled = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=120)
    exited = time.monotonic() - signalled
    assert run.returncode == 0, err[-2000:]
    stopped = len(records(tmp_path / "run"))
    assert 2 <= stopped < 8 and f"stopped: step {stopped}," in out and "stopping (SIGTERM)" in out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [f"step_{stopped:07d}"]
    assert exited < 60, f"{exited:.0f} s from SIGTERM to exit"
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=command_env())  # resumes
    assert done.returncode == 0 and "done: step 8" in done.stdout, done.stderr[-2000:]
    uninterrupted = build(train_args(tmp_path / "uninterrupted", *FAST, "--train.steps=8",
                                     "--checkpoint.save=false")).train()
    assert [line["loss"] for line in records(tmp_path / "run")] == uninterrupted.losses


def test_max_wall_time_saves_and_stops(train_args, tmp_path):
    trainer = build(train_args(tmp_path, *FAST, "--train.steps=50", "--train.max_wall_time=1s"))
    result = trainer.train()
    assert result.stopped == "train.max_wall_time" and result.step < 50
    assert result.checkpoint.name == f"step_{result.step:07d}" and result.checkpoint.is_dir()


@pytest.mark.parametrize("override, message", [
    ("--train.max_wall_time=3h50", "train.max_wall_time='3h50' is not a duration like 3h50m, 90m or 45s"),
    ("--train.max_wall_time=0m", "train.max_wall_time='0m' must be longer than zero"),
    ("--train.exit_signals=[SIGKILL]", "train.exit_signals: 'SIGKILL' is not a signal a process can catch"),
    ("--train.exit_signals=[USR1]", "train.exit_signals: 'USR1' is not a signal a process can catch"),
    ("--train.nonfinite=ignore", "train.nonfinite='ignore' is not one of skip, stop"),
])
def test_run_safety_fields_are_checked(override, message):
    from megatron_code.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, ["--data.sources=[{name: t, prefix: /x/t}]", "--data.tokenizer=/x/t.model", override])
    assert message in str(err.value)


# ----------------------------------------------------------------------------------------------
# two gloo ranks, the fault on one of them: every rank takes the same decision

ONE_RANK = {2: ["layers.1.attention.qkv.weight"]}
"""Rank 1's fault: an infinity in one gradient at step 2."""
BOTH_RANKS = {3: ["layers.1.mlp.up.weight", "layers.0.mlp.up.weight"]}
"""At step 3 each rank poisons one of these (rank 0 the first): rank 1's comes first in model order."""


def _faults_on_one_rank(rank: int, world_size: int, runs: dict[str, list[str]]) -> dict:
    """Each run with faults on rank 1 only (and, under zero2, the both-ranks step); the zero2
    layout again with SIGUSR1 sent to rank 1 during step 1, then relaunched."""
    one_rank = ONE_RANK if rank == 1 else {}
    both_ranks = {**one_rank, **{step: [names[rank]] for step, names in BOTH_RANKS.items()}}
    out = {}
    for name, args in runs.items():
        trainer = build(args)
        seen = instrument(trainer, poison=both_ranks if name in ("zero2", "sigusr1") else one_rank,
                          signal_at=1 if name == "sigusr1" and rank == 1 else None,
                          wall_at=3 if name == "tp2" and rank == 1 else None)
        result = trainer.train()
        states = seen["states"]
        out[name] = {"applied": seen["applied"], "untouched": same_state(states[2], states[1]) if 2 in states else None,
                     "stopped": result.stopped, "losses": result.losses, "step": result.step}
        if name == "sigusr1":  # the same command again resumes from the checkpoint the signal left
            resumed = build(args)
            instrument(resumed, poison=both_ranks)
            out["resumed"] = {"losses": resumed.train().losses, "skipped_steps": resumed.guard.skipped}
    return out


@pytest.fixture(scope="module")
def faulty_runs(train_args, tmp_path_factory) -> tuple[dict, dict, Path]:
    root = tmp_path_factory.mktemp("faults")
    base = ("--train.micro_batch_size=2", "--train.eval_interval=0")
    runs = {"pp2": train_args(root / "pp2", *base, "--train.steps=2", "--optim.warmup_steps=1", "--parallel.pipeline=2"),
            "tp2": train_args(root / "tp2", *base, "--train.steps=4", "--parallel.tensor=2"),
            "zero2": train_args(root / "zero2", *base, "--train.steps=5", "--parallel.dp_shard=zero2"),
            "sigusr1": train_args(root / "sigusr1", *base, "--train.steps=5", "--parallel.dp_shard=zero2")}
    ranks = run_distributed(_faults_on_one_rank, world_size=2, timeout_s=600, args=(runs,))
    return ranks[0], ranks[1], root


@pytest.mark.parametrize("layout", ["pp2", "tp2", "zero2"])
def test_every_rank_skips_a_step_made_nonfinite_on_one_rank(faulty_runs, layout):
    """An infinity in rank 1's gradient only: both ranks skip step 2, their weights and
    optimizer state untouched, and the record names the parameter."""
    first, second, root = faulty_runs
    for rank in (first, second):
        assert rank[layout]["applied"][2] is False and rank[layout]["applied"][1] is True and rank[layout]["untouched"]
    skipped = records(root / layout)[1]
    assert skipped["skipped"] == "nonfinite" and skipped["nonfinite_param"] == "layers.1.attention.qkv.weight"


def test_the_first_nonfinite_parameter_is_named_across_ranks(faulty_runs):
    """Step 3 under zero2: each rank poisons another parameter; the earlier in model order,
    rank 1's, is named."""
    first, second, root = faulty_runs
    assert first["zero2"]["applied"] == second["zero2"]["applied"] == {1: True, 2: False, 3: False, 4: True, 5: True}
    assert records(root / "zero2")[2]["nonfinite_param"] == "layers.0.mlp.up.weight"


def test_a_stop_request_on_one_rank_stops_every_rank_at_the_same_step(faulty_runs):
    """SIGUSR1 to rank 1 during step 1 (zero2), rank 1's wall time running out at step 3 (tp2):
    every rank saves there and stops; the relaunch resumes and trains steps 2 to 5 exactly as the
    uninterrupted run did, its skipped steps included."""
    first, second, root = faulty_runs
    for rank in (first, second):
        assert rank["sigusr1"]["stopped"] == "SIGUSR1 on 1 of 2 ranks" and rank["sigusr1"]["step"] == 1
        assert rank["tp2"]["stopped"] == "train.max_wall_time on 1 of 2 ranks" and rank["tp2"]["step"] == 3
        assert rank["resumed"]["losses"] == rank["zero2"]["losses"][1:] and rank["resumed"]["skipped_steps"] == 2
    assert sorted(p.name for p in (root / "sigusr1" / "checkpoints").glob("step_*")) == ["step_0000001",
                                                                                         "step_0000005"]
    assert sorted(p.name for p in (root / "tp2" / "checkpoints").glob("step_*")) == ["step_0000003"]


# ----------------------------------------------------------------------------------------------
# validation never hangs: 3 held-out samples over 2 data-parallel ranks under FSDP

def _validate(rank: int, world_size: int, runs: dict[str, list[str]]) -> dict:
    out = {}
    for name, args in runs.items():
        trainer = build(args)
        forwards = []
        trainer.model.parts[0].register_forward_pre_hook(lambda *_: forwards.append(1))
        out[name] = {"valid": trainer.evaluate(), "forwards": len(forwards)}
        trainer.data.close()
    return out


VALIDATION = {  # dp_shard: (held-out samples per source, forwards per rank and source)
    "zero3": (3, 2),  # the ranks held 1 and 2 samples: every forward gathers the parameters
    "zero2": (1, 1),  # one rank held none, so it skipped the forward that gathers them
}


def test_validation_under_fsdp_runs_as_many_forwards_on_every_rank(train_args, tmp_path):
    """2 ranks, micro batches of 1 (the issue's hang): each rank runs as many forwards, and the
    validation losses are the single process's."""
    runs = {mode: train_args(tmp_path / mode, f"--train.eval_batches={samples}", f"--parallel.dp_shard={mode}")
            for mode, (samples, _) in VALIDATION.items()}
    ranks = run_distributed(_validate, world_size=2, timeout_s=240, args=(runs,))  # the old code hung here
    for mode, (samples, forwards) in VALIDATION.items():
        single = build(train_args(tmp_path / f"single-{mode}", f"--train.eval_batches={samples}"))
        expected = single.evaluate()
        single.data.close()
        assert expected.keys() == {"text", "code"}
        assert ranks[0][mode]["forwards"] == ranks[1][mode]["forwards"] == 2 * forwards  # 2 sources
        for rank in ranks:
            assert rank[mode]["valid"].keys() == expected.keys()
            for source, loss in expected.items():
                assert rank[mode]["valid"][source] == pytest.approx(loss, rel=1e-5), (mode, source)
