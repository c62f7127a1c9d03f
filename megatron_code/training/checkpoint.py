"""Checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own shards, any
parallel layout reads any other's, and nothing damaged or half-written is ever taken for a checkpoint.

Layout of `<run>/checkpoints/step_0000100/`:
  *.distcp, .metadata   DCP tensors: "model.<name>" for every parameter, and the optimizer state
                        as "optimizer.state.<name>.<exp_avg|exp_avg_sq|step>" and
                        "optimizer.param_groups.<name>.<lr|betas|...>"
  trainer_state.json    {"step", "weights_only", "manifest": true, "config", "layout", "tokenizer"
                        (its fingerprint and size), and each plain-data state:
                        "train" (the step counter, the step guard), "data" (the data pipeline's position)}
  rng_pp<p>_tp<t>.json  the RNG states (Python, numpy, torch, CUDA) of the ranks at pipeline stage p
                        and tensor rank t, as plain data (data-parallel replicas draw alike)
  manifest.json         every other file's size and checksum (training/integrity.py), written last
A checkpoint is written to `step_N.tmp`, fsynced, renamed; then `latest` names it (a hint for
people and other tools: nothing here trusts it). A save that fails on any rank fails on every
rank, removes its `.tmp` folder and leaves the previous checkpoints as they were.

Which checkpoint a start takes (`starting_point`): the newest intact one, whatever `latest` says.
Intact means every file of its manifest is there with its size and checksum (checksums streamed
once, split over the ranks). A damaged or incomplete newer one is named in one line and skipped;
a run directory holding step_N folders none of which is intact stops the run, unless
`checkpoint.allow_fresh_start`. Pruning (`keep_last`, by step number) never removes the newest
intact checkpoint, a damaged one, or anything older than a damaged one. Model math and tokenizer
are checked from trainer_state.json before the checksums and before any data or model is built.

Contract for readers (conversion, evaluation, `init_from`):
- "model.<name>" holds each parameter under the single-process model's name (`layers.3.mlp.up.weight`)
  in its full canonical shape whatever the layout that wrote it: tensor-parallel shards are
  DTensors saved with their placements, pipeline stages keep global names, FSDP shards merge.
  The fused SwiGLU weight is (2, ffn, hidden) = (gate, up); qkv is grouped per kv head as
  [q_1..q_g, k, v]; the vocabulary is padded (rows past the tokenizer's vocabulary are padding).
  The config in trainer_state.json says how to read them. `load_model_state(path)` verifies and
  reads them in one process, with no process group.
- A weights-only checkpoint (e.g. imported from Hugging Face) has "weights_only": true, a config,
  and only "model.*" tensors. `--load` treats it as `checkpoint.init_from`: model weights only,
  fresh optimizer, LR schedule and data position, step 0, under any layout.
- A checkpoint loads under another vocabulary padding: rows both have are copied, rows only the
  new model has keep their initial values (they are padding).
- Evaluation under any layout: `ParallelModel.evaluate(batch)` (parallel/model.py) takes the same
  batch of tokens, labels and loss_mask on every rank and returns each sample's masked loss sum
  and loss-token count on every rank (validation loss, multiple-choice scoring).
"""
from __future__ import annotations

import contextlib
import json
import pickle
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megatron_code.config import CheckpointConfig, ModelConfig, config_from_dict
from megatron_code.training.integrity import (MANIFEST, agree, checksums, file_checksum, fsync_path,
                                              has_manifest, problem, write_durably, write_manifest)

VOCAB_PARAMETERS = ("embedding.weight", "output.weight")
_STEP_DIR = re.compile(r"step_(\d+)")
_RNG_FILE = re.compile(r"rng_pp(\d+)_tp(\d+)\.json")
_LEGACY_RNG_FILE = re.compile(r"rng_rank(\d+)\.json")


class CheckpointError(RuntimeError):
    pass


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainState:
    """The step counter, the step the run started at (not 0 for a run continued from another's
    checkpoint: checkpoint.continue_from), and the trainer's step guard (training/guard.py:
    skipped steps, the loss-spike window) when given; plain data. A checkpoint saved before the
    guard existed resumes with a fresh one."""

    def __init__(self, guard: Stateful | None = None) -> None:
        self.step = 0
        self.first_step = 0
        self.guard = guard

    def state_dict(self) -> dict:
        return {"step": self.step, "first_step": self.first_step,
                **({"guard": self.guard.state_dict()} if self.guard is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.first_step = int(state.get("first_step", 0))
        if self.guard is not None and "guard" in state:
            self.guard.load_state_dict(state["guard"])


# ----------------------------------------------------------------------------------------------
# finding checkpoints

def _step(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def step_dirs(directory: Path) -> list[Path]:
    """The step_N folders of a checkpoints directory, oldest first (incomplete `.tmp` saves excluded)."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)), key=_step)


def _is_step_dir(path: Path) -> bool:
    return bool(_STEP_DIR.fullmatch(path.name)) or any((path / f).is_file() for f in ("trainer_state.json", MANIFEST))


def _read_json(path: Path, what: str = "") -> dict:
    """A small JSON file of a checkpoint; a missing or damaged one is a one-line CheckpointError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing{what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}){what}") from None


Fits = Callable[[Path, dict, bool], None]
"""fits(step_dir, its trainer_state.json, weights_only): raises when the checkpoint cannot start this run."""


@dataclass
class Found:
    path: Path | None
    """The newest intact checkpoint, or None."""
    saved: dict | None = None
    """Its trainer_state.json."""
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    """Newer step folders that failed verification, with why."""


def _newest_intact(base: Path, checksums_too: bool, distributed: bool, weights_only: bool, fits: Fits | None,
                   log: Callable[[str], None]) -> Found:
    """The newest intact checkpoint of a checkpoints directory (`latest` is not consulted): sizes
    first, then the cheap checks of `fits` on its trainer_state.json, then the checksums. When
    there is one, each damaged newer one is named through `log` (else the caller's error names them)."""
    found = Found(None)
    for candidate in reversed(step_dirs(base)):
        why = problem(candidate, checksums_too=False, distributed=distributed)
        if why is None:
            try:
                saved = _read_json(candidate / "trainer_state.json")
            except CheckpointError as e:  # bytes damaged in place, or a checkpoint without a manifest
                why, saved = str(e), None
        if why is None:
            if fits is not None:
                fits(candidate, saved, weights_only or saved.get("weights_only", False))
            why = problem(candidate, checksums_too=checksums_too, distributed=distributed) if checksums_too else None
        if why is None:
            found.path, found.saved = candidate, saved
            break
        found.damaged.append((candidate, why))
    if found.path is None:
        return found
    for candidate, why in found.damaged:
        log(f"warning: checkpoint {candidate} is damaged: {why}; skipping it")
    if not has_manifest(found.path):
        log(f"note: {found.path} was saved before checkpoints had manifests: its files cannot be verified")
    hint = base / "latest"
    if hint.is_file():
        named = hint.read_text(errors="replace").strip()
        if named != found.path.name and named not in {d.name for d, _ in found.damaged}:
            log(f"note: {hint} names {named[:40]!r}, not the newest intact checkpoint {found.path.name}; "
                "it is a hint, ignored")
    return found


def _open(path: Path, setting: str, checksums_too: bool, distributed: bool, weights_only: bool,
          fits: Fits | None, log: Callable[[str], None]) -> Found:
    """The checkpoint `path` means (`setting`: the config field it came from, or ""): a step
    folder, which must be intact, or the newest intact one in a checkpoints or run directory."""
    named = f"{setting}={path}" if setting else f"checkpoint {path}"
    if _is_step_dir(path):
        why = problem(path, checksums_too=False, distributed=distributed)
        saved = None if why else _read_json(path / "trainer_state.json", f" ({named})" if setting else "")
        if why is None and fits is not None:
            fits(path, saved, weights_only or saved.get("weights_only", False))
        if why is None and checksums_too:
            why = problem(path, checksums_too=True, distributed=distributed)
        if why is not None:
            raise CheckpointError(f"{named}: the checkpoint is damaged: {why}; give an intact step_N folder, "
                                  "or its run directory to take the newest intact one")
        return Found(path, saved)
    base = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = _newest_intact(base, checksums_too, distributed, weights_only, fits, log)
    if found.path is None:
        partial = sorted(p.name for p in base.glob("step_*.tmp")) if base.is_dir() else []
        if found.damaged:
            raise CheckpointError(f"{named}: no intact checkpoint in {base} ("
                                  + "; ".join(f"{d.name}: {why}" for d, why in found.damaged) + ")")
        raise CheckpointError(f"{named}: no checkpoint there (expected a step_N directory with trainer_state.json, "
                              "or a run or checkpoints directory holding them)"
                              + (f"; only incomplete saves there: {', '.join(partial)}" if partial else ""))
    return found


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def resolve(path: str | Path, checksums_too: bool = False, log: Callable[[str], None] = _warn) -> Path:
    """The checkpoint `path` means: a step directory (it must be intact), or the newest intact one
    in a checkpoints or run directory (damaged newer ones named through `log`). Sizes are always
    checked, checksums with `checksums_too`. Raises CheckpointError when there is none."""
    return _open(Path(path), "", checksums_too, False, False, None, log).path


def read_trainer_state(path: str | Path) -> dict:
    return _read_json(resolve(path) / "trainer_state.json")


# Every model field of the math a checkpoint's weights were trained for (the vocabulary may
# differ by padding only: the tokenizer's fingerprint decides whether the ids mean the same).
_MATH_FIELDS = ("hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size", "norm", "norm_eps", "activation",
                "position_embedding", "tie_embeddings")


def check_tokenizer(saved: ModelConfig, path: str | Path, tokenizer_vocab_size: int, tokenizer: str | Path) -> None:
    """Refuse a tokenizer of another size than the one a checkpoint's model trained with (0: not
    recorded, a checkpoint saved before model.tokenizer_vocab_size existed)."""
    if saved.tokenizer_vocab_size not in (0, tokenizer_vocab_size):
        raise CheckpointError(f"checkpoint {path} was trained with a tokenizer of {saved.tokenizer_vocab_size} ids; "
                              f"the tokenizer {tokenizer} has {tokenizer_vocab_size}: it is not this model's tokenizer")


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint records of its tokenizer, to refuse a start under another vocabulary."""
    return {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}


def _saved_tokenizer(saved_state: dict) -> dict | None:
    """The checkpoint's tokenizer record; a checkpoint from before it was kept has the
    fingerprint in its data state."""
    if "tokenizer" in saved_state:
        return saved_state["tokenizer"]
    fingerprint = saved_state.get("data", {}).get("fingerprint", {}).get("tokenizer")
    return {"fingerprint": fingerprint} if fingerprint else None


def check_checkpoint_matches(saved_state: dict, model: ModelConfig, tokenizer, tokenizer_path: str,
                             path: Path) -> None:
    """Stop before any work when a checkpoint's weights do not fit this run: every differing
    model field of the math, and another tokenizer (other ids), named with both values."""
    saved = config_from_dict(saved_state["config"], model_only=True).model  # an import has no data sources
    fields = _MATH_FIELDS + (("rope_theta",) if model.position_embedding == "rope" else ("max_seq_len",))
    problems = [f"model.{name}: checkpoint {getattr(saved, name)!r}, this config {getattr(model, name)!r}"
                for name in fields if getattr(saved, name) != getattr(model, name)]
    if saved.vocab_size < tokenizer.vocab_size:
        problems.append(f"model.vocab_size: checkpoint {saved.vocab_size} rows, fewer than the "
                        f"{tokenizer.vocab_size} ids of data.tokenizer={tokenizer_path}")
    record = _saved_tokenizer(saved_state)
    if record is not None and record["fingerprint"] != tokenizer.fingerprint:
        problems.append(f"tokenizer: checkpoint vocabulary {record['fingerprint'][:12]} "
                        f"({record.get('vocab_size', '?')} ids), data.tokenizer={tokenizer_path} has "
                        f"{tokenizer.fingerprint[:12]} ({tokenizer.vocab_size} ids): the ids mean other tokens")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this run:\n  " + "\n  ".join(problems))


@dataclass
class Start:
    """Where a launch starts."""
    path: Path | None = None
    """The checkpoint (None: step 0 with fresh weights)."""
    weights_only: bool = False
    saved: dict | None = None
    """Its trainer_state.json."""
    damaged: list[str] = field(default_factory=list)
    """The run's own step folders that failed verification: pruning keeps them and everything older."""
    continued: bool = False
    """A run's first start from checkpoint.continue_from: weights and optimizer state, new LR plan."""


def starting_point(config: CheckpointConfig, run_dir: Path, fits: Fits | None = None,
                   log: Callable[[str], None] = print, distributed: bool = True) -> Start:
    """Where a launch starts. A run directory that holds checkpoints resumes from its newest intact
    one, so a relaunch continues instead of starting over from `init_from`; an explicit `load` wins,
    but may not point elsewhere when that would overwrite the run directory's own checkpoints. A
    run directory whose step folders are all damaged is refused unless `allow_fresh_start`.
    Every candidate is verified (sizes, `fits`, then checksums split over the ranks)."""
    own_dir = run_dir / "checkpoints"
    own = step_dirs(own_dir)
    if config.load:
        found = _open(Path(config.load), "checkpoint.load", True, distributed, False, fits, log)
        if own and found.path.resolve().parent != own_dir.resolve():
            raise CheckpointError(f"train.output_dir={run_dir} already holds checkpoints (newest {own[-1].name}); "
                                  f"checkpoint.load={config.load} is another run's, and saving here would overwrite "
                                  "them: choose another train.output_dir, or drop checkpoint.load to resume it")
        return Start(found.path, found.saved.get("weights_only", False), found.saved,
                     [d.name for d, _ in found.damaged] if own else [])
    damaged = []
    if own:
        found = _newest_intact(own_dir, True, distributed, False, fits, log)
        damaged = [d.name for d, _ in found.damaged]
        if found.path is not None:
            return Start(found.path, found.saved.get("weights_only", False), found.saved, damaged)
        if not config.allow_fresh_start:
            raise CheckpointError(f"train.output_dir={run_dir} holds checkpoints but none is intact ("
                                  + "; ".join(f"{d.name}: {why}" for d, why in found.damaged)
                                  + "): restore one, or pass --checkpoint.allow_fresh_start=true to start again "
                                    "from step 0 (they are kept)")
        log(f"warning: starting again from step 0, as checkpoint.allow_fresh_start=true, although {own_dir} holds "
            f"checkpoints, none intact (kept): " + "; ".join(f"{d.name}: {why}" for d, why in found.damaged))
    seed_field = "continue_from" if config.continue_from else "init_from"  # the config allows one of them
    seed = getattr(config, seed_field)
    if seed:  # a run's first start; continue_from also takes the optimizer state (Trainer)
        found = _open(Path(seed), f"checkpoint.{seed_field}", True, distributed, True, fits, log)
        return Start(found.path, True, found.saved, damaged, continued=seed_field == "continue_from")
    return Start(damaged=damaged)


def _reason(error: BaseException) -> str:
    """One line for an exception: DCP's CheckpointException by the first failing rank's own error."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, failure = next(iter(error.failures.items()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {_reason(inner)}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else f"{error.strerror} ({type(error).__name__})"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def _dcp_errors(step_dir: Path):
    """DCP's errors reading `step_dir` (a damaged file that no manifest caught first, as in a
    checkpoint saved before manifests existed) as one line naming the folder."""
    try:
        yield
    except (CheckpointException, OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {step_dir} is unreadable: {_reason(e)}") from e


def load_model_state(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint, full size on CPU, keyed by the single-process model's
    names; verified (sizes and checksums; `verify=False`: a step directory the caller verified)
    and read in this process with no process group, whatever layout wrote it."""
    step_dir = resolve(path, checksums_too=True) if verify else Path(path)
    with _dcp_errors(step_dir):
        reader = dcp.FileSystemReader(step_dir)
        metadata = reader.read_metadata().state_dict_metadata
        state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()
                 if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # DCP warns that there is no process group: that is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, no_dist=True)
    return {k[len("model."):]: v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------
# RNG states as plain data

def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def rng_file(pp: int, tp: int) -> str:
    return f"rng_pp{pp}_tp{tp}.json"


def _saved_rng_files(step_dir: Path, saved_layout: str) -> dict[tuple[int, int], Path]:
    """(pp, tp) -> the file holding that coordinate's RNG states. A checkpoint saved before they
    were keyed holds one file per global rank: those of data-parallel rank 0 are mapped through
    the layout it recorded (ranks laid out as a (pp, dp, tp) mesh)."""
    names = [f.name for f in step_dir.iterdir()]
    files = {(int(m[1]), int(m[2])): step_dir / m[0] for m in map(_RNG_FILE.fullmatch, names) if m}
    sizes = re.fullmatch(r"tp(\d+)-pp(\d+)-dp(\d+)", saved_layout or "")
    if files or not sizes:
        return files
    tp, _, dp = (int(x) for x in sizes.groups())
    ranks = [int(m[1]) for m in map(_LEGACY_RNG_FILE.fullmatch, names) if m]
    return {(r // (dp * tp), r % tp): step_dir / f"rng_rank{r}.json" for r in ranks if (r // tp) % dp == 0}


class Coordinates(Protocol):
    """Where this rank sits in the layout (parallel/distributed.py's Runtime)."""

    def coordinate(self, dim: str) -> int: ...

    def size(self, dim: str) -> int: ...


# ----------------------------------------------------------------------------------------------
# vocabulary padding: load rows into a table of another height

def _is_vocab_tensor(key: str) -> bool:
    return any(key == f"model.{n}" or key.startswith(f"optimizer.state.{n}.") for n in VOCAB_PARAMETERS)


def _flat_keys(state: dict) -> dict[str, tuple[str, str]]:
    """DCP's key of every entry of {component: {name: value}} -> (component, name)."""
    return {f"{outer}.{inner}": (outer, inner) for outer, inner_state in state.items() for inner in inner_state}


def _padding_stand_ins(flat: dict, saved: dict) -> dict[str, torch.Tensor]:
    """Full-size buffers of the saved shape for vocab tensors whose height differs; other shape
    differences are errors naming the tensor."""
    stand_ins = {}
    for key, value in flat.items():
        meta = saved.get(key)
        if not isinstance(value, torch.Tensor) or not isinstance(meta, TensorStorageMetadata):
            continue
        if tuple(meta.size) == tuple(value.shape):
            continue
        if not (_is_vocab_tensor(key) and tuple(meta.size)[1:] == tuple(value.shape)[1:]):
            raise CheckpointError(f"checkpoint tensor {key} has shape {tuple(meta.size)}, this model's is "
                                  f"{tuple(value.shape)}: the model config differs from the checkpoint's")
        stand_ins[key] = torch.empty(meta.size, dtype=value.dtype, device="cpu")
    return stand_ins


@torch.no_grad()
def _copy_rows(full: torch.Tensor, target: torch.Tensor) -> None:
    """Copy the rows `target` (this rank's shard of a possibly taller or shorter table) shares with `full`."""
    if isinstance(target, DTensor):
        shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        target = target.to_local()
    else:
        shape, offset = target.shape, (0,) * target.dim()
    rows = max(0, min(shape[0], full.shape[0] - offset[0]))
    region = tuple(slice(o, o + s) for o, s in zip(offset[1:], shape[1:]))
    target[:rows].copy_(full[(slice(offset[0], offset[0] + rows),) + region])


# ----------------------------------------------------------------------------------------------

class _SaveFailed(Exception):
    pass


def _free_space(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    return (f" ({free / 2**30:.2f} GiB free there when it failed)" if free >= 2**30
            else f" ({free:,} bytes free there when it failed)")


class Checkpointer:
    """Saves and loads one dict of components. `sharded` states (model, optimizer) go through DCP,
    `plain` ones (train, data) into trainer_state.json; RNG states go per (pp, tp) coordinate.
    `damaged` names the step folders that failed verification at the start (see `_prune`)."""

    def __init__(self, directory: Path, keep_last: int, sharded: dict[str, Stateful], plain: dict[str, Stateful],
                 metadata: dict, layout: Coordinates, damaged: list[str] = ()):
        self.directory, self.keep_last = directory, keep_last
        self.sharded, self.plain, self.metadata, self.layout = sharded, plain, metadata, layout
        self.damaged = set(damaged)
        self.resumed_from: Path | None = None

    def _log(self, message: str) -> None:
        if dist.get_rank() == 0:
            print(message)

    def _together(self, runs_here: bool, action: Callable[[], None]) -> None:
        """`action` on the ranks where `runs_here`; if it fails on any, every rank raises, so no
        rank waits at a later collective for one that gave up."""
        error = None
        if runs_here:
            try:
                action()
            except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
                error = _reason(e)
        failed = [e for e in agree(error, distributed=True) if e]
        if failed:
            raise _SaveFailed(failed[0])

    def save(self, step: int) -> Path:
        """Write step_N: every rank's DCP shards and RNG states, then (rank 0) trainer_state.json
        and the manifest of every file's size and checksum (each rank checksums its share), then
        the rename. A failure on any rank removes the .tmp folder and raises CheckpointError on
        every rank; the checkpoints already there are untouched."""
        main = dist.get_rank() == 0
        final = self.directory / f"step_{step:07d}"
        tmp = self.directory / f"step_{step:07d}.tmp"
        if self.resumed_from is not None and final.resolve() == self.resumed_from.resolve():
            return final  # no step since it was loaded: it holds this state, and replacing it risks it
        try:
            self._together(main, lambda: self._start_save(tmp))
            dcp.save({name: component.state_dict() for name, component in self.sharded.items()}, checkpoint_id=tmp)
            pp, tp = self.layout.coordinate("pp"), self.layout.coordinate("tp")
            self._together(self.layout.coordinate("dp") == 0,  # data-parallel replicas hold the same states
                           lambda: write_durably(tmp / rng_file(pp, tp), json.dumps(_rng_state())))
            listing = [{f.name: f.stat().st_size for f in tmp.iterdir()} if main else None]
            if dist.get_world_size() > 1:
                dist.broadcast_object_list(listing, src=0)
            sums = checksums(tmp, listing[0], distributed=True)
            self._together(main, lambda: self._finish_save(step, tmp, final, sums))
        except (Exception, CheckpointException) as e:
            free = _free_space(self.directory)  # before the partial save goes
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = [d.name for d in step_dirs(self.directory) if d != final]
            reason = str(e) if isinstance(e, _SaveFailed) else _reason(e)
            raise CheckpointError(f"saving checkpoint {final} failed: {reason}{free}; its partial save {tmp.name} "
                                  "was removed" + (f", the checkpoints already there are untouched (newest {kept[-1]})"
                                                   if kept else "")) from e
        return final

    def _start_save(self, tmp: Path) -> None:
        for stale in self.directory.glob("step_*.tmp"):  # left by a save that did not finish
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)

    def _finish_save(self, step: int, tmp: Path, final: Path, sums: dict[str, str | None]) -> None:
        unreadable = [name for name, value in sums.items() if value is None]
        if unreadable:
            raise OSError(f"could not read {tmp / unreadable[0]} back to checksum it")
        state = {"step": step, "weights_only": False, "manifest": True, **self.metadata,
                 **{name: component.state_dict() for name, component in self.plain.items()}}
        write_durably(tmp / "trainer_state.json", json.dumps(state, indent=1))
        write_manifest(tmp, {**sums, "trainer_state.json": file_checksum(tmp / "trainer_state.json")})
        shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step (a resumed run's replay)
        tmp.replace(final)
        fsync_path(self.directory)
        self.damaged.discard(final.name)
        try:
            write_durably(self.directory / "latest", final.name)
        except OSError as e:  # only a hint: the checkpoint is complete without it
            print(f"warning: {e.filename}: {e.strerror}; {final} is complete")
        self._prune(final)

    def _prune(self, just_written: Path) -> None:
        """Keep the newest `keep_last` by step number, and always: the checkpoint just written, the
        newest intact one, every damaged one (failed verification at the start, or whose sizes no
        longer match its manifest) and everything older than a damaged one."""
        done = step_dirs(self.directory)
        damaged = [d for d in done if d != just_written and (d.name in self.damaged or problem(d, checksums_too=False))]
        intact = [d for d in done if d not in damaged]
        keep = set(done[-self.keep_last:]) | {just_written} | set(damaged) | set(intact[-1:])
        newest_damaged = max((_step(d) for d in damaged), default=-1)
        for old in done:
            if old not in keep and _step(old) > newest_damaged:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, step_dir: Path, weights_only: bool = False, saved: dict | None = None,
             continue_run: bool = False) -> bool:
        """Load a checkpoint (a step directory `starting_point` chose and verified) into the
        components in place. With `weights_only` (or a weights-only checkpoint) only the model's
        weights; with `continue_run` the sharded states (model and optimizer) but no plain state
        nor RNG. Returns whether everything was resumed."""
        step_dir = Path(step_dir)
        saved = saved if saved is not None else _read_json(step_dir / "trainer_state.json")
        weights_only = weights_only or saved.get("weights_only", False)
        names = ["model"] if weights_only else list(self.sharded)
        if not (weights_only or continue_run):  # plain states first: the data pipeline checks that its order can continue
            missing = [name for name in self.plain if name not in saved]
            if missing:
                raise CheckpointError(f"{step_dir} has no {missing} state: an older format; start from its weights "
                                      f"with --checkpoint.init_from={step_dir}")
            for name, component in self.plain.items():
                component.load_state_dict(saved[name])
        state = {name: self.sharded[name].state_dict() for name in names}
        keys = _flat_keys(state)
        flat = {key: state[outer][inner] for key, (outer, inner) in keys.items()}
        with _dcp_errors(step_dir):
            stored = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
        stand_ins = _padding_stand_ins(flat, stored)
        loaded = {**flat, **stand_ins}
        with _dcp_errors(step_dir):
            dcp.load(loaded, checkpoint_id=step_dir)  # tensors in place; other values replaced in `loaded`
        for key, (outer, inner) in keys.items():
            if key in stand_ins:
                _copy_rows(stand_ins[key], flat[key])
            else:
                state[outer][inner] = loaded[key]
        for name in names:
            self.sharded[name].load_state_dict(state[name])
        if weights_only or continue_run:
            return False
        self._restore_rng(step_dir, saved.get("layout", ""))
        self.resumed_from = step_dir
        return True

    def _restore_rng(self, step_dir: Path, saved_layout: str) -> None:
        """This rank's RNG states from the file of its (pp, tp) coordinate. Under another layout,
        one line names the coordinates whose states were dropped and those left with the seeded
        states (no file for them)."""
        files = _saved_rng_files(step_dir, saved_layout)
        here = (self.layout.coordinate("pp"), self.layout.coordinate("tp"))
        if here in files:
            _set_rng_state(_read_json(files[here]))
        pp, tp = self.layout.size("pp"), self.layout.size("tp")
        dropped = sorted(key for key in files if key[0] >= pp or key[1] >= tp)
        unset = [(p, t) for p in range(pp) for t in range(tp) if (p, t) not in files]
        if dropped or unset:
            def named(keys):
                return ", ".join(f"(pp={p}, tp={t})" for p, t in keys)
            self._log(f"warning: {step_dir} was saved under layout {saved_layout or 'unknown'}: "
                      + "; ".join(part for part in (
                          f"RNG states of {named(dropped)} dropped (no such ranks now)" if dropped else "",
                          f"ranks at {named(unset)} keep their seeded RNG states (none saved)" if unset else "")
                          if part))
