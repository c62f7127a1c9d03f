"""Mixture schedules: which weights apply from which step, as resolved phases.

A schedule is given as a list of phases or as a shorthand (`stepwise_increase`,
`cooldown(fraction=0.1, code_share=0.2)`, ...) that expands to phases. A phase is
`{start, weights, ramp}` or `{start, adaptive: {...}}`: `start` and `ramp` are steps, or
fractions of train.steps when below 1, floored to a step (x of N steps is step floor(x * N),
computed on the decimal the user wrote, so 0.29 of 100 is step 29). An adaptive phase sets its
weights from the run's own losses (see data/adaptive.py).

Every step number counts optimizer steps done: a phase with `start: s` begins once s steps are
done, so it feeds the (s+1)-th optimizer step, whose record in metrics.jsonl has `step: s + 1`.

Resolving turns a schedule into `Phase`s with absolute steps and weights normalized over the
sources' names, and refuses what cannot run as written (a phase at or after the end, a ramp cut
short by the next phase or the end). Each phase remembers the run length its fractions were
resolved against, and a resume resolves the same fractions of started phases against it again:
a change of train.steps never moves a boundary already passed. A resolved schedule is JSON-able,
so the checkpoint keeps the one that applied. `merge` accepts an edit only when every trained
step keeps the weights it had; the steps an edit would rewrite are found by comparing the two
schedules step by step (`conflict`).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import yaml

from megatron_code.config.data import AdaptiveConfig

WEIGHT_TOLERANCE = 1e-12
"""Two schedules agree on a step when each source's mean weight over it differs by less."""


class ScheduleError(ValueError):
    """A schedule the user must fix; the message names the field."""


@dataclass(frozen=True)
class Phase:
    start: int
    """First step of the phase."""
    weights: dict[str, float]
    """Normalized weight per source name (sources it does not name have weight 0); an adaptive
    phase's prior weights."""
    ramp: int = 0
    """Steps over which the weights move linearly from `ramp_from` to `weights`."""
    ramp_from: dict[str, float] = field(default_factory=dict)
    """The weights at the phase's start (empty without a ramp)."""
    adaptive: dict = field(default_factory=dict)
    """Online mixing options (data/adaptive.py: method, every, smoothing, min_weight); empty for
    fixed weights."""
    given: dict = field(default_factory=dict, compare=False)
    """`start` and `ramp` as the user wrote them, and `steps`: the train.steps their fractions
    were resolved against."""

    def weight_at(self, name: str, step: float) -> float:
        """The scheduled weight of a source `step` steps into the phase."""
        target = self.weights.get(name, 0.0)
        if not self.ramp or step >= self.ramp:
            return target
        a = self.ramp_from.get(name, 0.0)
        return a + (target - a) * step / self.ramp

    def describe(self) -> str:
        if self.adaptive:
            options = ", ".join(f"{k} {v}" for k, v in self.adaptive.items())
            prior = ", ".join(f"{n} {w:.3f}" for n, w in self.weights.items() if w > 0)
            return f"from step {self.start}: adaptive ({options}) from {prior}"
        mix = ", ".join(f"{n} {w:.3f}" for n, w in self.weights.items() if w > 0)
        ramp = f" (linear ramp over {self.ramp} steps)" if self.ramp else ""
        return f"from step {self.start}: {mix}{ramp}"


def phases_to_json(phases: list[Phase]) -> list[dict]:
    return [asdict(p) for p in phases]


def phases_from_json(values: list[dict]) -> list[Phase]:
    return [Phase(int(v["start"]), dict(v["weights"]), int(v.get("ramp", 0)), dict(v.get("ramp_from", {})),
                  dict(v.get("adaptive", {})), dict(v.get("given", {}))) for v in values]


# --------------------------------------------------------------------------------- shorthands

# Ma et al. (ICLR 2024): four equal phases, text:code per phase.
_MA_PHASES = {
    "uniform": [(5, 3), (5, 3), (5, 3), (5, 3)],
    "stepwise_increase": [(7, 3), (7, 3), (6, 4), (5, 5)],
    "stepwise_decrease": [(5, 5), (6, 4), (7, 3), (7, 3)],
}
SHORTHANDS = ("constant", *_MA_PHASES, "cooldown", "code_then_text", "balanced_then_text")
_SHORTHAND_OPTIONS = {
    "constant": {},
    **{name: {"text": "text", "code": "code"} for name in _MA_PHASES},
    # Aryabumi et al. (Cohere): the last 10% of tokens with 20% code, LR annealed linearly.
    "cooldown": {"text": "text", "code": "code", "fraction": 0.1, "code_share": 0.2},
    # Their initializations: half the tokens on code (or 50% code), then text with 10% code.
    "code_then_text": {"text": "text", "code": "code", "switch": 0.5, "code_share": 0.1},
    "balanced_then_text": {"text": "text", "code": "code", "switch": 0.5, "code_share": 0.1},
}


def parse_shorthand(spec: str, where: str = "data.schedule") -> tuple[str, dict]:
    """`name` or `name(key=value, ...)` -> (name, options with defaults filled in)."""
    match = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", spec)
    if not match or match.group(1) not in SHORTHANDS:
        raise ScheduleError(f"{where}={spec!r} is not a list of phases or one of {', '.join(SHORTHANDS)} "
                            "(options as name(key=value, ...))")
    name, args = match.group(1), match.group(2)
    options = dict(_SHORTHAND_OPTIONS[name])
    for item in filter(None, (a.strip() for a in (args or "").split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in options:
            raise ScheduleError(f"{where}: {name} has no option {key!r} (options: {', '.join(options) or 'none'})")
        if isinstance(options[key], float):
            try:
                options[key] = float(value)
            except ValueError:
                raise ScheduleError(f"{where}: {name}({key}=...) must be a number, got {value.strip()!r}") from None
            if not 0 <= options[key] <= 1:
                raise ScheduleError(f"{where}: {name}({key}={options[key]}) must be between 0 and 1")
            if key in ("fraction", "switch") and options[key] in (0, 1):
                raise ScheduleError(f"{where}: {name}({key}={options[key]:g}) leaves one phase with no steps: "
                                    f"give a fraction strictly between 0 and 1 (or use `constant`)")
        else:
            options[key] = value.strip()
    return name, options


def expand_shorthand(spec: str, source_weights: dict[str, float], where: str = "data.schedule") -> list[dict]:
    """The phases a shorthand stands for, as raw phase dicts (starts as fractions of the run)."""
    name, o = parse_shorthand(spec, where)
    if name == "constant":
        return [{"start": 0, "weights": dict(source_weights)}]
    text, code = o["text"], o["code"]
    if name in _MA_PHASES:
        return [{"start": i / 4, "weights": {text: t, code: c}} for i, (t, c) in enumerate(_MA_PHASES[name])]
    if name == "cooldown":
        return [{"start": 0, "weights": dict(source_weights)},
                {"start": 1 - o["fraction"], "weights": {text: 1 - o["code_share"], code: o["code_share"]}}]
    first = {code: 1.0} if name == "code_then_text" else {text: 0.5, code: 0.5}
    return [{"start": 0, "weights": first},
            {"start": o["switch"], "weights": {text: 1 - o["code_share"], code: o["code_share"]}}]


# --------------------------------------------------------------------------------- resolving

def is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


def _steps(value, total_steps: int, where: str) -> int:
    """A step count given as an integer, or as a fraction (0 < x < 1) of the run: the step
    floor(x * total_steps), exact for the decimal written (a float's 0.29 * 100 is 28.999...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(f"{where} must be a step or a fraction of train.steps, got {value!r}")
    if value < 0:
        raise ScheduleError(f"{where} must be >= 0, got {value}")
    if 0 < value < 1:
        return math.floor(_decimal(value) * total_steps)
    if float(value) != int(value):
        raise ScheduleError(f"{where}={value} is neither a fraction below 1 nor a whole step")
    return int(value)


def _decimal(value: float) -> Fraction:
    """The number as written (its shortest repr), exactly."""
    return Fraction(repr(value))


def shorthand_min_steps(phases: list[dict]) -> int:
    """The fewest steps from which on a shorthand's fractional starts floor to distinct steps,
    every phase at least one step long: 1 / (the smallest gap between starts), rounded up (the
    last phase always has a step: floor(x * N) < N for x < 1)."""
    starts = sorted({_decimal(p["start"]) for p in phases})
    return max(math.ceil(1 / (b - a)) for a, b in zip(starts, starts[1:]))


ADAPTIVE_METHODS = ("odm",)
ADAPTIVE_DEFAULTS = {k: v for k, v in asdict(AdaptiveConfig()).items() if k != "prior"}
"""Options of an adaptive phase besides `prior` (config/data.py says what each does)."""


def _adaptive_options(raw, names: list[str], source_weights: dict[str, float], total_steps: int,
                      where: str) -> tuple[dict, dict]:
    """(options, prior weights) of an `adaptive:` mapping, validated."""
    if not isinstance(raw, dict):
        raise ScheduleError(f"{where} must be a mapping of options ({', '.join([*ADAPTIVE_DEFAULTS, 'prior'])}), "
                            f"got {raw!r}")
    unknown = sorted(set(raw) - {*ADAPTIVE_DEFAULTS, "prior"})
    if unknown:
        raise ScheduleError(f"unknown field {where}.{unknown[0]} (known: {', '.join([*ADAPTIVE_DEFAULTS, 'prior'])})")
    options = {**ADAPTIVE_DEFAULTS, **{k: v for k, v in raw.items() if k != "prior" and v is not None}}
    if options["method"] not in ADAPTIVE_METHODS:
        raise ScheduleError(f"{where}.method={options['method']!r} is not one of {', '.join(ADAPTIVE_METHODS)}")
    every = options["every"]
    options["every"] = max(1, _steps(every, total_steps, f"{where}.every")) if is_fraction(every) else \
        _steps(every, total_steps, f"{where}.every")
    if options["every"] < 1:
        raise ScheduleError(f"{where}.every must be at least one step, got {every!r}")
    for key in ("smoothing", "min_weight"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ScheduleError(f"{where}.{key} must be a number in [0, 1), got {value!r}")
        options[key] = float(value)
    prior = raw.get("prior") or {n: w for n, w in source_weights.items()}
    _check_weights(prior, names, f"{where}.prior")
    sources = sum(1 for w in prior.values() if w > 0)
    if options["min_weight"] * sources > 1:
        raise ScheduleError(f"{where}.min_weight={options['min_weight']:g} x {sources} sources exceeds 1")
    return options, prior


def _check_weights(weights, names: list[str], where: str) -> None:
    if not isinstance(weights, dict) or not weights:
        raise ScheduleError(f"{where} must map source names to weights, got {weights!r}")
    for name, w in weights.items():
        if name not in names:
            raise ScheduleError(f"{where}.{name}: unknown source (data.sources has {', '.join(names)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 or w != w:
            raise ScheduleError(f"{where}.{name} must be a number >= 0, got {w!r}")
    if sum(weights.values()) <= 0:
        raise ScheduleError(f"{where} are all zero: a phase needs a source to draw from")


def resolve(raw, source_names: list[str], source_weights: dict[str, float], total_steps: int,
            where: str = "data.schedule", history: list[Phase] = (), check_end: bool = True) -> list[Phase]:
    """Validate a schedule (a shorthand string or a list of phase dicts) and resolve it to phases.

    An empty schedule is `constant`: the sources' own weights from step 0. `history`: phases of
    the checkpoint that have started; a start written as the fraction one of them was written
    with resolves, with that phase's ramp, against the train.steps that phase was resolved
    against. `check_end=False` skips the checks against the run's end (train.steps not known yet)."""
    shorthand = None
    if isinstance(raw, str):
        shorthand, raw = raw.strip(), expand_shorthand(raw, source_weights, where)
    if not raw:
        raw = expand_shorthand("constant", source_weights, where)
    if not isinstance(raw, list):
        raise ScheduleError(f"{where} must be a list of phases or a shorthand name, got {raw!r}")
    pinned = {repr(p.given["start"]): p.given["steps"] for p in history if "start" in p.given}

    def run_length(start) -> int:
        return pinned.get(repr(start), total_steps) if is_fraction(start) else total_steps

    if shorthand is not None:
        starts = [_steps(p["start"], run_length(p["start"]), where) for p in raw]
        if any(a >= b for a, b in zip(starts, starts[1:])):
            raise ScheduleError(f"{where}={shorthand!r} has {len(raw)} phases and needs train.steps >= "
                                f"{shorthand_min_steps(raw)} to give each a step of its own; the run has "
                                f"{total_steps} steps (phase starts floor(fraction x steps) = {starts})")
    phases: list[Phase] = []
    labels = [f"{where}[{i}]" if shorthand is None else f"{where} ({shorthand}) phase {i}" for i in range(len(raw))]
    for i, item in enumerate(raw):
        at = labels[i]
        if hasattr(item, "__dataclass_fields__"):  # a PhaseConfig
            item = asdict(item)
            if item["adaptive"] is None:
                del item["adaptive"]
        if not isinstance(item, dict):
            raise ScheduleError(f"{at} must be a mapping {{start, weights, ramp}} or {{start, adaptive}}, "
                                f"got {item!r}")
        unknown = sorted(set(item) - {"start", "weights", "ramp", "adaptive"})
        if unknown:
            raise ScheduleError(f"unknown field {at}.{unknown[0]} (known: start, weights, ramp, adaptive)")
        given_start, given_ramp = item.get("start", 0), item.get("ramp", 0)
        steps = run_length(given_start)
        start = _steps(given_start, steps, f"{at}.start")
        ramp = _steps(given_ramp, steps, f"{at}.ramp")
        adaptive, weights = {}, item.get("weights")
        if item.get("adaptive") is not None:
            if weights:
                raise ScheduleError(f"{at}: give weights or adaptive, not both (adaptive.prior sets its first weights)")
            if ramp:
                raise ScheduleError(f"{at}.ramp: an adaptive phase sets its own weights and has no ramp")
            adaptive, weights = _adaptive_options(item["adaptive"], source_names, source_weights, steps,
                                                  f"{at}.adaptive")
        else:
            _check_weights(weights, source_names, f"{at}.weights")
        if i == 0 and start != 0:
            raise ScheduleError(f"{at}.start must be 0: the first phase starts the run, got step {start}")
        if phases and start <= phases[-1].start:
            raise ScheduleError(f"{at}.start (step {start}) must come after {where}[{i - 1}].start "
                                f"(step {phases[-1].start}): phases are in order")
        if ramp and not phases:
            raise ScheduleError(f"{at}.ramp: the first phase has no previous weights to ramp from")
        if ramp and phases[-1].adaptive:
            raise ScheduleError(f"{at}.ramp: the previous phase is adaptive, so there are no fixed weights to ramp "
                                "from; start this phase without a ramp")
        total = float(sum(weights.values()))
        normalized = {n: float(w) / total for n, w in weights.items()}
        phases.append(Phase(start, normalized, ramp, dict(phases[-1].weights) if ramp else {}, adaptive,
                            {"start": given_start, "ramp": given_ramp, "steps": steps}))
    if check_end:
        check_fits(phases, total_steps, labels=labels)
    return phases


def check_fits(phases: list[Phase], total_steps: int, where: str = "data.schedule",
               labels: list[str] | None = None) -> None:
    """Every phase starts before the end of the run, and every ramp reaches its weights before
    the next phase or the end. `labels` name the phases (default `where[i]`)."""
    for i, p in enumerate(phases):
        at = labels[i] if labels else f"{where}[{i}]"
        if p.start >= total_steps:
            raise ScheduleError(f"{at}.start is step {p.start}, at or after the end of the run (train.steps="
                                f"{total_steps}): the phase would never be drawn")
        if i + 1 < len(phases):
            end, until = phases[i + 1].start, f"the next phase starts (step {phases[i + 1].start})"
        else:
            end, until = total_steps, f"the run ends (train.steps={total_steps})"
        if p.start + p.ramp > end:
            raise ScheduleError(f"{at}.ramp of {p.ramp} steps from step {p.start} ends at step {p.start + p.ramp}, "
                                f"after {until}: the weights would stop {(end - p.start) / p.ramp:.0%} of the way")


def describe(phases: list[Phase]) -> list[str]:
    return [f"phase {i}: {p.describe()}" for i, p in enumerate(phases)]


def diff(old: list[Phase], new: list[Phase]) -> str:
    """A readable diff of two schedules (unified, one line per phase)."""
    lines = difflib.unified_diff(describe(old), describe(new), "old schedule", "new schedule", lineterm="", n=1)
    return "\n".join(lines)


def phase_index(phases: list[Phase], step: int) -> int:
    return max(i for i, p in enumerate(phases) if p.start <= step)


# --------------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class Conflict:
    """Where two schedules disagree on trained steps."""
    first: int
    last: int
    """First and last trained step whose weights would change."""
    old: int
    new: int
    """The phases (indices into each schedule) that cover step `first`."""

    def describe(self, old: list[Phase], new: list[Phase]) -> str:
        return (f"steps {self.first}..{self.last} were trained as [{old[self.old].describe()}], the new schedule makes "
                f"them [{new[self.new].describe()}] (its phase {self.new})")


def _step_key(phases: list[Phase], step: int, names: list[str]) -> tuple:
    """What a schedule says about one step: an adaptive phase by its identity, fixed weights by
    each source's mean weight over the step."""
    p = phases[phase_index(phases, step)]
    if p.adaptive:
        return ("adaptive", p.start, tuple(sorted(p.adaptive.items())), tuple(sorted(p.weights.items())))
    x = step - p.start
    return tuple((p.weight_at(n, x) + p.weight_at(n, x + 1)) / 2 for n in names)


def _same(a: tuple, b: tuple) -> bool:
    if not a or not b or isinstance(a[0], str) or isinstance(b[0], str):
        return a == b
    return all(abs(x - y) <= WEIGHT_TOLERANCE for x, y in zip(a, b))


def conflict(old: list[Phase], new: list[Phase], now: int) -> Conflict | None:
    """The trained steps (before `now`) on which `new` gives other weights than `old`, or None.

    Within a stretch between consecutive phase starts and ramp ends of either schedule, each
    step's mean weight is linear in the step, so comparing a stretch's first and last steps
    decides it, and finds its first and last differing steps."""
    names = sorted({n for p in (*old, *new) for n in (*p.weights, *p.ramp_from)})
    marks = sorted({0, now, *(x for p in (*old, *new) for x in (p.start, p.start + p.ramp) if 0 < x < now)})
    differing = []
    for lo, hi in zip(marks, marks[1:]):
        ends = [lo, hi - 1]
        same = [_same(_step_key(old, s, names), _step_key(new, s, names)) for s in ends]
        if all(same):
            continue
        first = lo if not same[0] else lo + 1
        last = hi - 1 if not same[1] else hi - 2
        differing.append((first, last))
    if not differing:
        return None
    first, last = differing[0][0], differing[-1][1]
    return Conflict(first, last, phase_index(old, first), phase_index(new, first))


def restrict(phase: Phase, start: int) -> Phase:
    """The part of a fixed-weight phase from step `start` on, as a phase of its own."""
    x = start - phase.start
    if not phase.ramp or x >= phase.ramp:
        return replace(phase, start=start, ramp=0, ramp_from={})
    return replace(phase, start=start, ramp=phase.ramp - x,
                   ramp_from={n: phase.weight_at(n, x) for n in {*phase.weights, *phase.ramp_from}})


def same_weights(a: dict[str, float], b: dict[str, float]) -> bool:
    return all(abs(a.get(n, 0.0) - b.get(n, 0.0)) <= WEIGHT_TOLERANCE for n in {*a, *b})


def _same_phase(a: Phase, b: Phase) -> bool:
    if a.adaptive or b.adaptive:
        return a == b
    return (a.start == b.start and a.ramp == b.ramp and same_weights(a.weights, b.weights)
            and same_weights(a.ramp_from, b.ramp_from))


def merge(current: list[Phase], edited: list[Phase], now: int) -> list[Phase]:
    """The schedule to run from step `now` when `edited` replaces `current`: `current`'s phases
    that started before `now` (the sampler's counts refer to them), then `edited`'s from `now`
    on. When the phase in progress goes on differently in `edited` (a ramp, or weights from a
    step not yet trained), it is split at `now`. Raises ScheduleError when the edit gives a
    trained step other weights (`conflict`)."""
    found = conflict(current, edited, now)
    if found is not None:
        raise ScheduleConflictError(found, current, edited)
    past = [p for p in current if p.start < now]
    if not past:
        return edited
    future = [p for p in edited if p.start >= now]
    if future and future[0].start == now:
        return past + future
    going_on = edited[phase_index(edited, now)]
    if past[-1].adaptive or going_on.adaptive or _same_phase(restrict(past[-1], now), restrict(going_on, now)):
        return past + future  # (the same adaptive phase: `conflict` compared their identity)
    return past + [restrict(going_on, now)] + future


class ScheduleConflictError(ScheduleError):
    """An edit that would give trained steps other weights; `found` says where."""

    def __init__(self, found: Conflict, old: list[Phase], new: list[Phase]):
        self.found = found
        super().__init__(f"the new schedule rewrites trained steps: {found.describe(old, new)}")


def planned_samples(phases: list[Phase], names: list[str], from_step: int, total_steps: int,
                    batch_size: int) -> dict[str, float]:
    """An upper bound on the samples each source serves from `from_step` to the end of the run:
    the integral of its weights plus one sample per phase (an adaptive phase may give any source
    of its prior every sample)."""
    out = dict.fromkeys(names, 0.0)
    for i, p in enumerate(phases):
        end = min(phases[i + 1].start if i + 1 < len(phases) else total_steps, total_steps)
        first = max(p.start, from_step)
        if end <= first:
            continue
        for name in names:
            if p.adaptive:
                out[name] += (end - first) * batch_size if p.weights.get(name, 0) > 0 else 0
                continue
            # the weight is linear during the ramp and constant after: the trapezoid rule is exact
            points = sorted({first - p.start, end - p.start, *([p.ramp] if first - p.start < p.ramp < end - p.start
                                                                 else [])})
            area = sum((b - a) * (p.weight_at(name, a) + p.weight_at(name, b)) / 2
                       for a, b in zip(points, points[1:]))
            if area > 0:
                out[name] += area * batch_size + 1
    return out


def read_schedule_file(path: str | Path) -> str | list:
    """The schedule a `data.schedule_file` holds: a list of phases or a shorthand, bare or under
    a `schedule:` key. A YAML error is one line naming the file, line and column."""
    path = Path(path)
    where = f"data.schedule_file={path}"
    if not path.is_file():
        raise ScheduleError(f"{where} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ScheduleError(f"{at}: invalid YAML in data.schedule_file: {what}") from None
    except UnicodeDecodeError as e:
        raise ScheduleError(f"{where}: not a text file ({e.reason} at byte {e.start})") from None
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"schedule"})
        if unknown:
            raise ScheduleError(f"{where}: unknown key {unknown[0]!r} (the file holds `schedule:`)")
        raw = raw.get("schedule")
    if not isinstance(raw, (list, str)):
        raise ScheduleError(f"{where} must hold a list of phases or a shorthand name, got {raw!r}")
    return raw


def configured_schedule(data, total_steps: int, history: list[Phase] = (), check_end: bool = True
                        ) -> tuple[list[Phase], bool]:
    """(phases, explicit) for a DataConfig: from data.schedule_file, data.schedule, or the
    sources' own weights (`explicit` False: no schedule was given)."""
    names = [s.name for s in data.sources]
    weights = {s.name: s.weight for s in data.sources}
    if data.schedule_file:
        if data.schedule:
            raise ScheduleError("give data.schedule or data.schedule_file, not both")
        return resolve(read_schedule_file(data.schedule_file), names, weights, total_steps,
                       f"data.schedule_file={data.schedule_file}", history, check_end), True
    return resolve(data.schedule, names, weights, total_steps, history=history, check_end=check_end), \
        bool(data.schedule)
