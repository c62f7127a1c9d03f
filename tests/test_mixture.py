"""The sampler against a direct computation of the schedule: per-phase counts stay within
Tijdeman's bound of the integral of the weights, for every shorthand and for random ramps."""
import json
import re

import numpy as np
import pytest

from megatron_code.data.mixture import MixtureSampler
from megatron_code.data.schedule import SHORTHANDS, Phase, ScheduleError, resolve


def reference_targets(phase: Phase, names, start_sample: int, n: int, batch: int) -> np.ndarray:
    """(n, sources): the integral of each source's weight over the phase's first 1..n samples,
    summed sample by sample (trapezoids; the weight is linear within each sample)."""
    u = np.arange(start_sample, start_sample + n + 1, dtype=np.float64) / batch  # in steps
    per_sample = []
    for name in names:
        w = np.array([phase.weight_at(name, x) for x in u])
        per_sample.append((w[:-1] + w[1:]) / 2)
    return np.cumsum(np.stack(per_sample, 1), 0)


def check_run(phases, names, total_steps, batch, sampler=None, from_step=0):
    """Draw the run and check every prefix of every phase; returns the sources drawn."""
    sampler = sampler or MixtureSampler(names, phases)
    drawn = [sampler.take(step, batch)[0] for step in range(from_step, total_steps)]
    sources = np.concatenate(drawn)
    bounds = [p.start for p in phases if p.start < total_steps] + [total_steps]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        lo = max(lo, from_step)
        phase_sources = sources[(lo - from_step) * batch: (hi - from_step) * batch]
        targets = reference_targets(phases[i], names, 0, len(phase_sources), batch)
        counts = np.cumsum(np.eye(len(names), dtype=np.int64)[phase_sources], 0)
        m = sum(1 for n in names if phases[i].weights.get(n, 0) > 0 or phases[i].ramp_from.get(n, 0) > 0)
        bound = 1 - 1 / (2 * m - 2) if m > 1 else 0.0
        assert np.abs(counts - targets).max() <= bound + 1e-9, (i, np.abs(counts - targets).max(), bound)
        for d, name in enumerate(names):  # a weight-0 source is never drawn
            if phases[i].weights.get(name, 0) == 0 and phases[i].ramp_from.get(name, 0) == 0:
                assert counts[-1, d] == 0
    return sources


@pytest.mark.parametrize("shorthand", SHORTHANDS)
def test_every_shorthand_follows_its_phases(shorthand):
    names = ["text", "code"]
    phases = resolve(shorthand, names, {"text": 2, "code": 1}, total_steps=40)
    assert len(phases) == {"constant": 1, "cooldown": 2, "code_then_text": 2, "balanced_then_text": 2}.get(shorthand, 4)
    sources = check_run(phases, names, 40, batch=12)
    if shorthand == "stepwise_increase":  # 7:3, 7:3, 6:4, 5:5 over 4 x 10 steps of 12 samples
        per_phase = [np.bincount(sources[i * 120:(i + 1) * 120], minlength=2).tolist() for i in range(4)]
        assert per_phase == [[84, 36], [84, 36], [72, 48], [60, 60]]


@pytest.mark.parametrize("seed", range(6))
def test_random_schedules_with_ramps_stay_within_the_bound(seed):
    rng = np.random.default_rng(seed)
    names = [f"s{i}" for i in range(int(rng.integers(2, 8)))]

    def weights():
        w = rng.random(len(names)) * (rng.random(len(names)) < 0.7)
        w[int(rng.integers(len(names)))] += 0.1
        return {n: float(x) for n, x in zip(names, w)}

    raw = [{"start": 0, "weights": weights()},
           {"start": 7, "weights": weights(), "ramp": int(rng.integers(1, 20))},
           {"start": 30, "weights": weights()}]
    check_run(resolve(raw, names, {}, 60), names, 60, batch=int(rng.integers(1, 17)))


def test_resume_mid_phase_and_mid_ramp_gives_the_same_samples():
    names = ["text", "code", "math"]
    phases = resolve([{"start": 0, "weights": {"text": 5, "code": 3}},
                      {"start": 10, "weights": {"text": 1, "code": 1, "math": 2}, "ramp": 8}], names, {}, 30)
    full = MixtureSampler(names, phases)
    expected = [full.take(step, 7) for step in range(30)]
    for stop in (5, 13):  # inside phase 0; inside phase 1's ramp
        first = MixtureSampler(names, phases)
        for step in range(stop):
            first.take(step, 7)
        resumed = MixtureSampler(names, phases)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for step in range(stop, 30):
            got = resumed.take(step, 7)
            assert all(np.array_equal(a, b) for a, b in zip(got, expected[step]))


def test_zero_weight_source_listed_first_is_never_drawn():
    names = ["valid_only", "a", "b", "c"]
    sources = check_run(resolve([], names, {"valid_only": 0, "a": 1, "b": 1, "c": 1}, 10), names, 10, batch=5)
    assert 0 not in sources


@pytest.mark.parametrize("fraction, total, step", [(0.29, 100, 29), (0.57, 100, 57), (0.35, 10, 3), (0.7, 10, 7),
                                                   (0.999, 10, 9)])
def test_a_fractional_start_floors_to_its_step(fraction, total, step):
    """x of N steps starts at floor(x * N) of the decimal written: 0.29 * 100 is 28.999... in
    floats, 0.35 * 10 = 3.5 rounds to 4; the phase's first sample is drawn at that step."""
    names = ["text", "code"]
    phases = resolve([{"start": 0, "weights": {"text": 1}}, {"start": fraction, "weights": {"code": 1}}],
                     names, {}, total)
    assert phases[1].start == step
    sampler = MixtureSampler(names, phases)
    drawn = [sampler.take(s, 3)[0].tolist() for s in range(total)]
    assert drawn[step - 1] == [0, 0, 0] and drawn[step] == [1, 1, 1]
    ramp = resolve([{"start": 0, "weights": {"text": 1}}, {"start": 1, "weights": {"code": 1}, "ramp": fraction}],
                   names, {}, total)
    assert ramp[1].ramp == step


@pytest.mark.parametrize("shorthand", [s for s in SHORTHANDS if s != "constant"] + ["cooldown(fraction=0.3)"])
def test_a_shorthand_too_short_for_its_phases_says_how_many_steps_it_needs(shorthand):
    names, weights = ["text", "code"], {"text": 2, "code": 1}
    needed = {"cooldown": 2, "code_then_text": 2, "balanced_then_text": 2}.get(shorthand.split("(")[0], 4)
    with pytest.raises(ScheduleError, match=rf"data.schedule='{re.escape(shorthand)}' has \d phases and needs "
                                            rf"train.steps >= {needed} .* the run has {needed - 1} steps"):
        resolve(shorthand, names, weights, needed - 1)
    for total in range(needed, 60):  # from there on, every phase has a step of its own
        phases = resolve(shorthand, names, weights, total)
        starts = [p.start for p in phases] + [total]
        assert all(a < b for a, b in zip(starts, starts[1:])), (total, starts)


def test_a_shorthand_option_that_empties_a_phase_is_rejected():
    for spec in ("cooldown(fraction=0)", "code_then_text(switch=1)"):
        with pytest.raises(ScheduleError, match=re.escape(spec) + " leaves one phase with no steps"):
            resolve(spec, ["text", "code"], {"text": 1, "code": 1}, 100)
