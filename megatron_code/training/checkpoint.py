"""Checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own shards, any
parallel layout reads any other's, and nothing half-written is ever taken for a checkpoint.

Layout of `<run>/checkpoints/step_0000100/`:
  *.distcp, .metadata   DCP tensors: "model.<name>" for every parameter, and the optimizer state
                        as "optimizer.state.<name>.<exp_avg|exp_avg_sq|step>" and
                        "optimizer.param_groups.<name>.<lr|betas|...>"
  trainer_state.json    {"step", "weights_only", "config", "layout", "tokenizer" (its fingerprint
                        and size), and each plain-data state:
                        "train" (the step counter), "data" (the data pipeline's position)}
  rng_rank<r>.json      each rank's RNG states, as plain data
A checkpoint is written to `step_N.tmp`, fsynced, renamed; then `latest` names it. Saving prunes
stale `step_*.tmp` directories and keeps the newest `keep_last` checkpoints by step number
(never the one just written).

Starting a run (`starting_point`, `check_checkpoint_matches`): a train.output_dir holding checkpoints
resumes from its latest (a relaunch never restarts from `init_from` nor overwrites them);
`load` overrides `init_from`. Model math and tokenizer are checked from trainer_state.json alone.

Contract for readers (conversion, evaluation, `init_from`):
- "model.<name>" holds each parameter under the single-process model's name (`layers.3.mlp.up.weight`)
  in its full canonical shape whatever the layout that wrote it: tensor-parallel shards are
  DTensors saved with their placements, pipeline stages keep global names, FSDP shards merge.
  The fused SwiGLU weight is (2, ffn, hidden) = (gate, up); qkv is grouped per kv head as
  [q_1..q_g, k, v]; the vocabulary is padded (rows past the tokenizer's vocabulary are padding).
  The config in trainer_state.json says how to read them. `load_model_state(path)` reads them
  in one process, with no process group.
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

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megatron_code.config import ModelConfig, config_from_dict

VOCAB_PARAMETERS = ("embedding.weight", "output.weight")
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    pass


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainState:
    """The step counter, a plain-data state of its own, and the step the run started at (not 0
    for a run continued from another's checkpoint: checkpoint.continue_from)."""

    def __init__(self) -> None:
        self.step = 0
        self.first_step = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "first_step": self.first_step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.first_step = int(state.get("first_step", 0))


# ----------------------------------------------------------------------------------------------
# files

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def resolve(path: str | Path) -> Path:
    """A step directory, or a checkpoints directory (its `latest`), or a run directory."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for base in (path, path / "checkpoints"):
        if (base / "latest").is_file():
            step_dir = base / (base / "latest").read_text().strip()
            if (step_dir / "trainer_state.json").is_file():
                return step_dir
    raise CheckpointError(f"checkpoint.load={path}: no checkpoint there (expected a step_N directory "
                          f"with trainer_state.json, or a directory with a `latest` file)")


def read_trainer_state(path: str | Path) -> dict:
    return json.loads((resolve(path) / "trainer_state.json").read_text())


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


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint a run directory holds, or None."""
    try:
        return resolve(Path(run_dir) / "checkpoints")
    except CheckpointError:
        return None


def starting_point(load: str, init_from: str, run_dir: Path) -> tuple[Path | None, bool]:
    """(checkpoint to start from, whether only its weights) for a launch. A run directory that
    holds checkpoints is resumed from its latest, so a relaunch continues instead of starting
    over from `init_from`; an explicit `load` wins, but may not point elsewhere when that would
    overwrite the run directory's own checkpoints."""
    own = latest_checkpoint(run_dir)
    if load:
        path = resolve(load)
        if own is not None and path.resolve().parent != own.resolve().parent:
            raise CheckpointError(f"train.output_dir={run_dir} already holds checkpoints (latest {own.name}); "
                                  f"checkpoint.load={load} is another run's, and saving here would overwrite "
                                  "them: choose another train.output_dir, or drop checkpoint.load to resume it")
        return path, False
    if own is not None:
        return own, False
    return (resolve(init_from), True) if init_from else (None, False)


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint, full size on CPU, keyed by the single-process model's
    names; read in this process with no process group, whatever layout wrote it."""
    reader = dcp.FileSystemReader(resolve(path))
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

class Checkpointer:
    """Saves and loads one dict of components. `sharded` states (model, optimizer) go through DCP,
    `plain` ones (train, data) into trainer_state.json; RNG states go per rank."""

    def __init__(self, directory: Path, keep_last: int, sharded: dict[str, Stateful], plain: dict[str, Stateful],
                 metadata: dict):
        self.directory, self.keep_last = directory, keep_last
        self.sharded, self.plain, self.metadata = sharded, plain, metadata

    def save(self, step: int) -> Path:
        rank = dist.get_rank()
        final = self.directory / f"step_{step:07d}"
        tmp = self.directory / f"step_{step:07d}.tmp"
        if rank == 0:
            for stale in self.directory.glob("step_*.tmp"):  # left by a save that did not finish
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save({name: component.state_dict() for name, component in self.sharded.items()}, checkpoint_id=tmp)
        _write_durable(tmp / f"rng_rank{rank}.json", json.dumps(_rng_state()))
        dist.barrier()
        if rank == 0:
            state = {"step": step, "weights_only": False, **self.metadata,
                     **{name: component.state_dict() for name, component in self.plain.items()}}
            _write_durable(tmp / "trainer_state.json", json.dumps(state, indent=1))
            for written in tmp.iterdir():
                _fsync(written)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync(self.directory)
            _write_durable(self.directory / "latest", final.name)
            self._prune(final)
        dist.barrier()
        return final

    def _prune(self, just_written: Path) -> None:
        done = sorted((p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)),
                      key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))
        for old in done[: -self.keep_last]:
            if old != just_written:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path, weights_only: bool = False, continue_run: bool = False) -> bool:
        """Load a checkpoint into the components in place. With `weights_only` (or a weights-only
        checkpoint) only the model's weights; with `continue_run` the sharded states (model and
        optimizer) but no plain state nor RNG. Returns whether everything was resumed."""
        step_dir = resolve(path)
        saved = json.loads((step_dir / "trainer_state.json").read_text())
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
        stand_ins = _padding_stand_ins(flat, dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata)
        loaded = {**flat, **stand_ins}
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
        rng_file = step_dir / f"rng_rank{dist.get_rank()}.json"
        if rng_file.is_file():  # absent when resuming on more ranks than saved
            _set_rng_state(json.loads(rng_file.read_text()))
        return True
