"""Training end to end on real data: exact resume, start-up errors, and the quickstart."""
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from megatron_code.config import load_config


@pytest.fixture
def datasets(tiny_indexed):
    return tiny_indexed


def overrides(tiny_corpus, datasets, out_dir, *extra):
    sources = ", ".join(f"{{name: {n}, prefix: '{p}', weight: {w}}}"
                        for (n, p), w in zip(datasets.items(), (2, 1)))
    return ["--model.preset=tiny", f"--data.sources=[{sources}]", f"--data.tokenizer={tiny_corpus.tokenizer}",
            "--data.seq_length=64", "--data.split=80,20,0", "--train.micro_batch_size=2", "--train.global_batch_size=4",
            "--train.eval_interval=4", "--train.eval_batches=2", "--train.progress=false",
            "--optim.warmup_steps=2", "--optim.lr=3e-3", f"--train.output_dir={out_dir}", *extra]


def run(args):
    from megatron_code.training.trainer import Trainer
    trainer = Trainer(load_config(None, args))
    return trainer, trainer.train()


def test_resume_is_exact(tiny_corpus, datasets, tmp_path, capsys):
    full_trainer, full = run(overrides(tiny_corpus, datasets, tmp_path / "full", "--train.steps=8",
                                       "--checkpoint.interval=4", "--checkpoint.keep_last=2", "--train.log_interval=4"))
    full_log = capsys.readouterr().out
    assert len(full.losses) == 8 and full.losses[-1] < full.losses[0]
    halfway = tmp_path / "full" / "checkpoints" / "step_0000004"
    assert json.loads((halfway / "trainer_state.json").read_text())["step"] == 4
    resumed_trainer, resumed = run(overrides(tiny_corpus, datasets, tmp_path / "resumed", "--train.steps=8",
                                             f"--checkpoint.load={halfway}"))
    assert resumed.losses == full.losses[4:]  # bit-identical on CPU
    assert resumed.valid_losses == full.valid_losses
    assert resumed.tokens_per_source == full.tokens_per_source
    for (name, a), b in zip(full_trainer.model.state_dict().items(), resumed_trainer.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the blend holds: 2:1 text:code over 32 samples of 64 tokens
    assert full.tokens_per_source == {"text": 22 * 64, "code": 10 * 64} or \
        full.tokens_per_source == {"text": 21 * 64, "code": 11 * 64}
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "valid_loss/text", "valid_loss/code", "samples/text",
            "tokens/code", "weight/text", "loss/text", "loss/code", "memory/peak_rss_gib"} <= set(lines[3])
    peaks = [l["memory/peak_rss_gib"] for l in lines]  # this process's peak so far: never falls, and in the log line
    assert peaks == sorted(peaks) and peaks[0] > 0.1
    for step in (4, 8):
        assert f"step {step}: loss {lines[step - 1]['loss']:.4f}" in full_log
        assert f"peak mem {lines[step - 1]['memory/peak_rss_gib']:.2f} GiB RSS" in full_log
    for line in lines:  # the per-source losses split the batch loss (every sample has 64 loss tokens)
        assert line["samples/text"] + line["samples/code"] == 4 and line["weight/text"] == pytest.approx(2 / 3)
        assert (line["loss/text"] * line["samples/text"] + line["loss/code"] * line["samples/code"]) / 4 == \
            pytest.approx(line["loss"], rel=1e-5)


def test_schedule_changes_are_events_between_the_records_of_their_step(tiny_corpus, datasets, tmp_path, monkeypatch):
    """Records count optimizer steps done; a schedule change applies from the step it names (steps
    done before its batch): an edit adding code from step 3, saved before the 4th batch, is an
    accepted event of step 3 between records 3 and 4, and record 4 is the first with code. An edit
    of a trained step, saved before the 6th batch, is a rejected event of step 5. The mixture plot
    marks both at their steps."""
    from megatron_code.training.trainer import Trainer

    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("- {start: 0, weights: {text: 1}}\n")
    edits = {3: "- {start: 0, weights: {text: 1}}\n- {start: 3, weights: {code: 1}}\n",
             5: "- {start: 0, weights: {text: 1, code: 1}}\n- {start: 3, weights: {code: 1}}\n"}
    trainer = Trainer(load_config(None, overrides(tiny_corpus, datasets, tmp_path, "--train.steps=7",
                                                  f"--data.schedule_file={schedule}", "--train.eval_interval=0")))
    next_step = trainer.data.next_step

    def editing():
        if trainer.data.cursor.step in edits:
            schedule.write_text(edits[trainer.data.cursor.step])
        return next_step()
    trainer.data.next_step = editing
    trainer.train()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(l["step"], l.get("event"), l.get("verdict")) for l in lines] == [
        (1, None, None), (2, None, None), (3, None, None), (3, "schedule", "accepted"), (4, None, None),
        (5, None, None), (5, "schedule", "rejected"), (6, None, None), (7, None, None)]
    code = {l["step"]: l["samples/code"] for l in lines if "event" not in l}
    assert code == {1: 0, 2: 0, 3: 0, 4: 4, 5: 4, 6: 4, 7: 4}
    assert "+phase 1: from step 3: code 1.000" in lines[3]["diff"]
    assert "rewrite trained steps 0..2" in lines[6]["reason"]
    assert "-phase 0: from step 0: text 1.000" in lines[6]["diff"]

    import matplotlib.axes

    from megatron_code.training.plots import plot_runs
    marks, axvline = [], matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline",
                        lambda ax, x, **kw: marks.append((x, kw["linestyle"])) or axvline(ax, x, **kw))
    plot_runs([tmp_path], tmp_path / "plots")
    assert sorted(set(marks)) == [(3, "-"), (5, ":")]


def test_a_resume_drops_the_records_and_events_it_logs_again(tmp_path):
    """Resuming at step 4: records up to step 4 stay; an event of step 4 happened after record 4
    and before the step the resumed run trains again, which logs it again: it goes."""
    from megatron_code.training.metrics import MetricsLogger

    lines = [{"step": 1}, {"step": 2}, {"step": 2, "event": "schedule"}, {"step": 3}, {"step": 4},
             {"step": 4, "event": "schedule"}, {"step": 5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + '{"step": 6, "lo')
    MetricsLogger(tmp_path, True, False, start_step=4)
    kept = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:5]


def test_longer_runs_say_the_lr_is_replanned_and_wsd_extends_cleanly(tiny_corpus, datasets, tmp_path, capsys):
    """Resuming with more train.steps re-plans the LR: the start-up says so with the LR the last
    step ran at and the LR the new plan gives the next. wsd resumed from a checkpoint before its
    decay continues exactly as a run planned that long (what the note offers)."""
    from megatron_code.config import OptimConfig
    from megatron_code.training.lr_schedule import lr_at

    wsd = ["--optim.schedule=wsd", "--optim.decay_fraction=0.25", "--train.eval_interval=0"]
    run(overrides(tiny_corpus, datasets, tmp_path / "short", "--train.steps=8", "--checkpoint.interval=6", *wsd))
    capsys.readouterr()
    _, clean = run(overrides(tiny_corpus, datasets, tmp_path / "clean", "--train.steps=16", *wsd,
                             f"--checkpoint.load={tmp_path / 'short' / 'checkpoints' / 'step_0000006'}"))
    assert "step 6 ran at LR 0.003, the new plan gives 0.003 at step 7" in capsys.readouterr().out
    _, planned = run(overrides(tiny_corpus, datasets, tmp_path / "planned", "--train.steps=16", *wsd))
    assert clean.losses == planned.losses[6:]  # bit-identical on CPU: as if planned for 16 steps

    _, extended = run(overrides(tiny_corpus, datasets, tmp_path / "short", "--train.steps=16", *wsd))
    optim = OptimConfig(lr=3e-3, warmup_steps=2, schedule="wsd", decay_fraction=0.25)  # as `overrides` + wsd
    assert (f"note: the LR schedule is re-planned from step 8 (train.steps 8 -> 16): step 8 ran at LR "
            f"{lr_at(7, 8, optim):.3g}, the new plan gives {lr_at(8, 16, optim):.3g} at step 9; this checkpoint is "
            "inside the old plan's decay (from step 6): resume (--load) from a checkpoint at or before that step "
            "to extend without raising the LR again") in capsys.readouterr().out
    assert lr_at(8, 16, optim) > lr_at(7, 8, optim) and len(extended.losses) == 8
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [lr_at(s, 16, optim) for s in range(6, 16)]


def _readme_training_commands() -> list[list[str]]:
    """The arguments of every README command that trains (`megatron_code.train`, directly, under
    torchrun or through a launcher) from a config file of the checkout (not one a run writes under runs/)."""
    root = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```bash\n(.*?)```", (root / "README.md").read_text(), re.S)
    text = "\n".join(line for block in blocks for line in block.splitlines() if not line.startswith("#"))
    variables = dict(re.findall(r'^(\w+)="([^"]*)"$', text, re.M))  # the shell variables the commands use
    for name, value in variables.items():
        text = text.replace(f"${name}", value)
    commands = [shlex.split(command, comments=True) for command in text.replace("\\\n", " ").splitlines()]
    out = []
    for words in commands:
        start = next((i + 1 for i, w in enumerate(words) if w == "megatron_code.train" or w.endswith(".sh")), None)
        if start is not None and "--config" in words and not words[words.index("--config") + 1].startswith("runs/"):
            out.append(words[start:])
    return out


def test_readme_training_commands_finish_their_warmup(monkeypatch):
    """Every training command the README shows leaves warmup before its last step: the 125M
    recipe shrunk to 30 steps used to keep its 500 warmup steps and never learn."""
    from megatron_code.train import parse_args
    from megatron_code.training.lr_schedule import check_lr_plan

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    commands = _readme_training_commands()
    assert len(commands) >= 5 and any("--train.steps=30" in c for c in commands)
    for argv in commands:
        config = load_config(*parse_args(argv))
        assert check_lr_plan(config.optim, config.train.steps) == [], argv


def test_checkpoints_keep_last_and_atomic(tiny_corpus, datasets, tmp_path):
    run(overrides(tiny_corpus, datasets, tmp_path, "--train.steps=6", "--checkpoint.interval=2",
                  "--checkpoint.keep_last=2", "--train.eval_interval=0"))
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000004", "step_0000006"]
    assert (ckpt / "latest").read_text() == "step_0000006"


def test_startup_errors_name_the_problem(tiny_corpus, datasets, tmp_path):
    from megatron_code.data.errors import DataError
    from megatron_code.training.checkpoint import CheckpointError
    from megatron_code.training.trainer import Trainer

    missing = overrides(tiny_corpus, datasets, tmp_path, "--data.sources=[{name: web, prefix: /nope/web}]")
    with pytest.raises(DataError, match=r"data source 'web': /nope/web.bin does not exist"):
        Trainer(load_config(None, missing))
    with pytest.raises(CheckpointError, match=r"checkpoint.load=/nope: no checkpoint there"):
        Trainer(load_config(None, overrides(tiny_corpus, datasets, tmp_path, "--checkpoint.load=/nope")))


def test_cli_rejects_unknown_field(capsys):
    from megatron_code.train import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--train.stepz=3"])
    assert "unknown field config.train.stepz" in str(exit_info.value)


def test_quickstart_tiny(tmp_path, capsys):
    from megatron_code.quickstart import run as quickstart

    args = ["--out", str(tmp_path), "--size", "tiny", "--steps", "40", "--vocab-size", "1024",
            "--max-bytes", "200000", "--seq-length", "64", "--no-progress"]
    first = quickstart(args)
    result = first["result"]
    assert result.step == 40 and result.checkpoint.is_dir()
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.6  # clearly learning
    assert set(result.valid_losses) == {"text", "code"}
    assert result.tokens_per_source["text"] > result.tokens_per_source["code"] > 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err  # --no-progress: no bars, data stages included
    report = captured.out
    assert "kernels: torch; attention: auto: sdpa, packed sequences: sdpa" in report  # the start-up line on CPU
    assert "quickstart report" in report and "tokens seen" in report and str(result.checkpoint) in report
    assert result.checkpoint.parent.parent == tmp_path / "train-tiny"  # each size trains in its own directory
    assert f"train loss       {result.losses[0]:.3f} (step 1) -> {result.losses[-1]:.3f} (step 40)" in report
    binaries = sorted(tmp_path.glob("data/*.bin"))
    written = [p.stat().st_mtime_ns for p in binaries]
    again = quickstart(args)  # nothing changed: no preprocessing, no training, the same numbers
    assert again["result"] is None and again["summary"] == first["summary"]
    assert [p.stat().st_mtime_ns for p in binaries] == written
    report = capsys.readouterr()
    assert "is up to date" in report.err and "nothing to train, the checkpoint is at step 40" in report.out
    assert (f"to train further: python -m megatron_code.quickstart --out {tmp_path} --size tiny --vocab-size 1024 "
            "--max-bytes 200000 --seq-length 64 --no-progress --steps 80") in report.out
    assert f"train loss       {result.losses[0]:.3f} (step 1) -> {result.losses[-1]:.3f} (step 40)" in report.out
    further = quickstart([*args, "--steps", "44"])  # trains on from the checkpoint, the cosine re-planned
    assert further["result"].step == 44 and len(further["result"].losses) == 4
    replanned = 2e-4 + 0.5 * 1.8e-3 * (1 + math.cos(math.pi * (40 - 4 + 1) / 40))  # warmup 4, lr 2e-3 -> 2e-4
    assert (f"note: the LR schedule is re-planned from step 40 (train.steps 40 -> 44): step 40 ran at LR 0.0002, "
            f"the new plan gives {replanned:.3g} at step 41; optim.schedule=wsd extends cleanly"
            ) in capsys.readouterr().out
    other = quickstart([*args, "--size", "quickstart", "--steps", "1"])  # another size: a fresh run, not tiny's
    assert other["result"].step == 1 and other["result"].checkpoint.parent.parent == tmp_path / "train"


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-3"], "argument --steps: must be at least 1, got -3"),
    (["--size", "huge"], "argument --size: invalid choice: 'huge'"),
    (["--stepz", "3"], "unrecognized arguments: --stepz 3"),
    (["--out", "{file}/run"], "{file}/run/corpus: Not a directory"),
    (["--batch-size", "3", "--seq-length", "512"], "data.seq_length=512 exceeds model.max_seq_len=256"),
])
def test_quickstart_user_errors_are_one_line_before_any_work(tmp_path, capsys, flags, message):
    from megatron_code.quickstart import main

    (tmp_path / "file").write_text("")
    flags = [f.format(file=tmp_path / "file") for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), "--size", "tiny", *flags])
    err = capsys.readouterr().err + (exit_info.value.code if isinstance(exit_info.value.code, str) else "")
    assert message.format(file=tmp_path / "file") in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and exit_info.value.code != 0
    assert not (tmp_path / "out").exists()  # nothing built
