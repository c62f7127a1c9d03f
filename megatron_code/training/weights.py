"""Model weights of a checkpoint, read and written with no process group and no GPU.

Model state in a checkpoint is keyed "model.<parameter name>" with full (canonical) shapes,
whatever tensor/pipeline/data-parallel layout saved it, so one process reads it through DCP's
no-dist path (checkpoint.load_model_state). Used by conversion (tools/convert_checkpoint.py) and
evaluation, and to write weights-only checkpoints: the usual step directory holding only model
tensors, with trainer_state.json {"step": 0, "weights_only": true, "config": ..., "tokenizer":
{"fingerprint", "vocab_size"}}, from which a
run starts (`checkpoint.init_from`, or `--load`) with a fresh optimizer, schedule and data.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from megatron_code.config import Config, config_from_dict
from megatron_code.training.checkpoint import (CheckpointError, load_model_state, read_trainer_state, resolve,
                                               tokenizer_record)
from megatron_code.training.integrity import file_checksum, write_manifest

MODEL_PREFIX = "model."


@dataclass
class CheckpointWeights:
    path: Path
    """The step directory read."""
    step: int
    config: Config
    state: dict[str, torch.Tensor]
    """Parameter name (no "model." prefix) -> full tensor, as saved (fp32 from training)."""


def find_step_dir(path: str | Path) -> Path:
    """The complete step directory meant by `path` (a step, checkpoints or run directory);
    an incomplete `step_N.tmp` is refused by name. Sizes and checksums are verified (a damaged
    newest checkpoint of a run directory is named and the newest intact one taken)."""
    path = Path(path)
    if path.name.endswith(".tmp") and path.name.startswith("step_"):
        raise CheckpointError(f"{path} is incomplete (a .tmp step directory is a save that did not finish); "
                              "use a complete step_N directory")
    return resolve(path, checksums_too=True)


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    """Parameter name -> shape of our GPT for `config`, without allocating it."""
    from megatron_code.model import GPT

    with torch.device("meta"):
        model = GPT(config.model)
    return {name: p.shape for name, p in model.state_dict().items()}


def read_checkpoint(path: str | Path) -> CheckpointWeights:
    """The model weights and config of a checkpoint; names every missing or misshapen tensor."""
    step_dir = find_step_dir(path)
    trainer_state = read_trainer_state(step_dir)
    if "config" not in trainer_state:
        raise CheckpointError(f"{step_dir}/trainer_state.json has no config")
    config = config_from_dict(trainer_state["config"], model_only=True)
    try:
        stored = load_model_state(step_dir, verify=False)  # verified by find_step_dir
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{step_dir}: unreadable checkpoint ({e})") from None
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in stored]
    if missing:
        raise CheckpointError(f"{step_dir} lacks {len(missing)} model tensor(s) the config needs: "
                              + ", ".join(MODEL_PREFIX + n for n in missing[:6]) + (" ..." if len(missing) > 6 else ""))
    for name, shape in shapes.items():
        if stored[name].shape != shape:
            raise CheckpointError(f"{step_dir}: {MODEL_PREFIX}{name} has shape {tuple(stored[name].shape)}, the "
                                  f"config needs {tuple(shape)}")
    return CheckpointWeights(step_dir, int(trainer_state.get("step", 0)), config, {n: stored[n] for n in shapes})


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(GPT with the checkpoint's weights in eval mode on CPU, CheckpointWeights)."""
    from megatron_code.model import GPT

    weights = read_checkpoint(path)
    model = GPT(weights.config.model)
    model.load_state_dict(weights.state)
    return model.to(dtype).eval(), weights


def write_weights_only(run_dir: str | Path, state: dict[str, torch.Tensor], config: Config, tokenizer=None) -> Path:
    """`run_dir/checkpoints/step_0000000` with only model tensors; returns the step directory.
    With the `tokenizer` the weights were trained with, its fingerprint is recorded, so a start
    from them under another vocabulary is refused."""
    shapes = expected_shapes(config)
    wrong = [n for n in shapes if n not in state or state[n].shape != shapes[n]] + sorted(set(state) - set(shapes))
    if wrong:
        raise CheckpointError(f"weights do not fit the config: {', '.join(wrong[:6])}")
    directory = Path(run_dir) / "checkpoints"
    final, tmp = directory / "step_0000000", directory / "step_0000000.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
        dcp.save({"model": {k: v.contiguous() for k, v in state.items()}}, checkpoint_id=tmp, no_dist=True)
    trainer_state = {"step": 0, "weights_only": True, "manifest": True, "config": config.to_dict(),
                     **({"tokenizer": tokenizer_record(tokenizer)} if tokenizer is not None else {})}
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    write_manifest(tmp, {f.name: file_checksum(f) for f in tmp.iterdir()})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = directory / "latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, directory / "latest")
    return final
