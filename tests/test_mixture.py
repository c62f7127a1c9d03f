"""The sampler against a direct float64 computation of the schedule, written here from the
phases' numbers (never from the code's `Phase` objects): per-phase counts stay within Tijdeman's
bound of the integral of the weights at every prefix, whole phases get the largest-remainder
apportionment, and mixing by units (tokens) stays within one sample's units of each source's
share at every prefix."""
import json
import re

import numpy as np
import pytest

from megatron_code.data.mixture import MixtureSampler
from megatron_code.data.schedule import SHORTHANDS, ScheduleError, resolve


def per_sample_weights(spec: list[tuple], names: list[str], total_steps: int, batch: int) -> tuple[np.ndarray, list]:
    """(samples x sources) mean weight of each source over each sample of the run, and each
    phase's first sample. `spec`: (start step, {name: weight}, ramp steps) per phase; weights are
    normalized here; a ramp moves linearly, sample by sample, from the previous phase's weights."""
    weights = [np.array([w.get(n, 0.0) for n in names], dtype=np.float64) for _, w, _ in spec]
    weights = [w / w.sum() for w in weights]
    starts = [s for s, _, _ in spec] + [total_steps]
    rows, firsts = [], []
    for i, (start, _, ramp) in enumerate(spec):
        firsts.append(start * batch)
        span = ramp * batch
        a, b = (weights[i - 1] if ramp else weights[i]), weights[i]
        for k in range((starts[i + 1] - start) * batch):  # a ramp ends at a sample boundary
            rows.append(a + (b - a) * (k + 0.5) / span if k < span else b)  # linear over a sample: the midpoint's
    return np.array(rows), firsts


def largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    exact = total * shares
    counts = np.floor(exact).astype(np.int64)
    for d in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[d] += 1
    return counts


def draw(phases, names, total_steps, batch, units=None):
    """Sources of every sample; with `units` (one array of sample sizes per source), mixing by units."""
    sampler, used, out = MixtureSampler(names, phases), [0] * len(names), []
    for step in range(total_steps):
        by_units = () if units is None else ([u[p:] for u, p in zip(units, used)],)
        sources, _ = sampler.take(step, batch, *by_units)
        for d in sources:
            used[d] += 1
        out.append(sources)
    return np.concatenate(out)


def check_samples(spec, names, total_steps, batch) -> np.ndarray:
    sources = draw(resolve([{"start": s, "weights": w, "ramp": r} for s, w, r in spec], names, {}, total_steps),
                   names, total_steps, batch)
    weights, firsts = per_sample_weights(spec, names, total_steps, batch)
    bounds = firsts + [len(sources)]
    for lo, hi in zip(bounds, bounds[1:]):
        counts = np.cumsum(np.eye(len(names), dtype=np.int64)[sources[lo:hi]], 0)
        targets = np.cumsum(weights[lo:hi], 0)
        m = int((weights[lo:hi].max(0) > 0).sum())
        bound = 1 - 1 / (2 * m - 2) if m > 1 else 0.0
        assert np.abs(counts - targets).max() <= bound + 1e-9, (lo, np.abs(counts - targets).max(), bound)
        assert (counts[-1][weights[lo:hi].max(0) == 0] == 0).all()  # a weight-0 source is never drawn
    return sources


MA = {"uniform": [(5, 3)] * 4, "stepwise_increase": [(7, 3), (7, 3), (6, 4), (5, 5)],
      "stepwise_decrease": [(5, 5), (6, 4), (7, 3), (7, 3)]}
"""Ma et al.'s text:code per quarter of the run."""


@pytest.mark.parametrize("shorthand", SHORTHANDS)
def test_every_shorthand_gives_each_phase_the_largest_remainder_apportionment(shorthand):
    """40 steps of 12 samples; text 2, code 1 are the sources' own weights."""
    names = ["text", "code"]
    spec = {"constant": [(0, {"text": 2, "code": 1}, 0)],
            "cooldown": [(0, {"text": 2, "code": 1}, 0), (36, {"text": 0.8, "code": 0.2}, 0)],
            "code_then_text": [(0, {"code": 1}, 0), (20, {"text": 0.9, "code": 0.1}, 0)],
            "balanced_then_text": [(0, {"text": 1, "code": 1}, 0), (20, {"text": 0.9, "code": 0.1}, 0)],
            **{name: [(10 * i, {"text": t, "code": c}, 0) for i, (t, c) in enumerate(ratios)]
               for name, ratios in MA.items()}}[shorthand]
    phases = resolve(shorthand, names, {"text": 2, "code": 1}, total_steps=40)
    assert [(p.start, p.weights) for p in phases] == [
        (s, {n: v / sum(w.values()) for n, v in w.items()}) for s, w, _ in spec]
    sources = check_samples(spec, names, 40, batch=12)
    bounds = [12 * s for s, _, _ in spec] + [480]
    for (lo, hi), (_, w, _) in zip(zip(bounds, bounds[1:]), spec):
        shares = np.array([w.get("text", 0), w.get("code", 0)], dtype=np.float64)
        expected = largest_remainder(hi - lo, shares / shares.sum())
        assert np.bincount(sources[lo:hi], minlength=2).tolist() == expected.tolist()


@pytest.mark.parametrize("seed", range(6))
def test_random_schedules_with_ramps_stay_within_the_bound(seed):
    rng = np.random.default_rng(seed)
    names = [f"s{i}" for i in range(int(rng.integers(2, 8)))]

    def weights():
        w = rng.random(len(names)) * (rng.random(len(names)) < 0.7)
        w[int(rng.integers(len(names)))] += 0.1
        return {n: float(x) for n, x in zip(names, w)}

    spec = [(0, weights(), 0), (7, weights(), int(rng.integers(1, 20))), (30, weights(), 0)]
    check_samples(spec, names, 60, batch=int(rng.integers(1, 17)))


@pytest.mark.parametrize("seed", range(8))
def test_mixing_by_units_stays_within_one_sample_of_each_share(seed):
    """Samples of 1 to 2 x 10^k units per source (k per source, up to 3): at every prefix of every
    phase, each source's units are within the largest sample's units of its share (the sum over
    the samples drawn of its weight times their units), and less than its own largest sample
    ahead of it."""
    rng = np.random.default_rng(seed)
    names = [f"s{i}" for i in range(int(rng.integers(2, 7)))]

    def weights():
        w = rng.random(len(names)) * (rng.random(len(names)) < 0.8)
        w[int(rng.integers(len(names)))] += 0.05
        return {n: float(x) for n, x in zip(names, w)}

    steps, batch = 30, int(rng.integers(1, 17))
    spec = [(0, weights(), 0), (9, weights(), int(rng.integers(1, 15)))]
    units = [rng.integers(1, 3, size=steps * batch + 1) * 10 ** int(rng.integers(0, 4)) for _ in names]
    phases = resolve([{"start": s, "weights": w, "ramp": r} for s, w, r in spec], names, {}, steps)
    sources = draw(phases, names, steps, batch, units)
    weights, firsts = per_sample_weights(spec, names, steps, batch)
    sizes, used = np.empty(len(sources), dtype=np.int64), [0] * len(names)
    for j, d in enumerate(sources):
        sizes[j], used[d] = units[d][used[d]], used[d] + 1
    largest = max(int(u.max()) for u in units)
    own = np.array([int(u.max()) for u in units])
    for lo, hi in zip(firsts, firsts[1:] + [len(sources)]):
        served = np.cumsum(np.eye(len(names), dtype=np.int64)[sources[lo:hi]] * sizes[lo:hi, None], 0)
        share = np.cumsum(weights[lo:hi] * sizes[lo:hi, None], 0)
        assert (served - share).max() < own[(served - share).argmax() % len(names)]
        assert np.abs(served - share).max() <= largest, (np.abs(served - share).max(), largest)


def test_mixing_by_units_with_equal_sizes_is_mixing_by_samples_within_one_sample():
    names = ["text", "code", "math"]
    spec = [(0, {"text": 5, "code": 3, "math": 1}, 0)]
    phases = resolve([{"start": 0, "weights": spec[0][1]}], names, {}, 20)
    sources = draw(phases, names, 20, 9, [np.full(200, 64)] * 3)
    targets = np.cumsum(per_sample_weights(spec, names, 20, 9)[0], 0)
    assert np.abs(np.cumsum(np.eye(3)[sources], 0) - targets).max() < 1


@pytest.mark.parametrize("by_units", [False, True])
def test_resume_mid_phase_and_mid_ramp_gives_the_same_samples(by_units):
    names = ["text", "code", "math"]
    phases = resolve([{"start": 0, "weights": {"text": 5, "code": 3}},
                      {"start": 10, "weights": {"text": 1, "code": 1, "math": 2}, "ramp": 8}], names, {}, 30)
    units = [np.random.default_rng(d).integers(10, 300, size=300) for d in range(3)] if by_units else None

    def run(sampler, steps, used):
        out = []
        for step in steps:
            got = sampler.take(step, 7, *(() if units is None else ([u[p:] for u, p in zip(units, used)],)))
            for d in got[0]:
                used[d] += 1
            out.append(got)
        return out

    expected = run(MixtureSampler(names, phases), range(30), [0] * 3)
    for stop in (5, 13):  # inside phase 0; inside phase 1's ramp
        first, used = MixtureSampler(names, phases), [0] * 3
        run(first, range(stop), used)
        resumed = MixtureSampler(names, phases)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for got, want in zip(run(resumed, range(stop, 30), used), expected[stop:]):
            assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_zero_weight_source_listed_first_is_never_drawn():
    names = ["valid_only", "a", "b", "c"]
    sources = check_samples([(0, {"valid_only": 0, "a": 1, "b": 1, "c": 1}, 0)], names, 10, batch=5)
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
