"""Mixture schedules: which weights apply from which step, as resolved phases.

A schedule is given as a list of phases (`{start, weights, ramp}`: `start` and `ramp` are steps,
or fractions of train.steps when below 1, floored to a step: x of N steps is step floor(x * N),
computed on the decimal the user wrote, so 0.29 of 100 is step 29) or as a shorthand (`stepwise_increase`,
`cooldown(fraction=0.1, code=0.2)`, ...) that expands to phases. Resolving turns it into
`Phase`s with absolute steps and weights normalized over the sources' names; a resolved schedule
is JSON-able, so the checkpoint keeps the one that applied. `merge` accepts an edit only when
every step already trained keeps the phase it had: started phases are frozen, the future is free.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import yaml


class ScheduleError(ValueError):
    """A schedule the user must fix; the message names the field."""


@dataclass(frozen=True)
class Phase:
    start: int
    """First step of the phase."""
    weights: dict[str, float]
    """Normalized weight per source name (sources it does not name have weight 0)."""
    ramp: int = 0
    """Steps over which the weights move linearly from `ramp_from` to `weights`."""
    ramp_from: dict[str, float] = field(default_factory=dict)
    """The previous phase's weights (empty without a ramp)."""

    def weight_at(self, name: str, step: float) -> float:
        """The scheduled weight of a source `step` steps into the phase."""
        target = self.weights.get(name, 0.0)
        if not self.ramp or step >= self.ramp:
            return target
        a = self.ramp_from.get(name, 0.0)
        return a + (target - a) * step / self.ramp

    def describe(self) -> str:
        mix = ", ".join(f"{n} {w:.3f}" for n, w in self.weights.items() if w > 0)
        ramp = f" (linear ramp over {self.ramp} steps)" if self.ramp else ""
        return f"from step {self.start}: {mix}{ramp}"


def phases_to_json(phases: list[Phase]) -> list[dict]:
    return [asdict(p) for p in phases]


def phases_from_json(values: list[dict]) -> list[Phase]:
    return [Phase(int(v["start"]), dict(v["weights"]), int(v.get("ramp", 0)), dict(v.get("ramp_from", {})))
            for v in values]


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


def resolve(raw, source_names: list[str], source_weights: dict[str, float], total_steps: int,
            where: str = "data.schedule") -> list[Phase]:
    """Validate a schedule (a shorthand string or a list of phase dicts) and resolve it to phases.

    An empty schedule is `constant`: the sources' own weights from step 0."""
    if isinstance(raw, str):
        shorthand, raw = raw.strip(), expand_shorthand(raw, source_weights, where)
        starts = [_steps(p["start"], total_steps, where) for p in raw]
        if any(a >= b for a, b in zip(starts, starts[1:])):
            raise ScheduleError(f"{where}={shorthand!r} has {len(raw)} phases and needs train.steps >= "
                                f"{shorthand_min_steps(raw)} to give each a step of its own; the run has "
                                f"{total_steps} steps (phase starts floor(fraction x steps) = {starts})")
        where = f"{where} ({shorthand})"
    if not raw:
        raw = expand_shorthand("constant", source_weights, where)
    if not isinstance(raw, list):
        raise ScheduleError(f"{where} must be a list of phases or a shorthand name, got {raw!r}")
    phases: list[Phase] = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if hasattr(item, "__dataclass_fields__"):
            item = asdict(item)
        if not isinstance(item, dict):
            raise ScheduleError(f"{at} must be a mapping {{start, weights, ramp}}, got {item!r}")
        unknown = sorted(set(item) - {"start", "weights", "ramp"})
        if unknown:
            raise ScheduleError(f"unknown field {at}.{unknown[0]} (known: start, weights, ramp)")
        start = _steps(item.get("start", 0), total_steps, f"{at}.start")
        ramp = _steps(item.get("ramp", 0), total_steps, f"{at}.ramp")
        weights = item.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise ScheduleError(f"{at}.weights must map source names to weights, got {weights!r}")
        for name, w in weights.items():
            if name not in source_names:
                raise ScheduleError(f"{at}.weights.{name}: unknown source (data.sources has "
                                    f"{', '.join(source_names)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 or w != w:
                raise ScheduleError(f"{at}.weights.{name} must be a number >= 0, got {w!r}")
        total = float(sum(weights.values()))
        if total <= 0:
            raise ScheduleError(f"{at}.weights are all zero: a phase needs a source to draw from")
        if i == 0 and start != 0:
            raise ScheduleError(f"{at}.start must be 0: the first phase starts the run, got step {start}")
        if phases and start <= phases[-1].start:
            raise ScheduleError(f"{at}.start (step {start}) must come after {where}[{i - 1}].start "
                                f"(step {phases[-1].start}): phases are in order")
        if ramp and not phases:
            raise ScheduleError(f"{at}.ramp: the first phase has no previous weights to ramp from")
        normalized = {n: float(w) / total for n, w in weights.items()}
        phases.append(Phase(start, normalized, ramp, dict(phases[-1].weights) if ramp else {}))
    return phases


def describe(phases: list[Phase]) -> list[str]:
    return [f"phase {i}: {p.describe()}" for i, p in enumerate(phases)]


def diff(old: list[Phase], new: list[Phase]) -> str:
    """A readable diff of two schedules (unified, one line per phase)."""
    lines = difflib.unified_diff(describe(old), describe(new), "old schedule", "new schedule", lineterm="", n=1)
    return "\n".join(lines)


def phase_index(phases: list[Phase], step: int) -> int:
    return max(i for i, p in enumerate(phases) if p.start <= step)


def merge(current: list[Phase], edited: list[Phase], now: int) -> list[Phase]:
    """The edited schedule if it keeps every phase that started before step `now`, unchanged;
    otherwise ScheduleError saying which trained steps it would rewrite."""
    started = [p for p in current if p.start < now]
    kept = [p for p in edited if p.start < now]
    if started == kept:
        return edited
    for i in range(max(len(started), len(kept))):
        old = started[i] if i < len(started) else None
        new = kept[i] if i < len(kept) else None
        if old != new:
            first = min(p.start for p in (old, new) if p is not None)
            raise ScheduleError(
                f"the edit rewrites steps {first}..{now - 1}, already trained: phase {i} was "
                f"[{old.describe() if old else 'absent'}], the edit makes it [{new.describe() if new else 'absent'}]. "
                f"Keep the phases that started before step {now} as they are and add a new phase with "
                f"start >= {now} instead (fractions of train.steps move when train.steps changes)")
    return edited


def planned_samples(phases: list[Phase], names: list[str], from_step: int, total_steps: int,
                    batch_size: int) -> dict[str, float]:
    """An upper bound on the samples each source serves from `from_step` to the end of the run:
    the integral of its weights plus one sample per phase."""
    out = dict.fromkeys(names, 0.0)
    for i, p in enumerate(phases):
        end = min(phases[i + 1].start if i + 1 < len(phases) else total_steps, total_steps)
        first = max(p.start, from_step)
        if end <= first:
            continue
        for name in names:
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
    a `schedule:` key."""
    path = Path(path)
    where = f"data.schedule_file={path}"
    if not path.is_file():
        raise ScheduleError(f"{where} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ScheduleError(f"{where}: invalid YAML: {e}") from None
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"schedule"})
        if unknown:
            raise ScheduleError(f"{where}: unknown key {unknown[0]!r} (the file holds `schedule:`)")
        raw = raw.get("schedule")
    if not isinstance(raw, (list, str)):
        raise ScheduleError(f"{where} must hold a list of phases or a shorthand name, got {raw!r}")
    return raw


def configured_schedule(data, total_steps: int) -> tuple[list[Phase], bool]:
    """(phases, explicit) for a DataConfig: from data.schedule_file, data.schedule, or the
    sources' own weights (`explicit` False: no schedule was given)."""
    names = [s.name for s in data.sources]
    weights = {s.name: s.weight for s in data.sources}
    if data.schedule_file:
        if data.schedule:
            raise ScheduleError("give data.schedule or data.schedule_file, not both")
        return resolve(read_schedule_file(data.schedule_file), names, weights, total_steps,
                       f"data.schedule_file={data.schedule_file}"), True
    return resolve(data.schedule, names, weights, total_steps), bool(data.schedule)
