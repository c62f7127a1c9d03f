"""The sample trace and tools/data_trace.py: a run killed with SIGKILL and resumed with a changed
schedule trains every sample at most once per epoch of its file, and the trace, the checkpoint's
positions and the tool's answers agree."""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tool_modules import load_tool
from megatron_code.data.trace import RECORD, read_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from subprocess_training import records, train, train_and_kill  # noqa: E402


@pytest.fixture(scope="module")
def tool():
    return load_tool("data_trace")


@pytest.fixture(scope="module")
def traced_run(train_args, tiny_indexed, code_shards, tmp_path_factory) -> Path:
    """40 steps of 8 samples, text and the small code file (a dozen samples: many epochs) 1:1,
    a checkpoint every 10 steps; killed at step 12 or later, then launched again with code 3:1
    from step 20 on."""
    run = tmp_path_factory.mktemp("trace") / "run"
    sources = (f"--data.sources=[{{name: text, prefix: '{tiny_indexed['text']}'}}, "
               f"{{name: code, prefix: '{code_shards['small']}'}}]")

    def args(schedule):
        return train_args(run, sources, schedule, "--train.steps=40", "--train.micro_batch_size=4",
                          "--train.eval_interval=0", "--data.trace=true", "--checkpoint.interval=10")

    train_and_kill(args("--data.schedule=[{start: 0, weights: {text: 1, code: 1}}]"), run, at_step=12)
    assert (run / "checkpoints" / "latest").read_text() == "step_0000010"
    train(args("--data.schedule=[{start: 0, weights: {text: 1, code: 1}}, {start: 20, weights: {text: 1, code: 3}}]"))
    return run


def test_a_kill_9_and_resume_with_a_changed_schedule_trains_each_sample_at_most_once_per_epoch(traced_run, tool):
    header, trace = read_trace(traced_run)
    assert trace["step"].tolist() == [s for s in range(40) for _ in range(8)]  # the killed steps cut, once each
    assert tool.check(traced_run) == []
    code = trace[trace["source"] == 1]
    size = header["sources"][1]["files"][0]["size"]
    assert code["epoch"].max() >= 3  # the small file was read many times
    for epoch in range(int(code["epoch"].max()) + 1):
        indices = code["index"][code["epoch"] == epoch].tolist()
        assert len(set(indices)) == len(indices)
        if epoch < code["epoch"].max():
            assert sorted(indices) == list(range(size))  # a whole epoch: every sample once
    assert sum(code["step"] < 20) == 80 and sum(code["step"] >= 20) == 120  # 1:1, then 3:1
    events = [r for r in records(traced_run) if "event" in r]
    assert [(e["step"], e["verdict"], e["source"]) for e in events] == [(10, "accepted", "configuration on resume")]
    assert "+phase 1: from step 20: text 0.250, code 0.750" in events[0]["diff"]
    lines = [r["step"] if "event" not in r else "event" for r in records(traced_run)]
    assert lines == list(range(1, 11)) + ["event"] + list(range(11, 41))


def test_the_trace_and_the_checkpoint_expand_to_the_same_samples(traced_run, tool, tmp_path):
    checkpoint = traced_run / "checkpoints" / "step_0000040"
    assert tool.expand(traced_run, tmp_path / "traced.jsonl") == 320
    assert tool.expand(checkpoint, tmp_path / "positions.jsonl") == 320
    keys = [Counter((r["source"], r["file"], r["epoch"], r["index"]) for r in map(json.loads, open(path)))
            for path in (tmp_path / "traced.jsonl", tmp_path / "positions.jsonl")]
    assert keys[0] == keys[1]
    _, trace = read_trace(traced_run)
    index = int(trace[trace["source"] == 1]["index"][0])
    times = int(((trace["source"] == 1) & (trace["index"] == index)).sum())
    assert f"code {trace_prefix(traced_run, 1)} sample {index}: seen {times} time(s): step 0 (epoch 0)" in \
        tool.seen(traced_run, "code", None, [index])
    by_positions = tool.seen(checkpoint, "code", None, [index])
    assert f"sample {index}: seen {times} time(s) by step 40 (epochs 0, 1," in by_positions
    never = int(np.setdiff1d(np.arange(header_size(traced_run, 0)), trace[trace["source"] == 0]["index"])[0])
    assert f"text {trace_prefix(traced_run, 0)} sample {never}: seen 0 time(s)" in tool.seen(checkpoint, "text", None,
                                                                                               [never])


def trace_prefix(run: Path, source: int) -> str:
    return read_trace(run)[0]["sources"][source]["files"][0]["prefix"]


def header_size(run: Path, source: int) -> int:
    return read_trace(run)[0]["sources"][source]["files"][0]["size"]


def test_check_finds_a_sample_trained_twice_in_an_epoch_and_a_trace_behind_its_checkpoint(traced_run, tool, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(traced_run, copy, ignore=shutil.ignore_patterns("data_cache"))
    header, trace = read_trace(copy)
    twice = trace.copy()
    twice[8] = twice[0]  # step 1 trains step 0's first sample again
    twice.astype(RECORD).tofile(copy / "data_trace.bin")
    problems = tool.check(copy)
    assert any(f"sample {int(trace[0]['index'])} appears 2 times in epoch 0" in p for p in problems), problems
    trace[: 8 * 39].tofile(copy / "data_trace.bin")  # the last step missing
    assert any("the trace holds" in p and "the checkpoint's position is" in p for p in tool.check(copy))


def test_the_tool_answers_a_bad_question_with_one_line(traced_run, tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["seen", str(traced_run), "--source", "web", "3"])
    assert exit_info.value.code == "error: no source 'web' in this run (sources: text, code)"
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["summary", str(traced_run / "checkpoints")])
    assert "has no sample trace" in str(exit_info.value.code) and "--data.trace=true" in str(exit_info.value.code)
