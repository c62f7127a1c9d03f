"""Run safety around checkpoints, tried by hand-made damage as a user meets it: a damaged or
missing newest checkpoint is named and the newest intact one resumes (never step 0 unless asked),
pruning keeps what damage makes precious, and a full disk during a save fails on every rank in
one line, removes the partial save and leaves the previous checkpoints intact."""
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from megatron_code.config import load_config


def run_args(train_args, out, *extra):
    return train_args(out, "--train.steps=6", "--checkpoint.interval=2", "--checkpoint.keep_last=3",
                      "--train.eval_interval=0", *extra)


@pytest.fixture(scope="module")
def run(train_args, tmp_path_factory):
    """A 6-step run saved at steps 2, 4 and 6, and its training losses."""
    from megatron_code.training.trainer import Trainer

    out = tmp_path_factory.mktemp("integrity") / "run"
    return out, Trainer(load_config(None, run_args(train_args, out))).train().losses


def copy_run(run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    return out


def invert_8_bytes(path: Path) -> None:
    """What a bad disk or a stray write does: 8 bytes in the middle of the file change, the size does not."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


NEWEST = "step_0000006"
# how the newest checkpoint is damaged -> (the step the relaunch resumes from, the reason it names)
DAMAGE = {
    "folder deleted": (lambda c: shutil.rmtree(c / NEWEST), 4, None),
    "trainer_state.json removed": (lambda c: (c / NEWEST / "trainer_state.json").unlink(), 4,
                                   "trainer_state.json is missing"),
    "latest garbled": (lambda c: (c / "latest").write_bytes(b"st\x00ep_0"), 6, None),
    "8 bytes overwritten in a shard": (lambda c: invert_8_bytes(c / NEWEST / "__0_0.distcp"), 4,
                                       "__0_0.distcp does not match its checksum"),
    "shard truncated": (lambda c: truncate(c / NEWEST / "__0_0.distcp"), 4, "__0_0.distcp has"),
    ".metadata truncated": (lambda c: truncate(c / NEWEST / ".metadata"), 4, ".metadata has"),
    "trainer_state.json truncated": (lambda c: truncate(c / NEWEST / "trainer_state.json"), 4,
                                     "trainer_state.json has"),
    "rng file truncated": (lambda c: truncate(c / NEWEST / "rng_pp0_tp0.json"), 4, "rng_pp0_tp0.json has"),
    "manifest removed": (lambda c: (c / NEWEST / "manifest.json").unlink(), 4, "manifest.json is missing"),
}


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_resumes(run, train_args, tmp_path, capsys,
                                                                               damage):
    from megatron_code.training.trainer import Trainer

    act, step, reason = DAMAGE[damage]
    out = copy_run(run, tmp_path)
    act(out / "checkpoints")
    trainer = Trainer(load_config(None, run_args(train_args, out)))
    printed = capsys.readouterr().out
    assert trainer.step == step, printed
    if reason:
        assert f"warning: checkpoint {out / 'checkpoints' / NEWEST} is damaged: {reason}" in printed
    assert f"resuming from {out / 'checkpoints' / f'step_{step:07d}'}, the newest intact" in printed
    assert logged_steps(out) == list(range(1, step + 1))  # the records past the resumed step are gone


def test_resuming_past_a_damaged_checkpoint_is_exact_and_prunes_nothing_older(run, train_args, tmp_path,
                                                                              monkeypatch):
    """8 bytes overwritten in step 6's shard: the relaunch resumes from step 4 with the same
    losses as the uninterrupted run, logs each step once, keeps every checkpoint older than the
    damaged one while it exists (keep_last=1 notwithstanding), and replaces it with an intact one."""
    from megatron_code.training.checkpoint import Checkpointer
    from megatron_code.training.trainer import Trainer

    out = copy_run(run, tmp_path)
    invert_8_bytes(out / "checkpoints" / NEWEST / "__0_0.distcp")
    kept, save = [], Checkpointer.save

    def save_and_look(self, step):
        path = save(self, step)
        kept.append(sorted(p.name for p in (out / "checkpoints").glob("step_*")))
        return path
    monkeypatch.setattr(Checkpointer, "save", save_and_look)
    trainer = Trainer(load_config(None, run_args(train_args, out, "--checkpoint.keep_last=1",
                                                 "--checkpoint.interval=1")))
    assert trainer.step == 4
    assert trainer.train().losses == run[1][4:]  # bit-identical on CPU
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    assert kept == [["step_0000002", "step_0000004", "step_0000005", NEWEST], [NEWEST]]
    from megatron_code.training.integrity import problem
    assert problem(out / "checkpoints" / NEWEST) is None


def test_pruning_keeps_a_checkpoint_damaged_since_and_everything_older(tmp_path):
    """Found at a save: a kept checkpoint whose file no longer has its size. keep_last=2 would
    remove step 1 when step 3 is written; step 2 is damaged, so steps 1 and 2 stay."""
    from test_checkpoint import checkpointer

    ckpt, _ = checkpointer(tmp_path, keep_last=2)
    ckpt.save(1)
    ckpt.save(2)
    truncate(tmp_path / "step_0000002" / "__0_0.distcp")
    ckpt.save(3)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000001", "step_0000002", "step_0000003"]
    ckpt.save(4)  # step 2 is still damaged: nothing older than it goes, step 3 is not the newest two
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000001", "step_0000002", "step_0000003",
                                                                "step_0000004"]


def test_no_intact_checkpoint_stops_the_run_unless_a_fresh_start_is_allowed(run, train_args, tmp_path, capsys):
    from megatron_code.training.checkpoint import CheckpointError
    from megatron_code.training.trainer import Trainer

    out = copy_run(run, tmp_path)
    for step_dir in (out / "checkpoints").glob("step_*"):
        (step_dir / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError) as error:
        Trainer(load_config(None, run_args(train_args, out)))
    message = str(error.value)
    assert "holds checkpoints but none is intact" in message and "--checkpoint.allow_fresh_start=true" in message
    assert all(f"step_000000{s}: trainer_state.json is missing" in message for s in (2, 4, 6))
    capsys.readouterr()
    trainer = Trainer(load_config(None, run_args(train_args, out, "--checkpoint.allow_fresh_start=true")))
    assert trainer.step == 0 and "starting again from step 0, as checkpoint.allow_fresh_start=true" in \
        capsys.readouterr().out
    assert len(list((out / "checkpoints").glob("step_*"))) == 3  # kept


# ----------------------------------------------------------------------------------------------
# a full disk during a save

def fill_the_disk_at(monkeypatch, folder_name: str):
    """Every DCP file written into a folder named `folder_name` fails as on a full disk: its
    write raises ENOSPC (with no file name, as write(2) gives it)."""
    create_stream = dcp_filesystem.FileSystem.create_stream

    class Full:
        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.stream, name)

    @contextmanager
    def failing(self, path, mode):
        with create_stream(self, path, mode) as stream:
            yield Full(stream) if Path(path).parent.name == folder_name and "w" in mode else stream
    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", failing)


def manifest_on_a_full_disk(monkeypatch):
    from megatron_code.training import checkpoint

    def full(directory, sums):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "manifest.json"))
    monkeypatch.setattr(checkpoint, "write_manifest", full)


@pytest.mark.parametrize("where", ["a DCP shard", "the manifest"])
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(train_args, tmp_path, monkeypatch, capsys, where):
    from megatron_code.train import main
    from megatron_code.training.trainer import Trainer

    out = tmp_path / "run"
    args = train_args(out, "--train.steps=4", "--checkpoint.interval=2", "--train.eval_interval=0")
    if where == "a DCP shard":
        fill_the_disk_at(monkeypatch, "step_0000004.tmp")
    else:
        original = Trainer.save

        def save_then_fill(self):  # the disk fills up after step 2's checkpoint
            if self.step == 4:
                manifest_on_a_full_disk(monkeypatch)
            return original(self)
        monkeypatch.setattr(Trainer, "save", save_then_fill)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    message = str(stopped.value.code)
    assert message.splitlines() == [message] and message.startswith(f"error: saving checkpoint {out}/checkpoints/"
                                                                     "step_0000004 failed: ")
    assert "No space left on device" in message and "free there" in message
    assert "its partial save step_0000004.tmp was removed, the checkpoints already there are untouched " \
           "(newest step_0000002)" in message
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000002"]
    from megatron_code.training.integrity import problem
    assert (checkpoints / "latest").read_text() == "step_0000002" and problem(checkpoints / "step_0000002") is None
    monkeypatch.undo()
    capsys.readouterr()
    assert Trainer(load_config(None, args)).step == 2  # the next launch resumes the intact one


def test_a_full_disk_at_the_next_launch_names_the_file(train_args, tmp_path, monkeypatch):
    """The metrics log rewritten to the resumed step on a full disk: one line naming it."""
    from megatron_code.train import main

    out = tmp_path / "run"
    args = train_args(out, "--train.steps=2", "--optim.warmup_steps=1", "--checkpoint.interval=1", "--train.eval_interval=0")
    main(args)
    shutil.rmtree(out / "checkpoints" / "step_0000002")  # resumes from step 1: metrics.jsonl is cut

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)  # the disk is full when data is flushed
    with pytest.raises(SystemExit) as stopped:
        main(args)
    monkeypatch.undo()
    assert str(stopped.value.code) == f"error: {out / 'metrics.jsonl'}: No space left on device"
    assert not list(out.glob("*.tmp"))
