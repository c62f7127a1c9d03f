"""Checkpoint files: which checkpoints are kept, stale temporaries, RNG state as plain data,
weights-only starts (`init_from`, imported checkpoints), loading under another vocabulary
padding, the checks before a start, and which checkpoint a relaunch starts from."""
import json
import random
import shutil

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
    with pytest.raises(CheckpointError, match=rf"train.output_dir={run} already holds checkpoints \(latest step_0000003\)"):
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
