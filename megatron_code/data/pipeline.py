"""The data component of training: per-source datasets, the schedule and its sampler, resume
checks, schedule edits while training, online mixing, the sample trace, and a loader that builds
global batches ahead of the step.

Built once from (config, tokenizer, dp_rank, dp_size, device). Every rank computes the same picks
for a global batch and takes its contiguous 1/dp_size of it: the schedule picks a source for
each sample (counting samples or, with data.mix_by, tokens or examples), then the source's
FileMix picks one of its files (a source of one file is that file). `state_dict()` is JSON-able
(it goes into trainer_state.json): the step, each source's position, the current segment's
counts, each source's file positions, the schedule that applied from which step, the adaptive
phase's state, and what the data order depends on (seq length, split, data seed, tokenizer, the
sources' files with their weights and fingerprints), which a resume checks.

Schedule changes are never silent. A resume whose schedule would give trained steps other
weights stops before any work, saying which steps and how to go on; `data.schedule_file` is
checked before every step (rank 0 stats it; every rank gets the verdict) and an edit applies
from the next global batch or is rejected with the reason, once. Each accepted or rejected
change reaches the caller as an event of the step it applies from (`StepBatch.events`).
"""
from __future__ import annotations

import copy
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_code.data import schedule as sched
from megatron_code.data.adaptive import OnlineDataMixing
from megatron_code.data.datasets import (EpochOrder, SourceData, build_gpt_file, check_prefix, default_cache_dir,
                                         file_fingerprint, same_content)
from megatron_code.data.errors import DataError
from megatron_code.data.mixture import FileMix, MixtureSampler
from megatron_code.data.preprocess import check_dataset_matches_tokenizer
from megatron_code.data.sft import build_sft_file, check_sft_dataset, dataset_kind
from megatron_code.data.trace import RECORD, TraceWriter

STATE_FORMAT = 1
OLD_FORMAT = ("the checkpoint's data state is from an older version (no schedule history or data fingerprint): its "
              "data order cannot be continued; start a new run")
SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


@dataclass
class StepBatch:
    step: int
    micro_batches: list[dict[str, torch.Tensor]]
    """This rank's micro batches: tokens, labels, loss_mask, position_ids, source (int64 per
    sample: an index into data.sources), and document_ids for packed instruction data."""
    metrics: dict[str, float]
    """Of the global batch: samples/<source>, tokens/<source> and tokens (real tokens: padding
    of instruction samples excluded), <mix_by>/<source> when mixing by loss tokens or examples,
    weight/<source> (scheduled) and mix_by."""
    picks: np.ndarray = field(default_factory=lambda: np.zeros(0, RECORD))
    """The global batch's samples as trace records (data/trace.py)."""
    events: list[dict] = field(default_factory=list)
    """Schedule changes accepted or rejected before this batch was drawn: each with `step` (this
    batch's step), `event`, `verdict`, `source` (what asked for it) and `diff` or `reason`."""


@dataclass
class _Cursor:
    """Everything that moves as batches are drawn; the loader advances a copy ahead of the step."""
    step: int
    sampler: MixtureSampler
    tokens: dict[str, int]
    files: list[FileMix]
    """Per source: which of its files serves each of its samples."""

def check_stage(name: str, prefix: str, stage: str, tokenizer) -> None:
    """Instruction data feeds the sft stage only, and the sft stage reads nothing else; its chat
    template must be the one the tokenizer gives."""
    kind = dataset_kind(prefix)
    if kind == "sft" and stage != "sft":
        raise DataError(f"data source {name!r} ({prefix}) holds instruction data (tools/preprocess_sft.py): "
                        "set train.stage=sft to tune on it")
    if kind != "sft" and stage == "sft":
        raise DataError(f"data source {name!r} ({prefix}) is not instruction data: train.stage=sft reads "
                        "datasets made by tools/preprocess_sft.py")
    if kind == "sft":
        check_sft_dataset(prefix, tokenizer)


def _source_fingerprint(files: list[tuple[str, float]]) -> dict:
    """What a resume checks of a source of (prefix, weight) files: its prefix (or its files with
    their weights) and the files' fingerprints. A source of one file has the form checkpoints
    from before several-file sources hold."""
    if len(files) == 1:
        return {"prefix": files[0][0], "files": file_fingerprint(files[0][0])}
    return {"prefix": [{"prefix": prefix, "weight": weight} for prefix, weight in files],
            "files": {prefix: file_fingerprint(prefix) for prefix, _ in files}}


def data_fingerprint(config, tokenizer) -> dict:
    """What the data order depends on, from the config and the files alone (no datasets built)."""
    data = config.data
    return {"seq_length": data.seq_length, "split": data.split, "seed": data.seed, "tokenizer": tokenizer.fingerprint,
            **({"pack": data.pack} if config.train.stage == "sft" else {}),
            "sources": {s.name: _source_fingerprint(s.files()) for s in data.sources}}


def fingerprint_problems(saved: dict, now: dict, positions: dict) -> list[str]:
    """What changed between a checkpoint's data fingerprint and this run's that the saved
    positions depend on."""
    problems = []
    for key in ("seq_length", "split", "seed", "tokenizer", "pack"):
        if saved.get(key) != now.get(key):
            problems.append(f"data.{key} changed: {saved.get(key)!r} -> {now.get(key)!r}")
    for name, entry in saved["sources"].items():
        current = now["sources"].get(name)
        if current is None:
            if positions.get(name, 0):
                problems.append(f"data source {name!r} fed {positions[name]:,} samples but is not in data.sources")
        elif entry["prefix"] != current["prefix"]:
            problems.append(f"data source {name!r}: prefix changed: {_describe_files(entry['prefix'])} -> "
                            f"{_describe_files(current['prefix'])}")
        elif changed := [prefix for prefix, files in _file_fingerprints(current).items()
                         if not same_content(_file_fingerprints(entry)[prefix], files)]:
            problems.append(f"data source {name!r}: the files at {', '.join(changed)} changed since the checkpoint "
                            "(rebuilt?)")
    return problems


def check_resumable(state: dict, config, tokenizer) -> None:
    """Refuse, before any dataset is built, to resume a checkpoint's data state whose order this
    config cannot continue (the full check, with its messages, runs again on loading)."""
    if state.get("format") != STATE_FORMAT:
        raise DataError(OLD_FORMAT)
    problems = fingerprint_problems(state["fingerprint"], data_fingerprint(config, tokenizer),
                                    state["sampler"]["positions"])
    if problems and not config.data.allow_changed_data:
        raise DataError(_changed_data_message(problems))
    if not config.train.epochs:  # else the run's length, and so the schedule, needs the data
        resume_schedule(state, config.data, config.train.steps)


def resume_schedule(state: dict, data, total_steps: int) -> tuple[list[sched.Phase], str, str]:
    """The schedule a resume from `state` runs, where it comes from, and a note for the log
    (empty when there is nothing to say). The configured
    schedule must give every trained step the weights the checkpoint trained it with; its
    fractions of train.steps resolve, for phases that started, against the train.steps they were
    first resolved with. data.schedule_source=checkpoint goes on with the checkpoint's schedule."""
    now, history = int(state["step"]), sched.phases_from_json(state["schedule"])
    if data.schedule_source == "checkpoint":
        return history, "data.schedule_source=checkpoint", ("data.schedule_source=checkpoint: the checkpoint's "
                                                            "schedule goes on (data.schedule is not used; "
                                                            "data.schedule_file's edits from now on are)")
    started = [p for p in history if p.start < now]
    try:
        configured, explicit = sched.configured_schedule(data, total_steps, started)
        if not explicit:  # the sources' weights: a change applies from the resume step
            weights, active = configured[0].weights, started[-1] if started else None
            ramping = active is not None and active.ramp and now < active.start + active.ramp
            same = (active is not None and not active.adaptive and not ramping
                    and sched.same_weights(active.weights, weights))
            adopted = started if same else started + [sched.Phase(now, weights)]
        else:
            adopted = sched.merge(history, configured, now)
        sched.check_fits(adopted, total_steps)
    except sched.ScheduleConflictError as e:
        where = f"data.schedule_file={data.schedule_file}" if data.schedule_file else "data.schedule"
        raise DataError(f"{where} disagrees with the checkpoint (step {now}) on trained steps {e.found.first}.."
                        f"{e.found.last}: {e.found.describe(history, configured)}. Either change only phases from step "
                        f"{now} on, or set data.schedule_source=checkpoint to go on with the checkpoint's schedule"
                        ) from None
    except sched.ScheduleError as e:
        raise DataError(f"cannot resume at step {now}: {e}") from None
    pinned = sorted({p.given["steps"] for p in started if p.given.get("steps", total_steps) != total_steps
                     and sched.is_fraction(p.given.get("start"))})
    note = (f"train.steps is {total_steps} now: the phases that started keep their steps, fractions of the "
            f"{' or '.join(map(str, pinned))} steps they were first resolved with (a change of train.steps never moves "
            "a boundary already passed); phases yet to start resolve against the new length") if pinned else ""
    return adopted, "configuration on resume", note


def _changed_data_message(problems: list[str]) -> str:
    return ("cannot resume: the data order depends on what changed:\n  " + "\n  ".join(problems)
            + "\npass --data.allow_changed_data=true to continue anyway")


def _file_fingerprints(entry: dict) -> dict[str, dict]:
    return {entry["prefix"]: entry["files"]} if isinstance(entry["prefix"], str) else entry["files"]


def _describe_files(prefix) -> str:
    return prefix if isinstance(prefix, str) else ", ".join(f"{f['prefix']} (weight {f['weight']:g})" for f in prefix)


def _one_file_state(prefix: str, position: int) -> dict:
    """The FileMix state of a source whose one file has served `position` samples."""
    return {"positions": {prefix: position}, "phase": 0, "phase_samples": position, "counts": {prefix: position}}


def build_sources(config, tokenizer, log) -> list[SourceData]:
    """The datasets of every file of every source, after the cheap checks of all of them."""
    data, train = config.data, config.train
    for i, source in enumerate(data.sources):
        several = not isinstance(source.prefix, str)
        for j, (prefix, _) in enumerate(source.files()):
            check_prefix(f"data source {source.name!r}" + (f" (data.sources[{i}].prefix[{j}])" if several else ""),
                         prefix)
            check_dataset_matches_tokenizer(prefix, tokenizer)
            check_stage(source.name, prefix, train.stage, tokenizer)
    if train.stage == "sft":
        def build_file(name, prefix, weight):
            return build_sft_file(name, prefix, weight, tokenizer, data.seq_length, data.split, data.seed, data.pack,
                                  log)
    else:
        def build_file(name, prefix, weight):
            return build_gpt_file(name, prefix, weight, tokenizer, data.seq_length, data.split, data.seed,
                                  default_cache_dir(train.output_dir, data.cache_dir))
    return [SourceData(s.name, [build_file(s.name, p, w) for p, w in s.files()]) for s in data.sources]


def collate(samples: list[dict], sources: np.ndarray, pin: bool) -> dict[str, torch.Tensor]:
    """Stack samples into a batch; `document_ids` (packed instruction data) when they have them."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in SAMPLE_KEYS if k in samples[0]}
    batch["source"] = torch.from_numpy(np.ascontiguousarray(sources, dtype=np.int64))
    return {k: v.pin_memory() for k, v in batch.items()} if pin else batch


class DataPipeline:
    def __init__(self, config, tokenizer, dp_rank: int = 0, dp_size: int = 1,
                 device: torch.device | str = "cpu", log=None):
        data, train = config.data, config.train
        self.data, self.total_steps, self.mix_by = data, train.steps, data.mix_by
        self.global_batch_size, self.micro_batch_size = train.global_batch_size, train.micro_batch_size
        self.eval_batches = train.eval_batches
        if self.global_batch_size % (self.micro_batch_size * dp_size):
            raise DataError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                            f"train.micro_batch_size={self.micro_batch_size} x {dp_size} data-parallel ranks")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.device = torch.device(device)
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        self.log = log or (lambda text: print(text) if self.is_main else None)
        self.names = [s.name for s in data.sources]
        self._file_state = _stat(data.schedule_file) if data.schedule_file else None  # before the file is read
        phases, self.explicit = sched.configured_schedule(data, train.steps, check_end=not train.epochs)
        self.sources = build_sources(config, tokenizer, self.log)
        # names in messages; each file of several gets its own shuffles for later epochs
        self.labels = [[f"data source {s.name!r}" + (f" file {f.prefix}" if len(s.files) > 1 else "")
                        for f in s.files] for s in self.sources]
        self.orders = [[EpochOrder(len(f.train), data.seed, s.name if len(s.files) == 1 else f"{s.name}/{f.prefix}")
                        for f in s.files] for s in self.sources]
        if train.epochs:  # an epoch: every training sample of every file the schedule draws from
            drawn = {name for p in phases for name, w in p.weights.items() if w > 0}
            samples = sum(len(f.train) for s in self.sources if s.name in drawn for f in s.files if f.weight > 0)
            self.total_steps = max(1, math.ceil(train.epochs * samples / self.global_batch_size))
            self.log(f"train.epochs={train.epochs:g}: {samples:,} training samples per epoch -> "
                     f"{self.total_steps:,} steps of {self.global_batch_size}")
            try:
                phases, self.explicit = sched.configured_schedule(data, self.total_steps)
            except sched.ScheduleError as e:
                raise DataError(f"{e} (train.epochs={train.epochs:g} gives {self.total_steps} steps)") from None
        self.fingerprint = data_fingerprint(config, tokenizer)
        self.cursor = _Cursor(0, MixtureSampler(self.names, phases), dict.fromkeys(self.names, 0), self._file_mixes())
        self.changes: list[dict] = []
        self.adaptive: OnlineDataMixing | None = None
        self._adaptive_start = -1
        """The start of the adaptive phase `adaptive` belongs to."""
        self._events: list[dict] = []
        self._valid: dict[int, dict | None] = {}
        self._loader: _Loader | None = None
        self._noted: set[str] = set()
        # rank 0 checks the schedule file; a gloo group carries its verdict without a device sync
        self._control = None
        if data.schedule_file and dist.is_initialized() and dist.get_world_size() > 1:
            self._control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self._trace = TraceWriter(Path(train.output_dir), self._trace_header()) if data.trace and self.is_main else None
        self._announced = False
        self._check_plan(phases)

    # ---------------------------------------------------------------------- the step's batches

    def next_step(self) -> StepBatch:
        """This rank's micro batches of the next global batch, and the step's data metrics."""
        step = self.cursor.step
        if not self._announced:  # the schedule that runs: a resume may have changed the configured one
            self._announced = True
            unit = f", mixing by {self.mix_by}" if self.mix_by != "samples" else ""
            phases = sched.describe(self.cursor.sampler.phases)
            self.log(f"data schedule from step {step}{unit}:\n  " + "\n  ".join(phases))
        if self.data.schedule_file:
            self._check_schedule_file(step)
        self._update_adaptive(step)
        if self._loader is not None and self._loader.limit is not None and step >= self._loader.limit:
            self._stop_loader()
        if self._loader is None:
            self._loader = _Loader(self, self.data.prefetch, self._next_update(step))
        batch, cursor, notes = self._loader.get()
        for note in notes:
            self.log(note)
        self.cursor = cursor
        batch.events, self._events = self._events, []
        if self._trace is not None:
            self._trace.write(batch.step, batch.picks)
        batch.micro_batches = [self.to_device(b) for b in batch.micro_batches]
        return batch

    def _next_units(self, cursor: _Cursor, d: int, n: int) -> np.ndarray:
        """The units (data.mix_by) of source d's next n samples, without drawing them."""
        files, positions = copy.deepcopy(cursor.files[d]).take(n)
        units = np.empty(n, dtype=np.int64)
        for f in np.unique(files).tolist():
            chosen = files == f
            indices = self.orders[d][f].order(positions[chosen])
            units[chosen] = self.sources[d].files[f].units(indices, self.mix_by, self.data.seq_length)
        return units

    def _draw(self, cursor: _Cursor) -> tuple[StepBatch, list[str]]:
        """Advance `cursor` by one global batch; returns this rank's part and any notes."""
        step, size = cursor.step, self.global_batch_size
        weights = cursor.sampler.scheduled_weights(step, size)
        units = None if self.mix_by == "samples" else [
            self._next_units(cursor, d, size) if weights[name] > 0 else None for d, name in enumerate(self.names)]
        sources, _ = cursor.sampler.take(step, size, units)
        files, positions = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
        for d, mix in enumerate(cursor.files):
            chosen = sources == d
            if chosen.any():
                files[chosen], positions[chosen] = mix.take(int(chosen.sum()))
        notes = []
        indices, real, mixed = (np.empty(size, dtype=np.int64) for _ in range(3))
        for d, orders in enumerate(self.orders):
            for f, order in enumerate(orders):
                chosen = (sources == d) & (files == f)
                if not chosen.any():
                    continue
                first, last = int(positions[chosen][0]), int(positions[chosen][-1])
                if last // order.size > first // order.size or (first % order.size == 0 and first > 0):
                    epoch, label = last // order.size + 1, self.labels[d][f]
                    if not self.data.allow_repeat:
                        raise DataError(f"{label}: step {step} needs sample {last + 1:,} but it holds "
                                        f"{order.size:,} (data.allow_repeat=false)")
                    notes.append(f"warning: {label} starts epoch {epoch} at step {step}: its {order.size:,} "
                                 "samples again, in a new order")
                indices[chosen] = order.order(positions[chosen])
                file = self.sources[d].files[f]
                real[chosen] = file.real_tokens(indices[chosen], self.data.seq_length)
                if self.mix_by not in ("samples", "tokens"):
                    mixed[chosen] = file.units(indices[chosen], self.mix_by, self.data.seq_length)
        share = size // self.dp_size
        mine = slice(self.dp_rank * share, (self.dp_rank + 1) * share)
        samples = [self.sources[d].files[f].train[i]
                   for d, f, i in zip(sources[mine].tolist(), files[mine].tolist(), indices[mine].tolist())]
        pin = self.device.type == "cuda"
        micro = [collate(samples[j: j + self.micro_batch_size], sources[mine][j: j + self.micro_batch_size], pin)
                 for j in range(0, share, self.micro_batch_size)]
        counts = np.bincount(sources, minlength=len(self.names))
        tokens = np.bincount(sources, weights=real, minlength=len(self.names)).astype(np.int64)
        for name, n in zip(self.names, tokens.tolist()):
            cursor.tokens[name] += n
        cursor.step += 1
        metrics = {**{f"samples/{n}": int(c) for n, c in zip(self.names, counts)},
                   **{f"tokens/{n}": int(c) for n, c in zip(self.names, tokens)}, "tokens": int(tokens.sum()),
                   **{f"weight/{n}": w for n, w in weights.items()}, "mix_by": self.mix_by}
        if self.mix_by not in ("samples", "tokens"):
            per_source = np.bincount(sources, weights=mixed, minlength=len(self.names)).astype(np.int64)
            metrics.update({f"{self.mix_by}/{n}": int(c) for n, c in zip(self.names, per_source)})
        picks = np.zeros(size, RECORD)
        picks["step"], picks["source"], picks["file"], picks["index"] = step, sources, files, indices
        for d, orders in enumerate(self.orders):
            for f, order in enumerate(orders):
                chosen = (sources == d) & (files == f)
                picks["epoch"][chosen] = positions[chosen] // order.size
        return StepBatch(step, micro, metrics, picks), notes

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---------------------------------------------------------------------- validation

    def valid_batch(self, source: int) -> dict[str, torch.Tensor] | None:
        """A fixed set of held-out samples of one source as one batch, the same on every rank: the
        first train.eval_batches x micro_batch_size of its files' validation splits, interleaved
        by the files' weights as training draws them (fewer when a file's split runs out first);
        None without any. `ParallelModel.evaluate` splits it over the data-parallel ranks."""
        if source not in self._valid:
            files = [f for f in self.sources[source].files if f.valid is not None and f.weight > 0]
            picks = []
            if files:
                which, at = FileMix([f.prefix for f in files], [f.weight for f in files]).take(
                    self.eval_batches * self.micro_batch_size)
                for f, i in zip(which.tolist(), at.tolist()):
                    if i >= len(files[f].valid):
                        break
                    picks.append((f, i))
            self._valid[source] = (collate([files[f].valid[i] for f, i in picks], np.full(len(picks), source), False)
                                   if picks else None)
        batch = self._valid[source]
        return self.to_device(batch) if batch is not None else None

    # ---------------------------------------------------------------------- schedule edits

    def _check_schedule_file(self, now: int) -> None:
        """Before global batch `now`: rank 0 stats data.schedule_file (modification time and
        size); when they changed, it reads the file, every rank gets its content and applies the
        edit from this batch, or rejects it with the reason (once: the file is read again only
        when it changes)."""
        changed = torch.zeros(1, dtype=torch.int64)
        if self.is_main:
            stat = _stat(self.data.schedule_file)
            changed[0] = int(stat != self._file_state)
            self._file_state = stat
        if self._control is not None:
            dist.broadcast(changed, src=0, group=self._control)
        if not changed.item():
            return
        where = f"data.schedule_file={self.data.schedule_file}"
        message = [None]
        if self.is_main:
            try:
                message[0] = sched.read_schedule_file(self.data.schedule_file)
            except sched.ScheduleError as e:
                message[0] = e
        if self._control is not None:
            dist.broadcast_object_list(message, src=0, group=self._control)
        current, edited = self.cursor.sampler.phases, None
        try:
            if isinstance(message[0], Exception):
                raise message[0]
            edited = sched.resolve(message[0], self.names, {s.name: s.weight for s in self.data.sources},
                                   self.total_steps, where, [p for p in current if p.start < now])
            adopted = sched.merge(current, edited, now)
            sched.check_fits(adopted, self.total_steps, where)
            self._check_plan(adopted)
        except sched.ScheduleConflictError as e:
            self._reject(now, where, f"it would rewrite trained steps {e.found.first}..{e.found.last}: "
                         f"{e.found.describe(current, edited)}. Phases may change only from the step the run is at "
                         f"when the file is saved (it is checked before every step)", current, edited)
        except (sched.ScheduleError, DataError) as e:
            self._reject(now, where, str(e), current, edited)
        else:
            self._adopt(adopted, now, where)

    def _reject(self, now: int, where: str, reason: str, current: list[sched.Phase],
                edited: list[sched.Phase] | None) -> None:
        self.log(f"step {now}: edit of {where} rejected, the run goes on with its schedule: {reason}")
        self._events.append({"step": now, "event": "schedule", "verdict": "rejected", "source": where,
                             "reason": reason, **({"diff": sched.diff(current, edited)} if edited else {})})

    def _adopt(self, phases: list[sched.Phase], now: int, reason: str) -> None:
        old = self.cursor.sampler.phases
        if phases == old:
            return
        change = sched.diff(old, phases)
        self.log(f"step {now}: schedule changed ({reason}), applies from this step:\n{change}")
        self._stop_loader()
        self.cursor.sampler.set_phases(phases)
        self.changes.append({"step": now, "reason": reason, "schedule": sched.phases_to_json(phases)})
        self._events.append({"step": now, "event": "schedule", "verdict": "accepted", "source": reason,
                             "diff": change})

    # ---------------------------------------------------------------------- online mixing

    def _adaptive_phase(self, step: int) -> sched.Phase | None:
        phases = self.cursor.sampler.phases
        phase = phases[sched.phase_index(phases, step)]
        return phase if phase.adaptive else None

    def _mixer(self, phase: sched.Phase) -> OnlineDataMixing:
        if self.adaptive is None or self._adaptive_start != phase.start:
            self.adaptive = OnlineDataMixing(phase.weights, phase.adaptive["smoothing"], phase.adaptive["min_weight"])
            self._adaptive_start = phase.start
        return self.adaptive

    def observe_losses(self, step: int, losses: dict[str, float]) -> None:
        """The per-source training losses of global batch `step` (reduced over all ranks, the
        same on every rank): what an adaptive phase sets its next weights from."""
        phase = self._adaptive_phase(step)
        if phase is not None:
            self._mixer(phase).observe(losses)

    def _update_adaptive(self, step: int) -> None:
        """At an adaptive phase's update step: new weights from the losses observed since the
        last update, in force from this batch on."""
        phase = self._adaptive_phase(step)
        if phase is None or step == phase.start or (step - phase.start) % phase.adaptive["every"]:
            return
        weights = self._mixer(phase).update()
        self._stop_loader()
        self.cursor.sampler.restart(step, weights)

    def _next_update(self, step: int) -> int | None:
        """The first adaptive update after `step`: the loader draws no further ahead (its
        weights depend on losses not yet known)."""
        phases = self.cursor.sampler.phases
        for i, p in enumerate(phases):
            end = phases[i + 1].start if i + 1 < len(phases) else self.total_steps
            if p.adaptive:
                every = p.adaptive["every"]
                first = p.start + every * max(1, -(-(step + 1 - p.start) // every))
                if first < end:
                    return first
        return None

    # ---------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        c = self.cursor
        return {"format": STATE_FORMAT, "step": c.step, "sampler": c.sampler.state_dict(), "tokens": dict(c.tokens),
                "files": {n: m.state_dict() for n, m in zip(self.names, c.files) if len(m.positions) > 1},
                "schedule": sched.phases_to_json(c.sampler.phases), "changes": list(self.changes),
                "mix_by": self.mix_by, "adaptive": None if self.adaptive is None else {
                    "phase_start": self._adaptive_start, **self.adaptive.state_dict()},
                "orders": self._orders_record(), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume: check that the data order can continue, adopt the configured schedule's
        future (or stop when it would rewrite trained steps), then continue every source, and
        every file of a source, from its saved position."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(OLD_FORMAT)
        positions = state["sampler"]["positions"]
        self._check_fingerprint(state["fingerprint"], positions)
        self._stop_loader()
        now = int(state["step"])
        configured, reason, note = resume_schedule(state, self.data, self.total_steps)
        saved = sched.phases_from_json(state["schedule"])
        sampler = MixtureSampler(self.names, saved)
        sampler.load_state_dict(state["sampler"])
        files = self._file_mixes()
        for name, mix in zip(self.names, files):
            position, entry = int(positions.get(name, 0)), state["fingerprint"]["sources"].get(name)
            if len(mix.positions) == 1:  # one file: at its source's position (also if its prefix moved)
                mix.load_state_dict(_one_file_state(mix.sampler.names[0], position))
            elif name in state.get("files", {}):
                mix.load_state_dict(state["files"][name],
                                    restart=entry["prefix"] != self.fingerprint["sources"][name]["prefix"])
            else:  # it had one file (or was new): that file, if still listed, continues where it was
                mix.load_state_dict(_one_file_state(entry["prefix"] if entry else "", position), restart=True)
        self.cursor = _Cursor(now, sampler, {n: int(state["tokens"].get(n, 0)) for n in self.names}, files)
        self.changes = list(state.get("changes", []))
        adaptive = state.get("adaptive")
        self.adaptive, self._adaptive_start = None, -1
        if adaptive is not None:
            phase = next(p for p in saved if p.start == adaptive["phase_start"])
            self._mixer(phase).load_state_dict(adaptive)
        if state.get("mix_by", "samples") != self.mix_by:
            self.log(f"data.mix_by changed on resume: {state.get('mix_by', 'samples')} -> {self.mix_by}; the mix "
                     f"counts {self.mix_by} from step {now} on")
            sampler.restart(now, sampler.segment_weights)
        if note:
            self.log(note)
        self._check_plan(configured)
        self._adopt(configured, now, reason)

    def _file_mixes(self) -> list[FileMix]:
        return [FileMix([f.prefix for f in s.files], [f.weight for f in s.files]) for s in self.sources]

    def _orders_record(self) -> dict:
        """Per source and file: its epoch size and order key (data/datasets.py EpochOrder), which
        tools/data_trace.py needs to turn positions into sample indices."""
        return {s.name: [{"prefix": f.prefix, "size": o.size, "key": o.name} for f, o in zip(s.files, orders)]
                for s, orders in zip(self.sources, self.orders)}

    def _trace_header(self) -> dict:
        return {"seed": self.data.seed, "mix_by": self.mix_by, "global_batch_size": self.global_batch_size,
                "sources": [{"name": name, "files": files} for name, files in self._orders_record().items()]}

    def _check_fingerprint(self, saved: dict, positions: dict) -> None:
        problems = fingerprint_problems(saved, self.fingerprint, positions)
        if not problems:
            return
        if not self.data.allow_changed_data:
            raise DataError(_changed_data_message(problems))
        self.log("data.allow_changed_data=true: resuming although\n  " + "\n  ".join(problems)
                 + "\neach source continues at its saved position, which now indexes the new data (a file new to a "
                 "source of several starts at its beginning, and the mix of the source's files starts afresh)")

    def _check_plan(self, phases: list[sched.Phase]) -> None:
        """Stop (data.allow_repeat=false) or warn when the schedule asks a file for more
        samples than it holds."""
        c = self.cursor
        planned = sched.planned_samples(phases, self.names, c.step, self.total_steps, self.global_batch_size)
        for d, (name, source) in enumerate(zip(self.names, self.sources)):
            for f, file in enumerate(source.files):
                need, held, label = c.files[d].most_served(f, planned[name]), len(file.train), self.labels[d][f]
                if need <= held:
                    continue
                if not self.data.allow_repeat:
                    raise DataError(f"{label}: the schedule asks for up to {int(need):,} samples but it holds "
                                    f"{held:,} training samples of length {self.data.seq_length} "
                                    "(data.allow_repeat=false forbids a second epoch)")
                if label not in self._noted:
                    self._noted.add(label)
                    self.log(f"note: {label} will be read about {need / held:.2f} times (each epoch in a new order)")

    # ---------------------------------------------------------------------- the loader

    def _stop_loader(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    def close(self) -> None:
        self._stop_loader()
        if self._trace is not None:
            self._trace.close()


def _stat(path: str) -> tuple[int, int]:
    """What tells a file changed without reading it: (modification time in ns, size); (-1, -1)
    when it is missing."""
    try:
        s = os.stat(path)
    except OSError:
        return (-1, -1)
    return (s.st_mtime_ns, s.st_size)


class _Loader:
    """Draws global batches ahead of the step on a background thread (`depth` batches), each
    with the cursor after it, up to step `limit` (excluded; None: no limit); depth 0 draws in
    the caller. Exceptions reach the caller."""

    def __init__(self, pipeline: DataPipeline, depth: int, limit: int | None):
        self.pipeline, self.depth, self.limit = pipeline, depth, limit
        self.cursor = copy.deepcopy(pipeline.cursor)
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stopped = threading.Event()
        self.thread = None
        if depth:
            self.thread = threading.Thread(target=self._run, name="data-loader", daemon=True)
            self.thread.start()

    def _produce(self):
        batch, notes = self.pipeline._draw(self.cursor)
        return batch, copy.deepcopy(self.cursor), notes

    def _run(self) -> None:
        while not self.stopped.is_set() and (self.limit is None or self.cursor.step < self.limit):
            try:
                item = self._produce()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = e
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self):
        item = self.queue.get() if self.thread else self._produce()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
