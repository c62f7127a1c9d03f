"""Command-line tools stop on a path they cannot write, a damaged checkpoint or weights file, with
one line naming it, not a traceback (which --debug shows)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [
    ["tools/prepare_corpus.py", "--out-dir", "{file}/corpus"],
    ["-m", "megatron_code.data.instructions", "--out", "{file}/sft.jsonl", "--count", "arithmetic=3"],
])
def test_an_unwritable_output_path_is_one_line(tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, *[c.format(file=blocker) for c in command]], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and str(blocker) in done.stderr


# ----------------------------------------------------------------------------------------------
# damaged checkpoints and weights files: one line naming the file in every tool, the traceback
# under --debug

def damaged_checkpoint(trained_run: Path, tmp_path: Path) -> Path:
    """`trained_run`'s checkpoint copied with 8 bytes of its shard overwritten (same size)."""
    step = tmp_path / "run" / "checkpoints" / "step_0000016"
    shutil.copytree(trained_run / "checkpoints" / step.name, step)
    shard = step / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
    shard.write_bytes(bytes(data))
    return step


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "Traceback" not in err, err
    return err


def test_a_damaged_checkpoint_is_one_line_in_export_and_evaluation(convert_tool, evaluate_tool, trained_run,
                                                                   eval_task_dir, tmp_path, capsys, monkeypatch):
    from megatron_code.training.checkpoint import CheckpointError

    monkeypatch.setenv("MEGATRON_CODE_DEBUG", "0")  # restored afterwards: --debug sets it
    step = damaged_checkpoint(trained_run, tmp_path)
    assert convert_tool.main(["export", "--load", str(step), "--out", str(tmp_path / "hf")]) == 1
    assert f"{step}: the checkpoint is damaged: __0_0.distcp does not match its checksum" in one_line(capsys)
    assert not (tmp_path / "hf").exists()
    assert evaluate_tool.main(["run", "--model", str(tmp_path / "run"), "--tasks", str(eval_task_dir / "logic.jsonl"),
                               "--out", str(tmp_path / "results.json")]) == 1
    err = one_line(capsys)
    assert f"no intact checkpoint in {tmp_path / 'run' / 'checkpoints'}" in err and "__0_0.distcp" in err
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        convert_tool.main(["export", "--load", str(step), "--out", str(tmp_path / "hf"), "--debug"])


def test_a_truncated_safetensors_file_is_one_line_in_import_and_evaluation(convert_tool, evaluate_tool, exported,
                                                                          eval_task_dir, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("MEGATRON_CODE_DEBUG", "0")
    folder = tmp_path / "hf"
    shutil.copytree(exported, folder)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert convert_tool.main(["import", "--hf", str(folder), "--out", str(tmp_path / "imported")]) == 1
    assert f"error: {shard}: " in one_line(capsys)
    assert evaluate_tool.main(["run", "--model", str(folder), "--tasks", str(eval_task_dir / "logic.jsonl"),
                               "--out", str(tmp_path / "results.json")]) == 1
    assert f"error: {shard}: " in one_line(capsys)
    assert not (tmp_path / "imported").exists() and not (tmp_path / "results.json").exists()


def test_training_stops_in_one_line_on_damaged_checkpoints_and_shows_the_traceback_under_debug(trained_run,
                                                                                                train_args, tmp_path):
    run_dir = damaged_checkpoint(trained_run, tmp_path).parent.parent
    command = [sys.executable, "-m", "megatron_code.train", *train_args(run_dir)]
    # a fresh process of its own, not a rank of the process group this one made
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "MEGATRON_CODE_DEBUG")}
    plain = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr, plain.stderr
    last = plain.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: train.output_dir={run_dir} holds checkpoints but none is intact (step_0000016: "
                           "__0_0.distcp does not match its checksum"), plain.stderr
    debug = subprocess.run(command + ["--debug"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
