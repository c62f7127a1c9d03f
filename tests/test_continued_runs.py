"""A run continued from another's checkpoint with a new LR plan (checkpoint.continue_from, the
Megatron-LM `--load` + `--override-opt_param-scheduler` analogue): the weights and the AdamW state
come from the checkpoint, the step counter goes on from its step, the LR follows the new plan
from the continued run's first step, and a relaunch resumes the continued run itself."""
import json
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_code.config import ConfigError, load_config


def saved_tensors(step_dir, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint under `prefix`, read from its files in this process."""
    reader = dcp.FileSystemReader(step_dir)
    metadata = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()
           if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # DCP warns that there is no process group: that is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def start(train_args, tmp_path_factory):
    """A finished 4-step run's last checkpoint (cosine to 3e-4 after a 2-step warmup)."""
    from megatron_code.training.trainer import Trainer

    run = tmp_path_factory.mktemp("start") / "run"
    return Trainer(load_config(None, train_args(run, "--train.steps=4", "--train.eval_interval=0",
                                                "--optim.min_lr=3e-4"))).train().checkpoint


COOLDOWN = ("--train.steps=3", "--optim.warmup_steps=0", "--optim.schedule=linear", "--optim.lr=1e-3",
            "--optim.min_lr=1e-6", "--optim.weight_decay=0.05", "--checkpoint.interval=2", "--train.eval_interval=0")


def test_continue_from_keeps_the_optimizer_state_and_plans_the_lr_anew(start, train_args, tmp_path, capsys):
    from megatron_code.training.trainer import Trainer

    args = train_args(tmp_path / "cooldown", f"--checkpoint.continue_from={start}", *COOLDOWN)
    capsys.readouterr()
    continued = Trainer(load_config(None, args))
    out = capsys.readouterr().out
    assert f"continuing from {start} at step 4" in out and "its last LR 0.0003" in out
    assert "learning rate over steps 4..6: 0.000667 at step 4, 1e-06 at step 6 (end of linear)" in out
    assert continued.step == 4 and continued.data.state_dict()["step"] == 0  # the data start afresh
    # the AdamW moments and step counts are the checkpoint's, read back from its files
    moments = saved_tensors(start, "optimizer.state.")
    state = continued.optimizer.state_dict()
    assert len(moments) == 3 * len(list(continued.model.parameters()))  # exp_avg, exp_avg_sq, step
    for key, saved in moments.items():
        assert torch.equal(state[key.removeprefix("optimizer.")], saved), key
    for group, decay in zip(continued.optimizer.optimizers[0].param_groups, (0.05, 0.0)):
        assert group["weight_decay"] == decay  # this config's, not the checkpoint's 0.1

    result = continued.train()
    run = tmp_path / "cooldown"
    logged = metrics(run)
    assert [r["step"] for r in logged] == [5, 6, 7] and result.step == 7
    assert [r["lr"] for r in logged] == pytest.approx([1e-3 + (1e-6 - 1e-3) * k / 3 for k in (1, 2, 3)])
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000006", "step_0000007"]
    steps = {v.item() for k, v in saved_tensors(result.checkpoint, "optimizer.state.").items() if k.endswith(".step")}
    assert steps == {7.0}  # AdamW's bias correction counts every step since the first run began

    # init_from on the same checkpoint: the same weights and data but fresh moments, so the first
    # loss is the same and the updates are not
    fresh_args = train_args(tmp_path / "fresh", f"--checkpoint.init_from={start}", *COOLDOWN)
    fresh = Trainer(load_config(None, fresh_args)).train()
    assert fresh.losses[0] == result.losses[0] and fresh.losses[1] != result.losses[1]
    assert [r["step"] for r in metrics(tmp_path / "fresh")] == [1, 2, 3]

    # the continued run dies after step 6's checkpoint: the same command resumes it, on its own plan
    shutil.rmtree(run / "checkpoints" / "step_0000007")
    (run / "checkpoints" / "latest").write_text("step_0000006")
    capsys.readouterr()
    again = Trainer(load_config(None, args))
    assert "checkpoint.continue_from=" in capsys.readouterr().out  # it says the relaunch resumed its own run
    assert again.step == 6 and again.train().losses == result.losses[2:]
    assert [r["step"] for r in metrics(run)] == [5, 6, 7] and metrics(run)[-1]["lr"] == pytest.approx(1e-6)


def test_continue_from_needs_an_optimizer_state(start, train_args, tmp_path):
    from megatron_code.training.checkpoint import CheckpointError, load_model_state
    from megatron_code.training.trainer import Trainer

    imported = tmp_path / "imported"
    dcp.save({"model": load_model_state(start)}, checkpoint_id=imported)
    (imported / "trainer_state.json").write_text(json.dumps(
        {"step": 0, "weights_only": True, "config": json.loads((start / "trainer_state.json").read_text())["config"]}))
    with pytest.raises(CheckpointError, match=r"holds model weights only \(no optimizer state to continue\): start "
                                              r"from it with checkpoint.init_from"):
        Trainer(load_config(None, train_args(tmp_path / "run", f"--checkpoint.continue_from={imported}", *COOLDOWN)))
    with pytest.raises(ConfigError, match="give one"):
        load_config(None, train_args(tmp_path / "run", f"--checkpoint.continue_from={start}",
                                     f"--checkpoint.init_from={start}"))


def test_a_schedule_edit_in_a_continued_run_is_an_event_between_its_steps_records(start, train_args, tmp_path):
    """The data of a continued run count their steps from its start, the records from the first
    run's: an edit saved before the continued run's 3rd batch (data step 2) is an event between
    the records of steps 6 and 7 (4 + 2 done), and record 7 is the first with code only."""
    from megatron_code.training.trainer import Trainer

    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("- {start: 0, weights: {text: 1}}\n")
    out = tmp_path / "continued"
    trainer = Trainer(load_config(None, train_args(out, f"--checkpoint.continue_from={start}", *COOLDOWN[:-2],
                                                   "--train.steps=4", f"--data.schedule_file={schedule}",
                                                   "--train.eval_interval=0")))
    next_step = trainer.data.next_step

    def editing():
        if trainer.data.cursor.step == 2:
            schedule.write_text("- {start: 0, weights: {text: 1}}\n- {start: 2, weights: {code: 1}}\n")
        return next_step()
    trainer.data.next_step = editing
    trainer.train()
    lines = metrics(out)
    assert [(line["step"], line.get("event")) for line in lines] == [
        (5, None), (6, None), (6, "schedule"), (7, None), (8, None)]
    assert [line["samples/code"] for line in lines if "event" not in line] == [0, 0, 8, 8]
