"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of `<run>/checkpoints/step_000100/`:
  *.distcp, .metadata   model and optimizer state, keyed by parameter name (DCP reshards on load)
  trainer_state.json    step, mixture state, the full config
  rng_rank<r>.pt        each rank's RNG states
A checkpoint is written to `step_N.tmp` and renamed when complete; `latest` names the newest.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size",
                       "max_seq_len", "norm", "activation", "position_embedding", "rope_theta", "tie_embeddings")
"""What must agree between a checkpoint's model and the model that starts from its weights."""


class CheckpointError(RuntimeError):
    pass


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int):
        self.directory, self.keep_last = directory, keep_last

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict) -> Path:
        rank = dist.get_rank()
        final = self.directory / f"step_{step:07d}"
        tmp = self.directory / f"step_{step:07d}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.directory / "latest", final.name)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.directory.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load model and optimizer state in place; returns the trainer state."""
        step_dir = resolve(path)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=step_dir)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = step_dir / f"rng_rank{dist.get_rank()}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((step_dir / "trainer_state.json").read_text())


def check_init_from(path: str | Path, model_config) -> Path:
    """The step directory `checkpoint.init_from` names, after checking that its model has this
    config's architecture (every differing field is named)."""
    step_dir = resolve(path)
    from megatron_code.config import ModelConfig

    saved = json.loads((step_dir / "trainer_state.json").read_text()).get("config", {}).get("model")
    try:
        theirs = ModelConfig(**saved)
    except TypeError as e:
        raise CheckpointError(f"checkpoint.init_from={path}: {step_dir}/trainer_state.json has no readable model "
                              f"config ({e})") from None
    differ = [f"model.{f}: checkpoint {getattr(theirs, f)!r}, this run {getattr(model_config, f)!r}"
              for f in ARCHITECTURE_FIELDS if getattr(theirs, f) != getattr(model_config, f)]
    if differ:
        raise CheckpointError(f"checkpoint.init_from={path} holds another model:\n  " + "\n  ".join(differ)
                              + "\nset the model section as it was trained (e.g. the same model.preset)")
    return step_dir


def load_model_weights(step_dir: Path, model: torch.nn.Module) -> None:
    """Only the model's weights from a checkpoint (a full one, or a weights-only one)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=step_dir)
    set_model_state_dict(model, state["model"])
