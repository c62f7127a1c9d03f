"""The data component of training: per-source datasets, the schedule and its sampler, resume
checks, schedule edits while training, and a loader that builds global batches ahead of the step.

Built once from (config, tokenizer, dp_rank, dp_size, device). Every rank computes the same picks
for a global batch and takes its contiguous 1/dp_size of it: the schedule picks a source for
each sample, then the source's FileMix picks one of its files (a source of one file is that
file). `state_dict()` is JSON-able (it goes into trainer_state.json): the step, each source's
position, the current phase's counts, each source's file positions, the schedule that applied
from which step, and what the data order depends on (seq length, split, data seed, tokenizer,
the sources' files with their weights and fingerprints), which a resume checks.
"""
from __future__ import annotations

import copy
import math
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_code.data import schedule as sched
from megatron_code.data.datasets import (EpochOrder, SourceData, build_gpt_file, check_prefix, default_cache_dir,
                                         file_fingerprint, same_content)
from megatron_code.data.errors import DataError
from megatron_code.data.mixture import FileMix, MixtureSampler
from megatron_code.data.preprocess import check_dataset_matches_tokenizer
from megatron_code.data.sft import build_sft_file, check_sft_dataset, dataset_kind

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
    of instruction samples excluded), and weight/<source> (scheduled)."""


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
                 device: torch.device | str = "cpu", group=None, log=None):
        data, train = config.data, config.train
        self.data, self.total_steps = data, train.steps
        self.global_batch_size, self.micro_batch_size = train.global_batch_size, train.micro_batch_size
        self.eval_batches = train.eval_batches
        if self.global_batch_size % (self.micro_batch_size * dp_size):
            raise DataError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                            f"train.micro_batch_size={self.micro_batch_size} x {dp_size} data-parallel ranks")
        self.dp_rank, self.dp_size, self.group = dp_rank, dp_size, group
        self.device = torch.device(device)
        self.log = log or (lambda text: print(text) if not dist.is_initialized() or dist.get_rank() == 0 else None)
        self.names = [s.name for s in data.sources]
        phases, self.explicit = sched.configured_schedule(data, train.steps)
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
            phases, self.explicit = sched.configured_schedule(data, self.total_steps)
        self.fingerprint = data_fingerprint(config, tokenizer)
        self.cursor = _Cursor(0, MixtureSampler(self.names, phases), dict.fromkeys(self.names, 0), self._file_mixes())
        self.changes: list[dict] = []
        self._valid: dict[int, dict | None] = {}
        self._loader: _Loader | None = None
        self._started_at = 0
        self._noted: set[str] = set()
        self.log("data schedule:\n  " + "\n  ".join(sched.describe(phases)))
        self._check_plan(phases)

    # ---------------------------------------------------------------------- the step's batches

    def next_step(self) -> StepBatch:
        """This rank's micro batches of the next global batch, and the step's data metrics."""
        step = self.cursor.step
        interval = self.data.schedule_reload_interval
        if self.data.schedule_file and interval and step % interval == 0 and step != self._started_at:
            self.reload_schedule()
        if self._loader is None:
            self._loader = _Loader(self, self.data.prefetch)
        batch, cursor, notes = self._loader.get()
        for note in notes:
            self.log(note)
        self.cursor = cursor
        batch.micro_batches = [self.to_device(b) for b in batch.micro_batches]
        return batch

    def _draw(self, cursor: _Cursor) -> tuple[StepBatch, list[str]]:
        """Advance `cursor` by one global batch; returns this rank's part and any notes."""
        step, size = cursor.step, self.global_batch_size
        weights = cursor.sampler.scheduled_weights(step, size)
        sources, _ = cursor.sampler.take(step, size)
        files, positions = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
        for d, mix in enumerate(cursor.files):
            chosen = sources == d
            if chosen.any():
                files[chosen], positions[chosen] = mix.take(int(chosen.sum()))
        notes, indices, real = [], np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
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
                real[chosen] = self.sources[d].files[f].real_tokens(indices[chosen], self.data.seq_length)
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
                   **{f"weight/{n}": w for n, w in weights.items()}}
        return StepBatch(step, micro, metrics), notes

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

    def reload_schedule(self) -> None:
        """Re-read data.schedule_file (rank 0 reads, every rank gets its content) and adopt it
        from the next global batch if it leaves the trained steps alone."""
        now, where = self.cursor.step, f"data.schedule_file={self.data.schedule_file}"
        message = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                message[0] = sched.read_schedule_file(self.data.schedule_file)
            except sched.ScheduleError as e:
                message[0] = e
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.broadcast_object_list(message, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                       group=self.group)
        try:
            if isinstance(message[0], Exception):
                raise message[0]
            edited = sched.resolve(message[0], self.names, {s.name: s.weight for s in self.data.sources},
                                   self.total_steps, where)
            adopted = sched.merge(self.cursor.sampler.phases, edited, now)
            self._check_plan(adopted)
        except (sched.ScheduleError, DataError) as e:
            self.log(f"step {now}: schedule edit rejected, continuing on the current schedule: {e}")
            return
        self._adopt(adopted, now, where)

    def _adopt(self, phases: list[sched.Phase], now: int, reason: str) -> None:
        old = self.cursor.sampler.phases
        if phases == old:
            return
        self.log(f"step {now}: schedule changed ({reason}), applies from this step:\n{sched.diff(old, phases)}")
        self._stop_loader()
        self.cursor.sampler.set_phases(phases)
        self.changes.append({"step": now, "reason": reason, "schedule": sched.phases_to_json(phases)})

    # ---------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        c = self.cursor
        return {"format": STATE_FORMAT, "step": c.step, "sampler": c.sampler.state_dict(), "tokens": dict(c.tokens),
                "files": {n: m.state_dict() for n, m in zip(self.names, c.files) if len(m.positions) > 1},
                "schedule": sched.phases_to_json(c.sampler.phases), "changes": list(self.changes),
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume: check that the data order can continue, adopt the configured schedule's
        future (or keep the saved one if the configuration rewrites trained steps), then
        continue every source, and every file of a source, from its saved position."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(OLD_FORMAT)
        positions = state["sampler"]["positions"]
        self._check_fingerprint(state["fingerprint"], positions)
        self._stop_loader()
        now = int(state["step"])
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
        self._started_at = now
        if self.explicit:
            try:
                configured = sched.merge(saved, self._configured_phases(), now)
            except sched.ScheduleError as e:
                self.log(f"data.schedule: edit rejected on resume, continuing on the checkpoint's schedule: {e}")
                configured = saved
        else:  # the sources' weights: a change applies from the resume step
            past = [p for p in saved if p.start < now]
            weights = self._configured_phases()[0].weights
            active = past[-1] if past else None
            configured = past if active and active.weights == weights and not (
                active.ramp and now < active.start + active.ramp) else past + [sched.Phase(now, weights)]
        self._check_plan(configured)
        self._adopt(configured, now, "configuration on resume")

    def _configured_phases(self) -> list[sched.Phase]:
        return sched.configured_schedule(self.data, self.total_steps)[0]

    def _file_mixes(self) -> list[FileMix]:
        return [FileMix([f.prefix for f in s.files], [f.weight for f in s.files]) for s in self.sources]

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


class _Loader:
    """Draws global batches ahead of the step on a background thread (`depth` batches), each
    with the cursor after it; depth 0 draws in the caller. Exceptions reach the caller."""

    def __init__(self, pipeline: DataPipeline, depth: int):
        self.pipeline, self.depth = pipeline, depth
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
        while not self.stopped.is_set():
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
