"""Checkpoint files: which checkpoints are kept, stale temporaries, RNG state as plain data,
weights-only starts (`init_from`, imported checkpoints), loading under another vocabulary
padding, the checks before a start, and which checkpoint a relaunch starts from."""
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_code.config import load_config
from megatron_code.training.checkpoint import Checkpointer, TrainState, load_model_state

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Weights:
    """A minimal sharded state: one tensor."""

    def __init__(self, name="weight"):
        self.name, self.weight = name, torch.arange(6.0)

    def state_dict(self):
        return {self.name: self.weight}

    def load_state_dict(self, state):
        self.weight.copy_(state[self.name])


class Layout:
    """A rank's place in a parallel layout, as parallel/distributed.py's Runtime says it."""

    def __init__(self, pp=0, tp=0, dp=0, sizes=(1, 1, 1)):
        self.coordinates, self.sizes = {"pp": pp, "tp": tp, "dp": dp}, dict(zip(("pp", "tp", "dp"), sizes))

    def coordinate(self, dim):
        return self.coordinates[dim]

    def size(self, dim):
        return self.sizes[dim]


def checkpointer(directory, keep_last=2, layout=None, saved_layout="tp1-pp1-dp1", weights=None):
    from megatron_code.parallel.distributed import init_distributed

    init_distributed("cpu")
    train = TrainState()
    return Checkpointer(directory, keep_last, {"model": weights or Weights()}, {"train": train},
                        {"config": {}, "layout": saved_layout}, layout or Layout()), train


def test_keep_newest_by_step_number_and_never_the_one_just_written(tmp_path):
    ckpt, _ = checkpointer(tmp_path, keep_last=2)
    for step in (500, 9999999, 10000000):
        ckpt.save(step)
    (tmp_path / "step_0000003.tmp").mkdir()
    ckpt.save(400)
    # newest two by number: 10000000 and 9999999 (by name 10000000 would sort first); 400 was just written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000400", "step_10000000", "step_9999999"]
    assert (tmp_path / "latest").read_text() == "step_0000400"
    assert not list(tmp_path.glob("*.tmp"))  # the stale temporary went, and ours was renamed


def draws() -> tuple:
    """The next numbers of Python's, numpy's and torch's global generators."""
    return random.random(), *np.random.rand(2).tolist(), *torch.rand(2).tolist()


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_rng_state_is_plain_data_and_restored(tmp_path):
    ckpt, train = checkpointer(tmp_path)
    train.step = 7
    seed_all(3)
    path = ckpt.save(7)
    expected = draws()
    state = json.loads((path / "rng_pp0_tp0.json").read_text())
    assert set(state) >= {"python", "numpy", "torch"}
    seed_all(99)
    train.step = 0
    assert ckpt.load(path) is True and train.step == 7
    assert draws() == expected


def _stages_then_replicas(rank, world_size, directory):
    """Rank r saves as pipeline stage r with a random stream of its own; both ranks then load as
    two data-parallel replicas of stage 0. Then two saves fail on rank 1 alone (a full disk):
    in its RNG file, and in its DCP shard."""
    import errno
    import os
    from contextlib import contextmanager
    from pathlib import Path

    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    from megatron_code.training import checkpoint

    directory = Path(directory)
    seed_all(100 + rank)
    stages, stage_train = checkpointer(directory, layout=Layout(pp=rank, sizes=(2, 1, 1)), saved_layout="tp1-pp2-dp1",
                                       weights=Weights(f"weight{rank}"))
    stage_train.step = 5
    path = stages.save(5)
    continued = draws()
    seed_all(7)
    replicas, train = checkpointer(directory, layout=Layout(dp=rank, sizes=(1, 1, 2)), weights=Weights("weight0"))
    logs = []
    replicas._log = logs.append
    replicas.load(path)
    out = {"stage": continued, "replica": draws(), "logs": logs, "step": train.step, "errors": []}

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
    create_stream = dcp_filesystem.FileSystem.create_stream

    @contextmanager
    def full_stream(self, path, mode):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with create_stream(self, path, mode) as stream:
            yield stream
    for module, name, failing in ((checkpoint, "write_durably", full),
                                  (dcp_filesystem.FileSystem, "create_stream", full_stream)):
        original = getattr(module, name)
        if rank == 1:
            setattr(module, name, failing)
        try:
            stages.save(6)
        except checkpoint.CheckpointError as e:
            out["errors"].append(str(e))
        setattr(module, name, original)
    torch.distributed.barrier()  # rank 0 removes the partial save after raising
    out["left"] = sorted(p.name for p in directory.iterdir())
    return out


def test_rng_states_follow_the_layout_coordinates_and_a_save_failing_on_one_rank_fails_on_all(tmp_path):
    """RNG states are keyed by (pp, tp): after a change from 2 pipeline stages to 2 data-parallel
    replicas both ranks continue stage 0's stream (rank 1 does not take stage 1's), and one line
    names the dropped states. A full disk on rank 1 alone fails the save on both ranks, with
    no hang, and removes the partial save."""
    from distributed_utils import run_distributed

    ranks = run_distributed(_stages_then_replicas, world_size=2, timeout_s=120, args=(str(tmp_path),))
    assert ranks[0]["stage"] != ranks[1]["stage"]  # the stages drew from different streams
    assert ranks[0]["replica"] == ranks[1]["replica"] == ranks[0]["stage"] and ranks[1]["step"] == 5
    assert ranks[0]["logs"] == [f"warning: {tmp_path / 'step_0000005'} was saved under layout tp1-pp2-dp1: "
                                "RNG states of (pp=1, tp=0) dropped (no such ranks now)"]
    for rank in ranks:
        assert len(rank["errors"]) == 2 and rank["left"] == ["latest", "step_0000005"]
    first, second = ranks[0]["errors"]
    assert first == ranks[1]["errors"][0] and second == ranks[1]["errors"][1]
    assert first.startswith(f"saving checkpoint {tmp_path / 'step_0000006'} failed: "
                            f"{tmp_path / 'step_0000006.tmp' / 'rng_pp1_tp0.json'}: No space left on device")
    assert second.startswith(f"saving checkpoint {tmp_path / 'step_0000006'} failed: rank 1: No space left on device")


def test_rng_files_of_checkpoints_saved_per_global_rank_map_to_coordinates(tmp_path):
    """Before RNG states were keyed, a checkpoint held one file per global rank; the ranks of a
    (pp, dp, tp) = (2, 2, 2) mesh at data-parallel rank 0 are 0, 1 (stage 0) and 4, 5 (stage 1)."""
    from megatron_code.training.checkpoint import _saved_rng_files

    for rank in range(8):
        (tmp_path / f"rng_rank{rank}.json").write_text("{}")
    assert _saved_rng_files(tmp_path, "tp2-pp2-dp2") == {
        (0, 0): tmp_path / "rng_rank0.json", (0, 1): tmp_path / "rng_rank1.json",
        (1, 0): tmp_path / "rng_rank4.json", (1, 1): tmp_path / "rng_rank5.json"}


def test_init_from_and_weights_only_checkpoints(train_args, tmp_path):
    """`init_from` and a weights-only checkpoint under --load both start at step 0 with the
    checkpoint's weights, a fresh optimizer and a fresh data position."""
    from megatron_code.training.trainer import Trainer

    first = Trainer(load_config(None, train_args(tmp_path / "first", "--train.steps=2", "--optim.warmup_steps=1")))
    saved = first.train().checkpoint
    weights = load_model_state(saved)
    imported = tmp_path / "imported"
    dcp.save({"model": weights}, checkpoint_id=imported)
    (imported / "trainer_state.json").write_text(json.dumps(
        {"step": 0, "weights_only": True, "config": json.loads((saved / "trainer_state.json").read_text())["config"]}))
    for name, start in (("init_from", f"--checkpoint.init_from={saved}"), ("imported", f"--checkpoint.load={imported}")):
        trainer = Trainer(load_config(None, train_args(tmp_path / name, start)))
        assert trainer.step == 0 and trainer.data.state_dict()["step"] == 0
        assert all(not o.state for o in trainer.optimizer.optimizers)  # no Adam moments yet
        model = trainer.model.state_dict()
        for key, value in weights.items():
            assert torch.equal(model[key], value), (name, key)


def test_checkpoint_loads_under_another_vocab_padding(train_args, tmp_path):
    """Saved with 1024 rows (padding to 128), resumed with 1056 (padding to 96): shared rows of
    the weight and of the Adam moments come back; the extra rows are padding."""
    from megatron_code.training.trainer import Trainer

    saved = Trainer(load_config(None, train_args(tmp_path / "a", "--train.steps=2", "--optim.warmup_steps=1"))).train()
    resumed = Trainer(load_config(None, train_args(tmp_path / "b", "--train.steps=3",
                                                   "--model.pad_vocab_to_multiple_of=96",
                                                   f"--checkpoint.load={saved.checkpoint}")))
    assert resumed.config.model.vocab_size == 1056 and resumed.step == 2
    before = load_model_state(saved.checkpoint)["embedding.weight"]
    assert torch.equal(resumed.model.state_dict()["embedding.weight"][:1024], before)
    reader = dcp.FileSystemReader(saved.checkpoint)
    moment = torch.empty(1024, 64)
    dcp.load({"optimizer.state.embedding.weight.exp_avg": moment}, storage_reader=reader)
    resumed_moment = resumed.optimizer.state_dict()["state.embedding.weight.exp_avg"]
    assert torch.equal(resumed_moment[:1024], moment) and torch.count_nonzero(resumed_moment[1024:]) == 0
    assert resumed.train().step == 3


def test_resume_refuses_another_model(train_args, tmp_path):
    from megatron_code.training.checkpoint import CheckpointError
    from megatron_code.training.trainer import Trainer

    saved = Trainer(load_config(None, train_args(tmp_path / "a", "--train.steps=1", "--optim.warmup_steps=0"))).train()
    with pytest.raises(CheckpointError, match=r"model.hidden_size: checkpoint 64, this config 96"):
        Trainer(load_config(None, train_args(tmp_path / "b", "--model.hidden_size=96",
                                             f"--checkpoint.load={saved.checkpoint}")))


# ----------------------------------------------------------------------------------------------
# starting a run: what is checked before any work, which checkpoint a launch starts from

@pytest.fixture(scope="module")
def saved(train_args, tmp_path_factory):
    """The last checkpoint of a finished 2-step run."""
    from megatron_code.training.trainer import Trainer

    run = tmp_path_factory.mktemp("saved") / "run"
    return Trainer(load_config(None, train_args(run, "--train.steps=2", "--optim.warmup_steps=1",
                                                "--train.eval_interval=0"))).train().checkpoint


def test_a_start_that_does_not_fit_the_checkpoint_stops_before_any_work(saved, train_args, tiny_corpus, tmp_path,
                                                                        monkeypatch):
    """Model math, tokenizer and (on resume) the data order are checked from trainer_state.json
    before any dataset or model is built; every differing field is named with both values."""
    from megatron_code.data.errors import DataError
    from megatron_code.data.tokenizer import train_tokenizer
    from megatron_code.training import trainer as trainer_module
    from megatron_code.training.checkpoint import CheckpointError

    def no_data(*args):
        raise AssertionError("datasets were built before the checkpoint was checked")
    monkeypatch.setattr(trainer_module, "build_data", no_data)

    def start(*extra):
        return trainer_module.Trainer(load_config(None, train_args(tmp_path / "run", *extra)))

    math = ("--model.rope_theta=500000", "--model.norm_eps=1e-6", "--model.num_kv_heads=4")
    for how in ("init_from", "load"):
        with pytest.raises(CheckpointError) as error:
            start(f"--checkpoint.{how}={saved}", *math)
        message = str(error.value)
        for expected in ("model.rope_theta: checkpoint 10000.0, this config 500000.0",
                         "model.norm_eps: checkpoint 1e-05, this config 1e-06", "model.kv_heads: checkpoint 2, this config 4"):
            assert expected in message, (how, message)
    # another vocabulary of the same size: other ids
    other = train_tokenizer([tiny_corpus.code], tmp_path / "other" / "spm", vocab_size=1024, progress=False)
    with pytest.raises(CheckpointError, match=r"tokenizer: checkpoint vocabulary \w+ \(1024 ids\), data.tokenizer="):
        start(f"--checkpoint.init_from={saved}", f"--data.tokenizer={other}")
    with pytest.raises(DataError, match=r"data.seed changed: 1234 -> 7"):
        start(f"--checkpoint.load={saved}", "--data.seed=7")


def test_each_data_file_is_hashed_once_per_start(saved, train_args, tmp_path, monkeypatch):
    import hashlib

    from megatron_code.data import datasets
    from megatron_code.training.trainer import Trainer

    monkeypatch.setattr(datasets, "_IDX_DIGESTS", {})
    hashed, digest = [], hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: hashed.append(f.name) or digest(f, name))
    Trainer(load_config(None, train_args(tmp_path / "resumed", f"--checkpoint.load={saved}", "--train.steps=3")))
    assert len(hashed) == 2 and len(set(hashed)) == 2  # the text and the code .idx, once each


def test_a_relaunch_resumes_its_run_directory(saved, train_args, tmp_path):
    """A run started with init_from, relaunched, continues from its own latest checkpoint (not
    from init_from again) and logs each step once; an explicit load overrides init_from; a load
    from elsewhere that would overwrite the run directory's checkpoints is refused."""
    from megatron_code.training.checkpoint import CheckpointError
    from megatron_code.training.trainer import Trainer

    run = tmp_path / "run"
    args = train_args(run, f"--checkpoint.init_from={saved}", "--train.steps=3", "--checkpoint.interval=2",
                      "--train.eval_interval=0")
    first = Trainer(load_config(None, args)).train()
    # as if the job died after logging step 3 but before saving it
    shutil.rmtree(run / "checkpoints" / "step_0000003")
    (run / "checkpoints" / "latest").write_text("step_0000002")
    again = Trainer(load_config(None, args))
    assert again.step == 2
    assert again.train().losses == first.losses[2:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    explicit = Trainer(load_config(None, args + [f"--checkpoint.load={run / 'checkpoints' / 'step_0000002'}"]))
    assert explicit.step == 2  # not the run's latest (3), not init_from's step 0
    with pytest.raises(CheckpointError, match=rf"train.output_dir={run} already holds checkpoints \(newest step_0000003\)"):
        Trainer(load_config(None, args + [f"--checkpoint.load={saved}"]))


def test_the_checkpoint_is_saved_before_evaluation(train_args, tmp_path, monkeypatch):
    from megatron_code.training.trainer import Trainer

    def failing(self):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(Trainer, "evaluate_tasks", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        Trainer(load_config(None, train_args(tmp_path / "run", "--train.steps=2", "--optim.warmup_steps=1",
                                             "--train.eval_interval=2"))).train()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000002"
