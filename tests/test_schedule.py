"""The schedule language: impossible schedules stop naming the phase, a malformed schedule file is
one line with its file, line and column, an edit names exactly the trained steps it would
change, and a longer run keeps the boundaries it has passed."""
import re

import pytest

from megatron_code.data.schedule import Phase, ScheduleError, merge, read_schedule_file, resolve

NAMES = ["text", "code"]


@pytest.mark.parametrize("start", [40, 41, 400])
def test_a_phase_at_or_after_the_end_of_the_run_stops_naming_it(start):
    with pytest.raises(ScheduleError, match=rf"^data.schedule\[1\].start is step {start}, at or after the end of the "
                                            r"run \(train.steps=40\): the phase would never be drawn$"):
        resolve([{"start": 0, "weights": {"text": 1}}, {"start": start, "weights": {"code": 1}}], NAMES, {}, 40)


@pytest.mark.parametrize("raw, message", [
    ([{"start": 0, "weights": {"text": 1}}, {"start": 30, "weights": {"code": 1}, "ramp": 40}],
     r"data.schedule\[1\].ramp of 40 steps from step 30 ends at step 70, after the run ends \(train.steps=40\): "
     r"the weights would stop 25% of the way"),
    ([{"start": 0, "weights": {"text": 1}}, {"start": 10, "weights": {"code": 1}, "ramp": 0.5},
      {"start": 20, "weights": {"text": 1}}],
     r"data.schedule\[1\].ramp of 20 steps from step 10 ends at step 30, after the next phase starts \(step 20\)"),
])
def test_a_ramp_cut_short_by_the_next_phase_or_the_end_stops_naming_it(raw, message):
    with pytest.raises(ScheduleError, match=message):
        resolve(raw, NAMES, {}, 40)
    raw[1]["ramp"] = 10  # a ramp that ends exactly at the next phase or the end is fine
    assert resolve(raw, NAMES, {}, 40)[1].ramp == 10


def test_a_malformed_schedule_file_is_one_line_naming_file_line_and_column(tmp_path):
    bad = tmp_path / "schedule.yaml"
    bad.write_text("- {start: 0, weights: {text: 1}}\n- {start: 3, weights: {code: 1}\n- {start: 5}\n")
    with pytest.raises(ScheduleError) as error:
        read_schedule_file(bad)
    assert re.fullmatch(rf"{re.escape(str(bad))}:3:1: invalid YAML in data.schedule_file: expected ',' or '}}', "
                        r"but got '-'", str(error.value)), str(error.value)


def test_an_edit_names_exactly_the_trained_steps_it_would_change():
    """Phase 0 covered steps 0-119; at step 150 an edit of phase 0's weights changes those, not
    0-149; an edit of a ramp that keeps its slope on the trained steps changes none."""
    current = resolve([{"start": 0, "weights": {"text": 1, "code": 1}}, {"start": 120, "weights": {"text": 1}}],
                      NAMES, {}, 400)
    edited = resolve([{"start": 0, "weights": {"text": 1, "code": 3}}, {"start": 120, "weights": {"text": 1}}],
                     NAMES, {}, 400)
    with pytest.raises(ScheduleError, match=r"steps 0\.\.119 were trained as \[from step 0: text 0\.500, code "
                                            r"0\.500\], the new schedule makes them \[from step 0: text 0\.250, "
                                            r"code 0\.750\]"):
        merge(current, edited, 150)
    late = resolve([{"start": 0, "weights": {"text": 1, "code": 1}}, {"start": 120, "weights": {"text": 1}},
                    {"start": 140, "weights": {"code": 1}}], NAMES, {}, 400)
    with pytest.raises(ScheduleError, match=r"steps 140\.\.149 were trained as \[from step 120: text 1\.000\]"):
        merge(current, late, 150)
    assert merge(current, late, 140) == late  # a phase starting at the step the run is at applies


def test_a_ramp_whose_future_changes_is_split_at_the_step_the_run_is_at():
    """Text to code over 10 steps from step 10; at step 13 the edit stops the ramp halfway (the
    same slope): the trained steps keep their weights, and from step 13 a phase ramps on from
    where the weights are (text 0.7) to the edit's text 0.5 in the 2 steps left."""
    current = resolve([{"start": 0, "weights": {"text": 1}}, {"start": 10, "weights": {"code": 1}, "ramp": 10}],
                      NAMES, {}, 40)
    edited = resolve([{"start": 0, "weights": {"text": 1}},
                      {"start": 10, "weights": {"text": 1, "code": 1}, "ramp": 5}], NAMES, {}, 40)
    merged = merge(current, edited, 13)
    assert merged[:2] == current[:2] and len(merged) == 3
    split = merged[2]
    assert (split.start, split.ramp, split.weights) == (13, 2, {"text": 0.5, "code": 0.5})
    assert split.ramp_from == pytest.approx({"text": 0.7, "code": 0.3})
    assert merge(current, current, 13) == current  # nothing to split when nothing changes


def test_a_longer_run_keeps_the_boundaries_it_has_passed():
    """stepwise_increase over 40 steps, then train.steps=80: the quarters that started keep the
    steps they had (fractions of 40); the ones to come resolve against 80."""
    first = resolve("stepwise_increase", NAMES, {}, 40)
    assert [p.start for p in first] == [0, 10, 20, 30]
    assert [p.start for p in resolve("stepwise_increase", NAMES, {}, 80, history=first[:2])] == [0, 10, 40, 60]
    assert [p.start for p in resolve("stepwise_increase", NAMES, {}, 80, history=first)] == [0, 10, 20, 30]
    written = [{"start": 0, "weights": {"text": 1}}, {"start": 0.5, "weights": {"code": 1}, "ramp": 0.25}]
    halves = resolve(written, NAMES, {}, 40)
    assert [(p.start, p.ramp) for p in resolve(written, NAMES, {}, 80, history=halves)] == [(0, 0), (20, 10)]
    assert [(p.start, p.ramp) for p in resolve(written, NAMES, {}, 80, history=halves[:1])] == [(0, 0), (40, 20)]


@pytest.mark.parametrize("adaptive, message", [
    ({"every": 0}, r"adaptive.every must be at least one step"),
    ({"smoothing": 1.0}, r"adaptive.smoothing must be a number in \[0, 1\)"),
    ({"min_weight": 0.6}, r"adaptive.min_weight=0.6 x 2 sources exceeds 1"),
    ({"method": "doremi"}, r"adaptive.method='doremi' is not one of odm"),
    ({"prior": {"web": 1}}, r"adaptive.prior.web: unknown source"),
    ({"every": 5, "rate": 2}, r"unknown field data.schedule\[0\].adaptive.rate"),
])
def test_bad_adaptive_options_name_the_field(adaptive, message):
    with pytest.raises(ScheduleError, match=message):
        resolve([{"start": 0, "adaptive": adaptive}], NAMES, {"text": 1, "code": 1}, 40)


def test_an_adaptive_phase_has_no_fixed_weights_or_ramps():
    with pytest.raises(ScheduleError, match=r"data.schedule\[0\]: give weights or adaptive, not both"):
        resolve([{"start": 0, "weights": {"text": 1}, "adaptive": {}}], NAMES, {}, 40)
    with pytest.raises(ScheduleError, match=r"data.schedule\[1\].ramp: the previous phase is adaptive"):
        resolve([{"start": 0, "adaptive": {}}, {"start": 5, "weights": {"text": 1}, "ramp": 2}], NAMES,
                {"text": 1, "code": 1}, 40)
    (phase,) = resolve([{"start": 0, "adaptive": {"every": 0.1, "prior": {"text": 3, "code": 1}}}], NAMES, {}, 40)
    assert phase == Phase(0, {"text": 0.75, "code": 0.25}, adaptive={"method": "odm", "every": 4, "smoothing": 0.9,
                                                                     "min_weight": 0.0})
