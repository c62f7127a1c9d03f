"""Megatron-LM checkpoint directories read and written in one process, with no process group and
without Megatron-LM: the legacy `torch` format, `torch_dist` (megatron-core's dist_checkpointing)
and `torch_dcp` (read). The layouts themselves are in model/megatron_lm.py.

A save folder (`--save`) holds `latest_checkpointed_iteration.txt` and `iter_0000100/` (or
`release/`):
- `torch`: `iter_*/mp_rank_TT[_PPP]/model_optim_rng.pt` per (tensor, pipeline) rank, a pickle of
  {"args", "iteration", "checkpoint_version", "model" or "model0", "model1", ... per virtual
  stage, and optimizer and RNG states we do not read};
- `torch_dist`: PyTorch DCP files whose tensors are megatron-core's sharded keys at full size
  (`decoder.layers.*` stacked per layer), `common.pt` (args, iteration) and `metadata.json`;
- `torch_dcp`: PyTorch DCP of the legacy state dict (Megatron-LM's FSDP2 format).

Pickles are read with torch's weights-only unpickler: classes a checkpoint names beyond plain
data (Megatron-LM's enums and the like) become inert placeholders, so reading a checkpoint runs
none of its code and needs no Megatron-LM installed.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_code.config import ModelConfig
from megatron_code.model import megatron_lm as layout
from megatron_code.model.hf import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")
TORCH_DIST_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                       "common_backend_version": 1}
CHECKPOINT_VERSION = 3.0


@dataclass
class MegatronCheckpoint:
    path: Path
    """The iteration directory read."""
    format: str
    """torch | torch_dist | torch_dcp"""
    iteration: int
    args: argparse.Namespace
    config: ModelConfig
    zero_centered_gamma: bool
    """The norms store w - 1 (`--apply-layernorm-1p`); `state` holds them as stored."""
    tensor: int
    pipeline: int
    virtual: int
    state: dict[str, torch.Tensor]
    """Canonical megatron-core tensors (model/megatron_lm.py), as stored (bf16 from a bf16 run)."""


# ------------------------------------------------------------------------------------------ pickles


class _Placeholder:
    """Stands for a class or function a checkpoint names that is not plain data; keeps what it
    was given and does nothing."""

    def __new__(cls, *args, **kwargs):
        placeholder = object.__new__(cls)
        placeholder.args = args
        return placeholder

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{type(self).__name__}{self.args!r}>"


def _placeholder_for(name: str) -> tuple[type, str]:
    return type(name.rsplit(".", 1)[-1], (_Placeholder,), {}), name


def load_pickle(source: Path | io.BytesIO, mmap: bool = False):
    """A `torch.save` file read by the weights-only unpickler; argparse.Namespace is real, any
    other non-data global becomes a placeholder."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    allowed = [argparse.Namespace] + [_placeholder_for(name) for name in unsafe if name != "argparse.Namespace"]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # torch refuses some modules (os, subprocess, ...) outright
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
        raise ConversionError(f"{getattr(source, 'name', source)}: refused to unpickle ({reason})") from None


# ------------------------------------------------------------------------------------------ reading


def iteration_dir(save_dir: str | Path, iteration: int | None = None) -> tuple[Path, int]:
    """The iteration directory `--iteration` or the tracker file picks in a save folder."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise ConversionError(f"--megatron-lm {save_dir}: no such directory")
    if iteration is None:
        tracker = save_dir / TRACKER
        if not tracker.is_file():
            found = sorted(p.name for p in save_dir.glob("iter_*")) + (["release"] if (save_dir / "release").is_dir() else [])
            raise ConversionError(f"{tracker}: no such file; --megatron-lm takes the save folder that holds it"
                                  + (f" (or pass --iteration N: found {', '.join(found[-5:])})" if found else ""))
        text = tracker.read_text().strip()
        if text == "release":
            return save_dir / "release", 0
        if not text.isdigit():
            raise ConversionError(f"{tracker} holds {text!r}, not an iteration number or 'release'")
        iteration = int(text)
    path = save_dir / f"iter_{iteration:07d}"
    if not path.is_dir():
        raise ConversionError(f"{path}: no such iteration directory")
    return path, iteration


def checkpoint_format(path: Path) -> str:
    if (path / "metadata.json").is_file():
        backend = json.loads((path / "metadata.json").read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ConversionError(f"{path}/metadata.json: sharded_backend={backend!r}; import reads torch_dist")
        return "torch_dist"
    if any(RANK_DIR.fullmatch(p.name) for p in path.iterdir()):
        return "torch"
    if (path / ".metadata").is_file():
        return "torch_dcp"
    raise ConversionError(f"{path}: neither mp_rank_* folders (torch), metadata.json (torch_dist) nor .metadata "
                          "(torch_dcp): not a Megatron-LM checkpoint")


def read_megatron_lm(save_dir: str | Path, iteration: int | None = None) -> MegatronCheckpoint:
    """The model of a Megatron-LM checkpoint as canonical tensors, with its arguments; refuses
    (one line per problem) a model we cannot express before reading the weights."""
    path, iteration = iteration_dir(save_dir, iteration)
    reader = {"torch": _read_legacy, "torch_dist": _read_torch_dist, "torch_dcp": _read_torch_dcp}[checkpoint_format(path)]
    return reader(path, iteration)


def _model_args(source: str, stored: dict) -> argparse.Namespace:
    args = stored.get("args")
    if not isinstance(args, argparse.Namespace):
        raise ConversionError(f"{source} holds no Megatron-LM args (saved by a tool that keeps only weights?); "
                              "import needs them to know the model's shape")
    return args


def _rank_files(path: Path) -> dict[tuple[int, int], Path]:
    files = {}
    for folder in path.iterdir():
        match = RANK_DIR.fullmatch(folder.name)
        if not match:
            continue
        if match.group(3) is not None:
            raise ConversionError(f"{folder}: expert-parallel ranks (a mixture-of-experts model, --num-experts) "
                                  "cannot be imported")
        files[(int(match.group(1)), int(match.group(2) or 0))] = folder / RANK_FILE
    tensor, pipeline = max(t for t, _ in files) + 1, max(p for _, p in files) + 1
    missing = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pipeline > 1 else "") for t in range(tensor) for p in range(pipeline)
               if not files.get((t, p), Path("/nonexistent")).is_file()]
    if missing:
        raise ConversionError(f"{path}: {len(missing)} rank file(s) missing: "
                              + ", ".join(f"{m}/{RANK_FILE}" for m in missing[:4]))
    return files


def _check_layout(path: Path, args, tensor: int, pipeline: int) -> None:
    saved = (layout.arg(args, "tensor_model_parallel_size", 1), layout.arg(args, "pipeline_model_parallel_size", 1))
    if saved != (tensor, pipeline):
        raise ConversionError(f"{path} holds {tensor} x {pipeline} (tensor x pipeline) rank files but its args say "
                              f"tensor_model_parallel_size={saved[0]}, pipeline_model_parallel_size={saved[1]}")


def _model_chunks(stored: dict, source: Path) -> list[dict[str, torch.Tensor]]:
    """The model state of each virtual stage in a rank file, names of the local spec."""
    keys = ["model"] if "model" in stored else sorted((k for k in stored if re.fullmatch(r"model\d+", k)),
                                                      key=lambda k: int(k[5:]))
    if not keys:
        raise ConversionError(f"{source} holds no model weights (no 'model' entry)")
    chunks = []
    for key in keys:
        state = layout.from_te_names(stored[key])
        other = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
        if other:
            raise ConversionError(f"{source}: {key}.{other[0]} is not a tensor")
        chunks.append(state)
    return chunks


def _read_legacy(path: Path, iteration: int) -> MegatronCheckpoint:
    files = _rank_files(path)
    tensor, pipeline = max(t for t, _ in files) + 1, max(p for _, p in files) + 1
    first = load_pickle(files[(0, 0)], mmap=True)
    args = _model_args(str(files[(0, 0)]), first)
    _check_layout(path, args, tensor, pipeline)
    rows = first.get("model", first.get("model0", {})).get(layout.EMBEDDING)
    config, zero_centered = layout.config_from_args(args, 0 if rows is None else rows.shape[0] * tensor)
    chunks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (virtual stage, pipeline rank)
    for p in range(pipeline):
        per_rank = [_model_chunks(first if (t, p) == (0, 0) else load_pickle(files[(t, p)], mmap=True), files[(t, p)])
                    for t in range(tensor)]
        if len({len(c) for c in per_rank}) != 1:
            raise ConversionError(f"{path}: the tensor-parallel ranks of pipeline stage {p} hold different numbers of "
                                  "model chunks")
        for v in range(len(per_rank[0])):
            chunks[(v, p)] = layout.merge_tensor_parallel([rank[v] for rank in per_rank], config,
                                                          where=f"{path.name}/pipeline stage {p}, chunk {v}: ")
    virtual = max(v for v, _ in chunks) + 1
    state = layout.merge_pipeline([chunks[key] for key in sorted(chunks)], config)
    return MegatronCheckpoint(path, "torch", int(first.get("iteration", iteration)), args, config, zero_centered,
                              tensor, pipeline, virtual, state)


def _dcp_rows(path: Path, name: str) -> int:
    """The first dimension of tensor `name` in a DCP checkpoint (0 when absent), from its metadata."""
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata.get(name)
    return metadata.size[0] if isinstance(metadata, TensorStorageMetadata) else 0


def _read_dcp_tensors(path: Path, keep) -> dict[str, torch.Tensor]:
    reader = dcp.FileSystemReader(path)
    metadata = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()
             if isinstance(m, TensorStorageMetadata) and keep(k)}
    with warnings.catch_warnings():  # DCP warns that there is no process group: that is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _read_torch_dist(path: Path, iteration: int) -> MegatronCheckpoint:
    if not (path / "common.pt").is_file():
        raise ConversionError(f"{path}/common.pt: no such file (it holds the run's args)")
    common = load_pickle(path / "common.pt")
    args = _model_args(f"{path}/common.pt", common)
    config, zero_centered = layout.config_from_args(args, _dcp_rows(path, layout.EMBEDDING))
    stored = _read_dcp_tensors(path, lambda k: not k.startswith(("optimizer.", "rng_state", "rerun_state")))
    state = layout.from_sharded(stored, config)
    if config.tie_embeddings:
        state.pop(layout.OUTPUT, None)
    return MegatronCheckpoint(path, "torch_dist", int(common.get("iteration", iteration)), args, config, zero_centered,
                              layout.arg(args, "tensor_model_parallel_size", 1),
                              layout.arg(args, "pipeline_model_parallel_size", 1),
                              layout.arg(args, "virtual_pipeline_model_parallel_size", 1), state)


class _PlainDataLoadPlanner(DefaultLoadPlanner):
    """DCP's planner for non-tensor entries, read through the weights-only unpickler into `objects`."""

    def __init__(self):
        super().__init__(flatten_state_dict=False)
        self.objects = {}

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.objects[read_item.dest_index.fqn] = load_pickle(value)


def _read_torch_dcp(path: Path, iteration: int) -> MegatronCheckpoint:
    planner = _PlainDataLoadPlanner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"args": None, "iteration": None}, storage_reader=dcp.FileSystemReader(path), planner=planner,
                 no_dist=True)
    header = planner.objects
    args = _model_args(f"{path}/.metadata", header)
    tensor, pipeline = (layout.arg(args, "tensor_model_parallel_size", 1), layout.arg(args, "pipeline_model_parallel_size", 1))
    if (tensor, pipeline) != (1, 1):
        raise ConversionError(f"{path}: a torch_dcp checkpoint of tensor_model_parallel_size={tensor}, "
                              f"pipeline_model_parallel_size={pipeline}; import reads torch_dcp at 1 x 1 only")
    config, zero_centered = layout.config_from_args(args, _dcp_rows(path, "model." + layout.EMBEDDING))
    stored = _read_dcp_tensors(path, lambda k: k.startswith("model."))
    state = layout.from_te_names({k[len("model."):]: v for k, v in stored.items()})
    return MegatronCheckpoint(path, "torch_dcp", int(header.get("iteration") or iteration), args, config, zero_centered,
                              1, 1, 1, state)


# ------------------------------------------------------------------------------------------ writing


def write_megatron_lm(out: Path, state: dict[str, torch.Tensor], config: ModelConfig, iteration: int,
                      ckpt_format: str, tensor: int = 1, pipeline: int = 1, virtual: int = 1,
                      transformer_impl: str = "local") -> Path:
    """A Megatron-LM save folder in `out` (which must exist and be empty) from canonical tensors:
    `iter_<iteration>/` and the tracker file; returns the iteration directory."""
    layout.check_tensor_parallel(config, tensor)
    layout.chunk_layers(config.num_layers, pipeline, virtual)  # refuses an uneven split before writing
    args = layout.args_from_config(config, tensor, pipeline, virtual if virtual > 1 else None, iteration, ckpt_format,
                                   transformer_impl)
    path = out / f"iter_{iteration:07d}"
    header = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    if ckpt_format == "torch":
        _write_legacy(path, state, config, header, tensor, pipeline, virtual, transformer_impl)
    else:
        _write_torch_dist(path, state, config, header)
    (out / TRACKER).write_text(str(iteration))
    return path


def _write_legacy(path: Path, state, config, header: dict, tensor: int, pipeline: int, virtual: int,
                  transformer_impl: str) -> None:
    chunks = layout.split_pipeline(state, config, pipeline, virtual)
    for p in range(pipeline):
        per_stage = [layout.split_tensor_parallel(chunks[(p, v)], config, tensor) for v in range(virtual)]
        for t in range(tensor):
            models = [stage[t] if transformer_impl == "local" else layout.to_te_names(stage[t]) for stage in per_stage]
            stored = dict(header, **({"model": models[0]} if virtual == 1 else
                                     {f"model{v}": model for v, model in enumerate(models)}))
            folder = path / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pipeline > 1 else ""))
            folder.mkdir(parents=True)
            torch.save(stored, folder / RANK_FILE)


def _write_torch_dist(path: Path, state, config, header: dict) -> None:
    """DCP of the sharded tensors, each whole; megatron-core reads any rank's slices of them. The
    `_extra_state` objects megatron-core's layers ask for are saved empty (None, what its local
    spec saves): those of the local spec, and Transformer Engine's attention's, which a local
    model does not ask for (loading into Transformer Engine layers is not tested here)."""
    path.mkdir(parents=True)
    sharded: dict[str, object] = {k: v.contiguous() for k, v in layout.to_sharded(state, config).items()}
    for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "self_attention.core_attention",
                   "mlp.linear_fc1", "mlp.linear_fc2"):
        for i in range(config.num_layers):  # a sharded object's key: <key>/shard_<offset>_<global shape>
            sharded[f"{layout.LAYERS}{module}._extra_state/shard_{i}_{config.num_layers}"] = [None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(sharded, checkpoint_id=path, no_dist=True)
    torch.save(header, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(TORCH_DIST_METADATA))
