"""The data pipeline on real indexed data: resume and schedule edits serve every sample once, in
the uninterrupted run's order; epochs reshuffle; caches follow the files; resume checks."""
import json
import os

import numpy as np
import pytest
import torch

from megatron_code.config import ConfigError, load_config
from megatron_code.data.errors import DataError
from megatron_code.data.pipeline import DataPipeline, check_resumable
from megatron_code.data.tokenizer import load_tokenizer


def source_yaml(name, prefix, weight) -> str:
    """A data.sources entry; `prefix` is a path or a list of (path, weight) files."""
    files = f"'{prefix}'" if isinstance(prefix, str) else "[" + ", ".join(
        f"{{prefix: '{p}', weight: {w}}}" for p, w in prefix) + "]"
    return f"{{name: {name}, prefix: {files}, weight: {weight}}}"


def pipeline_config(tiny_corpus, prefixes, tmp_path, *extra, weights=(2, 1)):
    sources = ", ".join(source_yaml(n, p, w) for (n, p), w in zip(prefixes.items(), weights))
    return load_config(None, [f"--data.sources=[{sources}]", f"--data.tokenizer={tiny_corpus.tokenizer}",
                              "--data.seq_length=32", "--data.split=80,20,0", "--train.micro_batch_size=4",
                              "--train.global_batch_size=8", "--train.steps=40", "--optim.warmup_steps=4", "--train.eval_batches=2",
                              f"--train.output_dir={tmp_path}", *extra])


def make(tiny_corpus, prefixes, tmp_path, *extra, weights=(2, 1), log=None, **kwargs):
    config = pipeline_config(tiny_corpus, prefixes, tmp_path, *extra, weights=weights)
    return DataPipeline(config, load_tokenizer(config.data.tokenizer), log=log or (lambda _: None), **kwargs)


def draw(pipeline, steps):
    """[(source, tokens of each sample)] per step, checking the batch's own columns on the way."""
    out = []
    for _ in range(steps):
        batch = pipeline.next_step()
        samples = []
        for micro in batch.micro_batches:
            assert set(micro) == {"tokens", "labels", "loss_mask", "position_ids", "source"}
            samples += [(int(s), tuple(t.tolist())) for s, t in zip(micro["source"], micro["tokens"])]
        out.append(samples)
    return out


def test_resume_with_prefetch_serves_the_same_samples(tiny_corpus, tiny_indexed, tmp_path):
    ramp = "--data.schedule=[{start: 0, weights: {text: 1, code: 1}}, {start: 6, weights: {text: 1}, ramp: 6}]"
    full = draw(make(tiny_corpus, tiny_indexed, tmp_path, ramp, "--data.prefetch=0"), 16)
    for stop in (3, 8):  # mid phase, mid ramp
        first = make(tiny_corpus, tiny_indexed, tmp_path, ramp, "--data.prefetch=2")
        head = draw(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        if stop == 8:  # as checkpoints from before several-file sources were
            del state["files"]
        first.close()
        resumed = make(tiny_corpus, tiny_indexed, tmp_path, ramp, "--data.prefetch=2")
        resumed.load_state_dict(state)
        assert head + draw(resumed, 16 - stop) == full
        resumed.close()


def test_weights_changed_on_resume_apply_from_the_change(tiny_corpus, tiny_indexed, tmp_path):
    """The catch-up case: text only, then resume at 1:1; no catching up on code's history."""
    logs = []
    text_only = make(tiny_corpus, tiny_indexed, tmp_path, weights=(1, 0))
    head = draw(text_only, 10)
    assert {s for step in head for s, _ in step} == {0}
    resumed = make(tiny_corpus, tiny_indexed, tmp_path, weights=(1, 1), log=logs.append)
    resumed.load_state_dict(text_only.state_dict())
    tail = draw(resumed, 10)
    for step in tail:
        assert sorted(s for s, _ in step) == [0] * 4 + [1] * 4
    assert any("applies from this step" in line and "+phase 1: from step 10: text 0.500, code 0.500" in line
               for line in logs)
    text_samples = [t for step in head + tail for s, t in step if s == 0]
    assert len(set(text_samples)) == len(text_samples) == 80 + 40  # nothing served twice
    state = resumed.state_dict()
    assert state["sampler"]["positions"] == {"text": 120, "code": 40}
    assert state["tokens"] == {"text": 120 * 32, "code": 40 * 32}
    assert [p["start"] for p in state["schedule"]] == [0, 10]


def test_schedule_file_edits_apply_from_the_next_step_and_a_rejection_is_logged_once(tiny_corpus, tiny_indexed,
                                                                                       tmp_path):
    """The file is checked before every step: a phase added for the very next step applies there
    (the loader's batches drawn ahead are replaced); an edit of trained steps is rejected once,
    naming the trained steps it would change and the step the run is at, and both verdicts come
    as events of the step they apply from."""
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("- {start: 0, weights: {text: 1, code: 1}}\n")
    logs = []
    live = make(tiny_corpus, tiny_indexed, tmp_path, f"--data.schedule_file={schedule}", "--data.prefetch=2",
                log=logs.append)
    head = draw(live, 5)  # the loader has built batches ahead: the edit must replace them
    schedule.write_text("- {start: 0, weights: {text: 1, code: 1}}\n- {start: 5, weights: {code: 1}}\n")
    batch = live.next_step()
    assert {int(s) for b in batch.micro_batches for s in b["source"]} == {1}
    assert [(e["step"], e["verdict"]) for e in batch.events] == [(5, "accepted")]
    assert "+phase 1: from step 5: code 1.000" in batch.events[0]["diff"]
    middle = [[(int(s), tuple(t.tolist())) for b in batch.micro_batches for s, t in zip(b["source"], b["tokens"])]]
    middle += draw(live, 2)
    schedule.write_text("- {start: 0, weights: {text: 1, code: 3}}\n- {start: 5, weights: {code: 1}}\n")
    batches = [live.next_step() for _ in range(6)]
    rejected = [line for line in logs if "rejected" in line]
    assert len(rejected) == 1 and rejected[0].startswith("step 8: edit of data.schedule_file=")
    assert "it would rewrite trained steps 0..4: steps 0..4 were trained as [from step 0: text 0.500, code 0.500]" \
        in rejected[0] and "Phases may change only from the step the run is at when the file is saved" in rejected[0]
    assert [[(e["step"], e["verdict"]) for e in b.events] for b in batches] == [[(8, "rejected")]] + [[]] * 5
    assert all({int(s) for b in batch.micro_batches for s in b["source"]} == {1} for batch in batches)
    live.close()
    # the same as a run that had the accepted schedule from the start, since only the future changed
    planned = tmp_path / "planned.yaml"
    planned.write_text("- {start: 0, weights: {text: 1, code: 1}}\n- {start: 5, weights: {code: 1}}\n")
    assert head + middle == draw(make(tiny_corpus, tiny_indexed, tmp_path, f"--data.schedule_file={planned}",
                                      "--data.prefetch=0"), 8)
    assert [c["step"] for c in live.state_dict()["changes"]] == [5]


def test_epochs_reshuffle_and_serve_every_sample_once(tiny_corpus, tiny_indexed, tmp_path):
    logs = []
    pipeline = make(tiny_corpus, tiny_indexed, tmp_path, "--data.seq_length=128", "--data.prefetch=0", "--train.steps=1000",
                    weights=(0, 1), log=logs.append)
    size = len(pipeline.sources[1].files[0].train)
    steps = -(-2 * size // 8)
    code = [t for step in draw(pipeline, steps) for s, t in step if s == 1]
    first, second = code[:size], code[size:2 * size]
    assert len(set(first)) == size and sorted(first) == sorted(second) and first != second
    reference = pipeline.sources[1].files[0].train  # epoch 0 is megatron-core's own order
    assert first == [tuple(reference[i]["tokens"].tolist()) for i in range(size)]
    assert any(f"'code' starts epoch 2 at step {size // 8}" in line for line in logs)
    assert any("will be read about" in line for line in logs)
    with pytest.raises(DataError, match=r"'code': the schedule asks for up to 8,001 samples but it holds 375 .*allow_repeat=false"):
        make(tiny_corpus, tiny_indexed, tmp_path, "--data.seq_length=128", "--data.allow_repeat=false", "--train.steps=1000",
             weights=(0, 1))


def test_epochs_one_two_three_are_new_permutations(tiny_corpus, tiny_indexed, code_shards, tmp_path):
    """A small source read four times over: each epoch serves every sample once, and epochs 1, 2
    and 3 are orders of their own (pairwise, and against epoch 0), few samples keeping their place."""
    pipeline = make(tiny_corpus, {"text": tiny_indexed["text"], "code": code_shards["small"]}, tmp_path,
                    "--data.prefetch=0", "--train.steps=1000", weights=(0, 1))
    size = len(pipeline.sources[1].files[0].train)
    code = [t for step in draw(pipeline, -(-4 * size // 8)) for s, t in step if s == 1]
    epochs = [code[e * size:(e + 1) * size] for e in range(4)]
    assert size >= 16 and len(set(epochs[0])) == size
    for epoch in epochs[1:]:
        assert sorted(epoch) == sorted(epochs[0])
    for a in range(4):
        for b in range(a + 1, 4):
            in_place = sum(x == y for x, y in zip(epochs[a], epochs[b]))
            assert in_place <= size // 4, (a, b, in_place, size)  # random orders share about one


def test_data_parallel_ranks_split_the_global_batch(tiny_corpus, tiny_indexed, tmp_path):
    whole = draw(make(tiny_corpus, tiny_indexed, tmp_path, "--data.prefetch=0"), 3)
    ranks = [draw(make(tiny_corpus, tiny_indexed, tmp_path, "--data.prefetch=0", dp_rank=r, dp_size=2), 3)
             for r in range(2)]
    for step, (a, b) in enumerate(zip(*ranks)):
        assert a + b == whole[step] and len(a) == len(b) == 4
    with pytest.raises(DataError, match="not a multiple of train.micro_batch_size=4 x 4 data-parallel ranks"):
        make(tiny_corpus, tiny_indexed, tmp_path, dp_rank=0, dp_size=4)


def test_validation_batch_is_fixed_and_the_same_on_every_rank(tiny_corpus, tiny_indexed, tmp_path):
    one = make(tiny_corpus, tiny_indexed, tmp_path, weights=(1, 0))  # code: validation only
    batch = one.valid_batch(1)
    assert len(batch["tokens"]) == 8 and (batch["source"] == 1).all()  # eval_batches x micro batch
    assert torch.equal(batch["tokens"], torch.stack([one.sources[1].valid[i]["tokens"] for i in range(8)]))
    for rank in range(2):  # ParallelModel.evaluate splits it over data-parallel ranks, not the data
        assert torch.equal(make(tiny_corpus, tiny_indexed, tmp_path, dp_rank=rank, dp_size=2).valid_batch(1)["tokens"],
                           batch["tokens"])


def test_resume_checks_name_what_changed(tiny_corpus, tiny_indexed, tmp_path):
    saved = make(tiny_corpus, tiny_indexed, tmp_path)
    draw(saved, 2)
    state = saved.state_dict()
    with pytest.raises(DataError, match=r"(?s)data.seq_length changed: 32 -> 64.*allow_changed_data=true"):
        make(tiny_corpus, tiny_indexed, tmp_path, "--data.seq_length=64").load_state_dict(state)
    other_tokenizer = json.loads(json.dumps(state))
    other_tokenizer["fingerprint"]["tokenizer"] = "0" * 64
    with pytest.raises(DataError, match=r"data.tokenizer changed"):
        make(tiny_corpus, tiny_indexed, tmp_path).load_state_dict(other_tokenizer)
    logs = []
    allowed = make(tiny_corpus, tiny_indexed, tmp_path, "--data.seed=7", "--data.allow_changed_data=true",
                   log=logs.append)
    allowed.load_state_dict(state)
    assert any("resuming although" in line and "data.seed changed: 1234 -> 7" in line for line in logs), logs
    assert allowed.state_dict()["sampler"]["positions"] == state["sampler"]["positions"]


def test_rebuilt_dataset_gets_new_indices_and_stops_a_resume(tiny_corpus, tiny_indexed, tmp_path):
    from megatron_code.data.preprocess import preprocess

    prefix = str(tmp_path / "data" / "code_text_document")
    preprocess(tiny_corpus.code, tmp_path / "data" / "code", tiny_corpus.tokenizer, progress=False)
    cache = tmp_path / "cache"
    first = make(tiny_corpus, {"code": prefix}, tmp_path, f"--data.cache_dir={cache}", weights=(1,))
    draw(first, 1)
    state = first.state_dict()
    smaller = tmp_path / "smaller.jsonl"
    smaller.write_text("".join(open(tiny_corpus.code).readlines()[::2]))
    preprocess(smaller, tmp_path / "data" / "code", tiny_corpus.tokenizer, progress=False)
    rebuilt = make(tiny_corpus, {"code": prefix}, tmp_path, f"--data.cache_dir={cache}", weights=(1,))
    fresh = make(tiny_corpus, {"code": prefix}, tmp_path, f"--data.cache_dir={tmp_path / 'empty'}", weights=(1,))
    assert len(rebuilt.sources[0].files[0].train) == len(fresh.sources[0].files[0].train) != len(first.sources[0].files[0].train)
    assert draw(rebuilt, 3) == draw(fresh, 3)
    assert len([f for f in os.listdir(cache) if f.endswith("description.txt")]) == 4  # train + valid, twice
    with pytest.raises(DataError, match=r"data source 'code': the files at .* changed since the checkpoint"):
        make(tiny_corpus, {"code": prefix}, tmp_path, weights=(1,)).load_state_dict(state)


@pytest.mark.parametrize("extra, message", [
    ("--data.schedule=[{start: 0, weights: {text: -1, code: 1}}]", r"data.schedule\[0\].weights.text must be a number >= 0"),
    ("--data.schedule=[{start: 0, weights: {text: 0, code: 0}}]", r"data.schedule\[0\].weights are all zero"),
    ("--data.schedule=[{start: 0, weights: {text: 1}}, {start: 0.5, weights: {code: 1}}, {start: 10, weights: {code: 1}}]",
     r"data.schedule\[2\].start \(step 10\) must come after data.schedule\[1\].start \(step 20\)"),
    ("--data.schedule=[{start: 0, weights: {web: 1}}]", r"data.schedule\[0\].weights.web: unknown source"),
    ("--data.schedule=cooldown(share=2)", r"cooldown has no option 'share'"),
    ("--data.schedule=[{start: 0, weights: {text: 1}}, {start: 40, weights: {code: 1}}]",
     r"data.schedule\[1\].start is step 40, at or after the end of the run \(train.steps=40\)"),
    ("--data.schedule=[{start: 0, weights: {text: 1}}, {start: 30, weights: {code: 1}, ramp: 40}]",
     r"data.schedule\[1\].ramp of 40 steps from step 30 ends at step 70, after the run ends"),
    ("--data.mix_by=examples", r"data.mix_by=examples counts instruction examples: it needs train.stage=sft"),
])
def test_bad_schedules_name_the_field(tiny_corpus, tiny_indexed, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        make(tiny_corpus, tiny_indexed, tmp_path, extra)


def test_a_malformed_schedule_file_stops_the_start_with_one_line(tiny_corpus, tiny_indexed, tmp_path):
    bad = tmp_path / "schedule.yaml"
    bad.write_text("- {start: 0, weights: {text: 1}\n")
    with pytest.raises(ConfigError) as error:
        make(tiny_corpus, tiny_indexed, tmp_path, f"--data.schedule_file={bad}")
    assert f"{bad}:2:1: invalid YAML in data.schedule_file: expected ',' or '}}', but got '<stream end>'" \
        in str(error.value) and len(str(error.value).splitlines()) == 1


def test_a_resume_whose_schedule_rewrites_trained_steps_stops_before_any_work(tiny_corpus, tiny_indexed, tmp_path):
    """stepwise_increase trained to step 25, resumed with stepwise_decrease: one line naming the
    trained steps it would change and the two ways on, from the checkpoint's state alone (no
    dataset built); data.schedule_source=checkpoint goes on with the trained schedule."""
    first = make(tiny_corpus, tiny_indexed, tmp_path, "--data.schedule=stepwise_increase", "--data.prefetch=0")
    draw(first, 25)
    state = json.loads(json.dumps(first.state_dict()))
    tail = draw(first, 15)
    decrease = ["--data.schedule=stepwise_decrease"]
    config = pipeline_config(tiny_corpus, tiny_indexed, tmp_path, *decrease)
    message = (r"^data.schedule disagrees with the checkpoint \(step 25\) on trained steps 0\.\.24: steps 0\.\.24 were "
               r"trained as \[from step 0: text 0\.700, code 0\.300\], the new schedule makes them \[from step 0: text "
               r"0\.500, code 0\.500\] \(its phase 0\)\. Either change only phases from step 25 on, or set "
               r"data.schedule_source=checkpoint to go on with the checkpoint's schedule$")
    with pytest.raises(DataError, match=message):
        check_resumable(state, config, load_tokenizer(config.data.tokenizer))
    with pytest.raises(DataError, match=message):
        make(tiny_corpus, tiny_indexed, tmp_path, *decrease).load_state_dict(state)
    logs = []
    going_on = make(tiny_corpus, tiny_indexed, tmp_path, *decrease, "--data.schedule_source=checkpoint",
                    "--data.prefetch=0", log=logs.append)
    going_on.load_state_dict(state)
    assert draw(going_on, 15) == tail and any("the checkpoint's schedule goes on" in line for line in logs)


def test_a_longer_run_keeps_the_boundaries_it_has_passed(tiny_corpus, tiny_indexed, tmp_path):
    """stepwise_increase over 40 steps, resumed with train.steps=80: at step 15 the quarters still
    to come move to steps 40 and 60; at step 40 every boundary has passed and stays, with a note."""
    first = make(tiny_corpus, tiny_indexed, tmp_path, "--data.schedule=stepwise_increase", "--data.prefetch=0")
    draw(first, 15)
    middle = first.state_dict()
    draw(first, 25)
    end = first.state_dict()
    longer = make(tiny_corpus, tiny_indexed, tmp_path, "--data.schedule=stepwise_increase", "--train.steps=80",
                  "--data.prefetch=0")
    longer.load_state_dict(middle)
    code = [sum(s for s, _ in step) for step in draw(longer, 65)]  # code samples per step of 8
    assert [p["start"] for p in longer.state_dict()["schedule"]] == [0, 10, 40, 60]
    assert sum(code[:25]) == round(0.3 * 8 * 25) and sum(code[25:45]) == round(0.4 * 8 * 20) \
        and sum(code[45:]) == 0.5 * 8 * 20
    logs = []
    finished = make(tiny_corpus, tiny_indexed, tmp_path, "--data.schedule=stepwise_increase", "--train.steps=80",
                    log=logs.append)
    finished.load_state_dict(end)
    assert [p["start"] for p in finished.state_dict()["schedule"]] == [0, 10, 20, 30]
    assert any("train.steps is 80 now: the phases that started keep their steps, fractions of the 40 steps they were "
               "first resolved with" in line for line in logs)


def test_a_resume_that_changes_what_is_counted_goes_on_from_its_positions(tiny_corpus, tiny_indexed, tmp_path):
    """Samples, then tokens from the resume step: a note says so, every source goes on from its
    position (nothing served twice) and the new count starts at the resume step."""
    first = make(tiny_corpus, tiny_indexed, tmp_path, "--data.prefetch=0")
    head = draw(first, 5)
    logs = []
    resumed = make(tiny_corpus, tiny_indexed, tmp_path, "--data.mix_by=tokens", "--data.prefetch=0", log=logs.append)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = draw(resumed, 10)
    assert any("data.mix_by changed on resume: samples -> tokens; the mix counts tokens from step 5 on" in line
               for line in logs)
    served = [t for step in head + tail for _, t in step]
    assert len(set(served)) == len(served) == 120
    code = sum(s for step in tail for s, _ in step)  # 2:1 over the 80 samples of equal length since the resume
    assert abs(code - 80 / 3) < 1 and resumed.state_dict()["sampler"]["segment"] == 5


def test_missing_prefix_names_the_source(tiny_corpus, tiny_indexed, tmp_path):
    with pytest.raises(DataError, match=r"data source 'web': /nope/web.bin does not exist"):
        make(tiny_corpus, {"web": "/nope/web"}, tmp_path, weights=(1,))
    with pytest.raises(DataError, match=r"data source 'code' \(data.sources\[1\].prefix\[1\]\): /nope/c.bin does not"):
        make(tiny_corpus, {"text": tiny_indexed["text"], "code": [(tiny_indexed["code"], 1), ("/nope/c", 1)]}, tmp_path)


# ---------------------------------------------------------------------- a source of several files

def rows(dataset, n=None) -> list[tuple]:
    return [tuple(dataset[i]["tokens"].tolist()) for i in range(len(dataset) if n is None else n)]


def shards(tiny_indexed, code_shards, large=3, small=1) -> dict:
    return {"text": tiny_indexed["text"], "code": [(code_shards["large"], large), (code_shards["small"], small)]}


# text and code 1:1, then code only: the small file starts a second epoch near the end
SHARDS_SCHEDULE = "--data.schedule=[{start: 0, weights: {text: 1, code: 1}}, {start: 16, weights: {code: 1}}]"


def test_a_source_of_several_files_draws_each_by_weight_in_its_own_order(tiny_corpus, tiny_indexed, code_shards,
                                                                         tmp_path):
    logs = []
    pipeline = make(tiny_corpus, shards(tiny_indexed, code_shards), tmp_path, SHARDS_SCHEDULE, "--data.prefetch=0",
                    weights=(1, 1), log=logs.append)
    large, small = (f.train for f in pipeline.sources[1].files)
    epochs = [rows(large), rows(small)]
    assert not set(epochs[0]) & set(epochs[1])  # a row tells its file
    which = {row: f for f, epoch in enumerate(epochs) for row in epoch}
    code = [t for step in draw(pipeline, 40) for s, t in step if s == 1]
    files = np.array([which[t] for t in code])
    # against the direct computation: after the source's t-th sample, the large file has served
    # 3t/4 of them within half a sample
    t = np.arange(1, len(code) + 1)
    assert len(code) == 16 * 4 + 24 * 8 and np.abs(np.cumsum(files == 0) - 0.75 * t).max() <= 0.5
    # each file in its own order: megatron-core's first, then a new order of the same samples
    first = [row for row, f in zip(code, files) if f == 0]
    assert first == epochs[0][:len(first)]
    second = [row for row, f in zip(code, files) if f == 1]
    n = len(small)
    assert len(second) == 64 > n and second[:n] == epochs[1]
    assert len(set(second[n:])) == len(second[n:]) and set(second[n:]) <= set(epochs[1]) and second[n:] != epochs[1][:64 - n]
    assert any(f"data source 'code' file {code_shards['small']} starts epoch 2" in line for line in logs), logs
    assert any(f"note: data source 'code' file {code_shards['small']} will be read about" in line for line in logs)
    state = pipeline.state_dict()  # reports and positions stay keyed by the source
    assert state["sampler"]["positions"] == {"text": 64, "code": 256} and set(state["tokens"]) == {"text", "code"}
    files = {k: v for k, v in state["files"]["code"].items() if k in ("positions", "phase", "phase_samples", "counts")}
    assert set(state["files"]) == {"code"} and files == {
        "positions": {code_shards["large"]: 192, code_shards["small"]: 64}, "phase": 0, "phase_samples": 256,
        "counts": {code_shards["large"]: 192, code_shards["small"]: 64}}
    with pytest.raises(DataError, match=rf"data source 'code' file {code_shards['small']}: the schedule asks for up to"):
        make(tiny_corpus, shards(tiny_indexed, code_shards), tmp_path, SHARDS_SCHEDULE, "--data.allow_repeat=false",
             weights=(1, 1))


def test_a_source_of_several_files_resumes_as_if_uninterrupted(tiny_corpus, tiny_indexed, code_shards, tmp_path):
    def pipeline(prefetch):
        return make(tiny_corpus, shards(tiny_indexed, code_shards), tmp_path, SHARDS_SCHEDULE,
                    f"--data.prefetch={prefetch}", weights=(1, 1))
    full = draw(pipeline(0), 40)
    for stop in (9, 33):  # in the first phase; in the small file's second epoch
        first = pipeline(2)
        head = draw(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = pipeline(2)
        resumed.load_state_dict(state)
        assert head + draw(resumed, 40 - stop) == full
        resumed.close()


def test_changed_files_of_a_source_stop_a_resume_unless_allowed(tiny_corpus, tiny_indexed, code_shards, tmp_path):
    large, small = code_shards["large"], code_shards["small"]
    one = make(tiny_corpus, {"text": tiny_indexed["text"], "code": large}, tmp_path)
    draw(one, 4)
    state = one.state_dict()
    with pytest.raises(DataError, match=rf"data source 'code': prefix changed: {large} -> {large} \(weight 3\), "
                                        rf"{small} \(weight 1\)"):
        make(tiny_corpus, shards(tiny_indexed, code_shards), tmp_path).load_state_dict(state)
    logs = []
    several = make(tiny_corpus, shards(tiny_indexed, code_shards), tmp_path, "--data.allow_changed_data=true",
                   log=logs.append)
    several.load_state_dict(state)  # the one file goes on where it was; the new one starts
    assert any("a file new to a source of several starts at its beginning" in line for line in logs)
    assert several.state_dict()["files"]["code"]["positions"] == {large: state["sampler"]["positions"]["code"], small: 0}
    draw(several, 6)
    state = several.state_dict()
    even = make(tiny_corpus, shards(tiny_indexed, code_shards, large=1, small=1), tmp_path,
                "--data.allow_changed_data=true")
    even.load_state_dict(state)  # new weights apply from here: no catching up on the 3:1 history
    draw(even, 6)
    before, after = state["files"]["code"]["positions"], even.state_dict()["files"]["code"]["positions"]
    assert after[large] - before[large] == after[small] - before[small] == 8


def test_a_source_of_several_files_validates_on_them_by_weight(tiny_corpus, tiny_indexed, code_shards, tmp_path):
    pipeline = make(tiny_corpus, shards(tiny_indexed, code_shards), tmp_path)
    large, small = (f.valid for f in pipeline.sources[1].files)
    held_out = [tuple(t.tolist()) for t in pipeline.valid_batch(1)["tokens"]]
    assert len(held_out) == 8  # eval_batches x micro batch, 3:1 like training: 6 of one, 2 of the other
    assert [r for r in held_out if r in set(rows(large))] == rows(large, 6)
    assert [r for r in held_out if r in set(rows(small))] == rows(small, 2)
    assert len(pipeline.sources[1].valid) == len(large) + len(small)


def _draw_on_rank(rank, world_size, tokenizer, prefixes, out_dir, schedule_file):
    """Each rank reads its own copy of the schedule file at start-up; only rank 0's is edited
    mid-run, so rank 1 can switch only through what rank 0 broadcasts."""
    from pathlib import Path
    mine = Path(schedule_file).with_suffix(f".rank{rank}.yaml")
    mine.write_text(Path(schedule_file).read_text())
    sources = ", ".join(f"{{name: {n}, prefix: '{p}'}}" for n, p in prefixes.items())
    config = load_config(None, [f"--data.sources=[{sources}]", f"--data.tokenizer={tokenizer}", "--data.seq_length=32",
                                "--data.split=80,20,0", "--train.micro_batch_size=2", "--train.global_batch_size=8",
                                "--train.steps=40", "--optim.warmup_steps=4", f"--train.output_dir={out_dir}",
                                f"--data.schedule_file={mine}"])
    pipeline = DataPipeline(config, load_tokenizer(tokenizer), dp_rank=rank, dp_size=world_size, log=lambda _: None)
    head = draw(pipeline, 6)
    if rank == 0:
        mine.write_text("- {start: 0, weights: {text: 1, code: 1}}\n- {start: 8, weights: {code: 1}}\n")
    tail = draw(pipeline, 6)
    pipeline.close()
    return head + tail


def test_data_parallel_ranks_switch_together_on_a_live_edit(tiny_corpus, tiny_indexed, tmp_path):
    from distributed_utils import run_distributed

    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("- {start: 0, weights: {text: 1, code: 1}}\n")
    ranks = run_distributed(_draw_on_rank, world_size=2, args=(str(tiny_corpus.tokenizer), tiny_indexed,
                                                               str(tmp_path / "run"), str(schedule)))
    planned = tmp_path / "planned.yaml"
    planned.write_text("- {start: 0, weights: {text: 1, code: 1}}\n- {start: 8, weights: {code: 1}}\n")
    whole = draw(make(tiny_corpus, tiny_indexed, tmp_path / "one", f"--data.schedule_file={planned}"), 12)
    for step, (a, b) in enumerate(zip(*ranks)):
        assert a + b == whole[step] and not set(a) & set(b)
    assert {s for s, _ in ranks[1][-1]} == {1}
