"""Checkpoint files: which checkpoints are kept, stale temporaries, RNG state as plain data,
weights-only starts (`init_from`, imported checkpoints) and loading under another vocabulary
padding."""
import json
import random

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_code.config import load_config
from megatron_code.training.checkpoint import Checkpointer, TrainState, load_model_state


class Weights:
    """A minimal sharded state: one tensor."""

    def __init__(self):
        self.weight = torch.arange(6.0)

    def state_dict(self):
        return {"weight": self.weight}

    def load_state_dict(self, state):
        self.weight.copy_(state["weight"])


def checkpointer(directory, keep_last=2):
    from megatron_code.parallel.distributed import init_distributed

    init_distributed("cpu")
    train = TrainState()
    return Checkpointer(directory, keep_last, {"model": Weights()}, {"train": train}, {"config": {}}), train


def test_keep_newest_by_step_number_and_never_the_one_just_written(tmp_path):
    ckpt, _ = checkpointer(tmp_path, keep_last=2)
    for name in ("step_9999999", "step_10000000", "step_0000500", "step_0000003.tmp"):
        (tmp_path / name).mkdir()
    ckpt.save(400)
    # newest two by number: 10000000 and 9999999 (by name 10000000 would sort first); 400 was just written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000400", "step_10000000", "step_9999999"]
    assert (tmp_path / "latest").read_text() == "step_0000400"
    assert not list(tmp_path.glob("*.tmp"))  # the stale temporary went, and ours was renamed


def test_rng_state_is_plain_data_and_restored(tmp_path):
    ckpt, train = checkpointer(tmp_path)
    train.step = 7
    random.seed(3)
    torch.manual_seed(3)
    path = ckpt.save(7)
    expected = (random.random(), torch.rand(3))
    state = json.loads((path / "rng_rank0.json").read_text())
    assert set(state) >= {"python", "numpy", "torch"}
    random.seed(99)
    torch.manual_seed(99)
    train.step = 0
    assert ckpt.load(path) is True and train.step == 7
    assert (random.random(), *torch.rand(3).tolist()) == (expected[0], *expected[1].tolist())


def test_init_from_and_weights_only_checkpoints(train_args, tmp_path):
    """`init_from` and a weights-only checkpoint under --load both start at step 0 with the
    checkpoint's weights, a fresh optimizer and a fresh data position."""
    from megatron_code.training.trainer import Trainer

    first = Trainer(load_config(None, train_args(tmp_path / "first", "--train.steps=2")))
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

    saved = Trainer(load_config(None, train_args(tmp_path / "a", "--train.steps=2"))).train()
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

    saved = Trainer(load_config(None, train_args(tmp_path / "a", "--train.steps=1"))).train()
    with pytest.raises(CheckpointError, match=r"holds a model with model.hidden_size=64; this config has 96"):
        Trainer(load_config(None, train_args(tmp_path / "b", "--model.hidden_size=96",
                                             f"--checkpoint.load={saved.checkpoint}")))
