"""Megatron-LM checkpoints made and read by megatron-core itself on CPU ranks (gloo), as the
reference for tools/convert_checkpoint.py's Megatron-LM import and export.

megatron-core builds the model at the given tensor x pipeline (x virtual) layout with
`use_cpu_initialization`, so every rank holds the slice of each weight that megatron-core's own
split gives it; the legacy files are each rank's `state_dict_for_save_checkpoint()` as
Megatron-LM's save_checkpoint writes them, the torch_dist folder is megatron-core's
`dist_checkpointing.save` of the model's `sharded_state_dict()`. The reference logits come from
megatron-core's forward at that layout: tensor-parallel layers exchange through gloo, pipeline
stages run in model order and pass hidden states on by broadcast (megatron-core's schedules need
CUDA). Loading an export goes through megatron-core's `load_state_dict` per rank (legacy) or
`dist_checkpointing.load` (torch_dist).

CUDA assumptions met on CPU, patched here only: `torch.cuda.current_device` (RoPE, checkpoint
saving), the CUDA RNG tracker's `fork` (attention dropout, off), `Tensor.cuda` (the copy of tied
embeddings to the last stage), `torch.cuda.synchronize` (dist_checkpointing).
"""
from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist

ITERATION = 7


def megatron_args(tensor: int = 1, pipeline: int = 1, virtual: int = 1, normalization: str = "RMSNorm",
                  position_embedding_type: str = "rope", untie: bool = True, groups: int = 2, **extra) -> argparse.Namespace:
    """The model arguments a Megatron-LM 0.16 run records (its names and defaults) for a small
    GPT: 4 layers, hidden 64, 4 heads, SwiGLU 96, 1024 tokenizer ids padded by
    --make-vocab-size-divisible-by 96 (1056 rows at tensor 1, 1152 at tensor 2)."""
    divisible = 96
    args = dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, group_query_attention=groups != 4,
        num_query_groups=groups, kv_channels=None, seq_length=64, max_position_embeddings=64,
        position_embedding_type=position_embedding_type, add_position_embedding=True, rotary_base=5000,
        rotary_percent=1.0, rotary_interleaved=False, normalization=normalization, layernorm_epsilon=1e-5,
        layernorm_zero_centered_gamma=False, swiglu=True, squared_relu=False, add_bias_linear=False,
        add_qkv_bias=False, untie_embeddings_and_output_weights=untie, make_vocab_size_divisible_by=divisible,
        padded_vocab_size=-(-1024 // (divisible * tensor)) * divisible * tensor, init_method_std=0.1,
        hidden_dropout=0.0, attention_dropout=0.0, use_legacy_models=False, transformer_impl="local",
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None, ckpt_format="torch",
        tokenizer_type="SentencePieceTokenizer", tokenizer_model=None, iteration=ITERATION)
    args.update(extra)
    return argparse.Namespace(**args)


@contextlib.contextmanager
def cpu_shims():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with mock.patch("torch.cuda.current_device", lambda: "cpu"), \
            mock.patch("torch.cuda.synchronize", lambda *a, **k: None), \
            mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), \
            mock.patch.object(get_cuda_rng_tracker(), "fork", contextlib.nullcontext), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build_models(args: argparse.Namespace, seed: int = 0) -> list:
    """This rank's model chunks, megatron-core's GPTModel (local spec) in fp32 on CPU; norm weights
    drawn away from 1 (a seed per global layer, so the tensor-parallel ranks agree)."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    virtual = args.virtual_pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                             virtual_pipeline_model_parallel_size=virtual)
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        ffn_hidden_size=args.ffn_hidden_size, normalization=args.normalization, layernorm_epsilon=args.layernorm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, init_method_std=args.init_method_std,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, virtual_pipeline_model_parallel_size=virtual,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False)
    torch.manual_seed(seed)
    models = []
    for v in range(virtual or 1):
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v)
        models.append(GPTModel(
            config, get_gpt_layer_local_spec(normalization=args.normalization), vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings, pre_process=first, post_process=last,
            parallel_output=False, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
            vp_stage=v if virtual else None))
    with torch.no_grad():
        for model in models:
            for layer in model.decoder.layers:
                for k, (name, p) in enumerate(sorted(layer.named_parameters())):
                    if "layernorm" in name:
                        g = torch.Generator().manual_seed(1000 * layer.layer_number + k)
                        p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                                else torch.rand(p.shape, generator=g) - 0.5)
            if model.post_process:
                g = torch.Generator().manual_seed(7)
                model.decoder.final_layernorm.weight.copy_(torch.rand(args.hidden_size, generator=g) + 0.5)
    return models


def forward(models: list, args: argparse.Namespace, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (batch, sequence, padded vocabulary) of megatron-core's forward at this layout,
    returned on every rank."""
    from megatron.core import parallel_state

    pipeline, tensor = args.pipeline_model_parallel_size, args.tensor_model_parallel_size
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    b, t = tokens.shape
    positions = torch.arange(t).expand(b, t)
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)[None, None]
    hidden = None
    for index in range(len(models) * pipeline):
        v, owner = divmod(index, pipeline)
        last = index == len(models) * pipeline - 1
        shape = (b, t, args.padded_vocab_size) if last else (t, b, args.hidden_size)
        out = torch.empty(shape)
        if owner == pp_rank:
            model = models[v]
            if index:
                model.set_input_tensor(hidden)
            with torch.no_grad():
                out = model(tokens, positions, causal).contiguous()
        source_rank = owner * tensor  # megatron-core's rank order tp-cp-ep-dp-pp: tensor ranks are neighbours
        dist.broadcast(out, src=source_rank)
        hidden = out
    return hidden


def save_rank(rank: int, world_size: int, out: str, args: argparse.Namespace, tokens: torch.Tensor,
              formats: tuple[str, ...] = ("torch",)) -> np.ndarray:
    """Build, save (legacy files under out/torch, torch_dist under out/torch_dist) and return the
    reference logits (as numpy: a tensor would travel to the parent through a file descriptor of
    this process, which may have exited when the parent reads it)."""
    from megatron.core import dist_checkpointing, parallel_state

    with cpu_shims():
        models = build_models(args)
        tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
        header = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION}
        names = ["model"] if len(models) == 1 else [f"model{v}" for v in range(len(models))]
        if "torch" in formats:
            folder = Path(out) / "torch" / f"iter_{ITERATION:07d}" / (
                f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if args.pipeline_model_parallel_size > 1 else ""))
            folder.mkdir(parents=True)
            torch.save(dict(header, **{n: m.state_dict_for_save_checkpoint() for n, m in zip(names, models)}),
                       folder / "model_optim_rng.pt")
        if "torch_dist" in formats:
            folder = Path(out) / "torch_dist" / f"iter_{ITERATION:07d}"
            if rank == 0:
                folder.mkdir(parents=True)
            dist.barrier()
            dist_args = argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist"})
            dist_checkpointing.save(dict(header, args=dist_args, **{n: m.sharded_state_dict() for n, m in zip(names, models)}),
                                    str(folder))
        dist.barrier()
        if rank == 0:
            for fmt in formats:
                (Path(out) / fmt / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
        logits = forward(models, args, tokens)
        parallel_state.destroy_model_parallel()
    return logits.numpy()


def load_rank(rank: int, world_size: int, saves: list[tuple[str, str]], args: argparse.Namespace,
              tokens: torch.Tensor) -> list[np.ndarray]:
    """megatron-core's model at `args`' layout loading each (save folder, format) the way
    Megatron-LM does (per-rank `load_state_dict(strict=True)` of the legacy file, or
    `dist_checkpointing.load` of its sharded state dict); returns its logits for each."""
    from megatron.core import dist_checkpointing, parallel_state

    results = []
    with cpu_shims():
        models = build_models(args, seed=1)  # other weights than any export: everything must come from the files
        tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
        names = ["model"] if len(models) == 1 else [f"model{v}" for v in range(len(models))]
        for save_dir, ckpt_format in saves:
            iteration = int((Path(save_dir) / "latest_checkpointed_iteration.txt").read_text())
            folder = Path(save_dir) / f"iter_{iteration:07d}"
            if ckpt_format == "torch":
                rank_dir = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if args.pipeline_model_parallel_size > 1 else "")
                stored = torch.load(folder / rank_dir / "model_optim_rng.pt", weights_only=False)
            else:
                stored = dist_checkpointing.load({n: m.sharded_state_dict() for n, m in zip(names, models)}, str(folder))
            for name, model in zip(names, models):
                model.load_state_dict(stored[name], strict=True)
            results.append(forward(models, args, tokens).numpy())
        parallel_state.destroy_model_parallel()
    return results


def save_and_load_rank(rank: int, world_size: int, save: tuple, load: tuple) -> tuple[np.ndarray, list[np.ndarray]]:
    """save_rank(*save) then load_rank(*load) on the same ranks: one spawn for both directions
    (starting megatron-core on a rank costs more than the work it does here)."""
    return save_rank(rank, world_size, *save), load_rank(rank, world_size, *load)


def run_in_this_process(func, *args):
    """func(0, 1, *args) in this process, in its one-rank group (a gloo group made for the call
    and destroyed after it when the process has none)."""
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        return func(0, 1, *args)
    finally:
        if made:
            dist.destroy_process_group()
