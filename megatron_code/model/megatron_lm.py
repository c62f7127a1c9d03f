"""Megatron-LM GPT checkpoints (megatron-core's `GPTModel`) as our GPT and back: the model
arguments, the tensor names and the tensor/pipeline-parallel layouts, in one place. No files and
no process groups here (training/megatron_lm_checkpoint.py reads and writes the directories).

Three forms of the same weights:
- per rank ("legacy" `torch` format): each (tensor, pipeline) rank's `state_dict()` of each of
  its model chunks, layers numbered from 0 within the chunk;
- canonical: one tensor per parameter at tensor-parallel size 1, layers numbered globally, names
  of megatron-core's local spec (`input_layernorm`, `pre_mlp_layernorm`), no `_extra_state`;
- sharded (`torch_dist`): the canonical tensors with every `decoder.layers.*` stacked on a new
  first axis (one entry per layer) and the norms under Transformer Engine's fused names
  (`linear_qkv.layer_norm_weight`), whatever spec saved them.

Megatron's tensor-parallel split: rows (dim 0) for the embedding, output layer and `linear_qkv`
(whose rows are interleaved per query group, [q heads of group g | k_g | v_g] for each g, so a
rank holds whole groups and the canonical tensor is the ranks' rows in order); columns (dim 1)
for `linear_proj` and `linear_fc2`; `linear_fc1` of a gated MLP holds [gate_r; up_r] on rank r,
so the canonical [gate; up] is not the ranks' rows in order. Norms and learned positions are
whole on every rank. Our qkv is grouped the same way and our gated up weight is (2, ffn, hidden):
gate, then up, so the canonical tensors map onto ours by reshape only.
"""
from __future__ import annotations

import argparse
import math

import torch

from megatron_code.config import ModelConfig
from megatron_code.model.hf import ConversionError

EMBEDDING = "embedding.word_embeddings.weight"
POSITIONS = "embedding.position_embeddings.weight"
OUTPUT = "output_layer.weight"
LAYERS = "decoder.layers."
FINAL_NORM = "decoder.final_layernorm."
# Transformer Engine fuses each pre-norm into the linear layer after it.
TE_FUSED_NORMS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                  "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}

ROWS, COLUMNS, WHOLE, GATE_UP = "rows", "columns", "whole", "gate_up"
# megatron-core layer tensor -> (our tensor, tensor-parallel split)
LAYER_TENSORS = {
    "input_layernorm.weight": ("attention_norm.weight", WHOLE),
    "input_layernorm.bias": ("attention_norm.bias", WHOLE),
    "self_attention.linear_qkv.weight": ("attention.qkv.weight", ROWS),
    "self_attention.linear_proj.weight": ("attention.out.weight", COLUMNS),
    "pre_mlp_layernorm.weight": ("mlp_norm.weight", WHOLE),
    "pre_mlp_layernorm.bias": ("mlp_norm.bias", WHOLE),
    "mlp.linear_fc1.weight": ("mlp.up.weight", ROWS),  # GATE_UP when gated
    "mlp.linear_fc2.weight": ("mlp.down.weight", COLUMNS),
}
# what megatron-core may store that holds no weight of the model's math
IGNORED_SUFFIXES = ("_extra_state",)


# ------------------------------------------------------------------------------------------ arguments


def arg(args, name: str, default=None):
    """Megatron-LM argument `name`, `default` when absent or None (older runs lack newer arguments)."""
    value = getattr(args, name, default)
    return default if value is None else value


def config_from_args(args, embedding_rows: int) -> tuple[ModelConfig, bool]:
    """Our ModelConfig for a Megatron-LM run's arguments (Megatron-LM's own names), and whether its
    norms store w - 1 (`--apply-layernorm-1p`). Every argument our model cannot express is
    refused, each on one line naming the Megatron-LM flag. `embedding_rows` (the stored
    embedding's) stands in for `padded_vocab_size` when the arguments lack it."""
    problems = []

    def refuse(flag: str, why: str) -> None:
        problems.append(f"{flag}: {why}")

    unsupported = [  # (argument, flag, what it is) refused whenever set
        ("use_legacy_models", "--use-legacy-models", "a megatron.legacy GPT model; import reads megatron-core GPT models"),
        ("num_experts", "--num-experts", "mixture-of-experts layers"),
        ("multi_latent_attention", "--multi-latent-attention", "multi-latent attention (MLA)"),
        ("mtp_num_layers", "--mtp-num-layers", "multi-token prediction layers"),
        ("is_hybrid_model", "--is-hybrid-model", "a hybrid (Mamba) model"),
        ("hybrid_override_pattern", "--hybrid-override-pattern", "a hybrid (Mamba) model"),
        ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path", "layers of different shapes"),
        ("heterogeneous_layers_config_encoded_json", "--heterogeneous-layers-config-encoded-json",
         "layers of different shapes"),
        ("spec", "--spec", "a custom layer spec, whose math the checkpoint does not record"),
        ("experimental_attention_variant", "--experimental-attention-variant", "another attention"),
        ("linear_attention_freq", "--linear-attention-freq", "linear-attention layers"),
        ("add_qkv_bias", "--add-qkv-bias", "our linear layers have no biases"),
        ("qk_layernorm", "--qk-layernorm", "our attention has no query/key norms"),
        ("qk_l2_norm", "--qk-l2-norm", "our attention has no query/key norms"),
        ("attention_output_gate", "--attention-output-gate", "our attention has no output gate"),
        ("window_size", "--window-size", "sliding-window attention; ours is full causal attention"),
        ("apply_residual_connection_post_layernorm", "--apply-residual-connection-post-layernorm",
         "our blocks add the residual before the norm"),
        ("squared_relu", "--squared-relu", "our MLP is SwiGLU or GELU"),
        ("quick_geglu", "--quick-geglu", "our MLP is SwiGLU or GELU"),
        ("glu_linear_offset", "--glu-linear-offset", "our SwiGLU has no offset"),
        ("activation_func_clamp_value", "--activation-func-clamp-value", "our activations are not clamped"),
        ("use_rope_scaling", "--use-rope-scaling", "RoPE scaling is not implemented here"),
        ("rotary_seq_len_interpolation_factor", "--rotary-seq-len-interpolation-factor",
         "RoPE interpolation is not implemented here"),
        ("rotary_interleaved", "--rotary-interleaved", "our RoPE rotates halves, not interleaved pairs"),
        ("no_rope_freq", "--no-rope-freq", "layers without RoPE"),
        ("mrope_section", "--mrope-section", "multimodal RoPE"),
    ]
    for name, flag, why in unsupported:
        if arg(args, name):
            refuse(f"{flag} (args.{name}={getattr(args, name)!r})", why)
    if arg(args, "add_bias_linear", True):
        refuse("args.add_bias_linear=True (Megatron-LM's default; --disable-bias-linear turns it off)",
               "our linear layers have no biases")
    if arg(args, "softmax_type", "vanilla") != "vanilla":
        refuse(f"--softmax-type {args.softmax_type}", "our attention is the plain softmax")
    if not any(arg(args, name, False) for name in ("swiglu", "squared_relu", "quick_geglu")):
        refuse("no --swiglu (args.swiglu=False)", "megatron-core's MLP is then the exact (erf) GELU; ours is SwiGLU "
               "or the tanh-approximated GELU")
    normalization = arg(args, "normalization", "LayerNorm")
    if normalization not in ("LayerNorm", "RMSNorm"):
        refuse(f"--normalization {normalization}", "ours is LayerNorm or RMSNorm")
    positions = arg(args, "position_embedding_type", "learned_absolute")
    if positions not in ("rope", "learned_absolute"):
        refuse(f"--position-embedding-type {positions}", "ours are RoPE or learned absolute positions")
    if arg(args, "rope_type", "rope") != "rope":
        refuse(f"--rope-type {args.rope_type}", "only the plain RoPE is implemented here")
    if positions == "rope" and arg(args, "rotary_percent", 1.0) != 1.0:
        refuse(f"--rotary-percent {args.rotary_percent}", "our RoPE rotates the whole head")
    hidden, heads = args.hidden_size, args.num_attention_heads
    kv_channels = arg(args, "kv_channels", hidden // heads)
    if hidden % heads or kv_channels != hidden // heads:
        refuse(f"--kv-channels {kv_channels}", f"our head size is hidden_size / num_attention_heads = {hidden}/{heads}")
    if problems:  # one line per problem
        raise ConversionError("the Megatron-LM model cannot be imported exactly:" + ("\n  " if len(problems) > 1 else " ")
                              + "\n  ".join(problems))

    groups = arg(args, "num_query_groups", heads) if arg(args, "group_query_attention", False) else heads
    max_positions = arg(args, "max_position_embeddings", args.seq_length)
    config = ModelConfig(
        vocab_size=arg(args, "padded_vocab_size", embedding_rows),
        pad_vocab_to_multiple_of=arg(args, "make_vocab_size_divisible_by", 128),
        hidden_size=hidden, num_layers=args.num_layers, num_heads=heads, num_kv_heads=groups,
        ffn_hidden_size=arg(args, "ffn_hidden_size", 4 * hidden),
        max_seq_len=max_positions if positions == "learned_absolute" else max(max_positions, arg(args, "seq_length", 0)),
        norm="rmsnorm" if normalization == "RMSNorm" else "layernorm",
        norm_eps=float(arg(args, "layernorm_epsilon", arg(args, "norm_epsilon", 1e-5))),
        activation="swiglu", position_embedding="rope" if positions == "rope" else "learned",
        rope_theta=float(arg(args, "rotary_base", 10000)),
        tie_embeddings=not arg(args, "untie_embeddings_and_output_weights", False),
        init_std=float(arg(args, "init_method_std", 0.02)))
    config.validate()
    zero_centered = bool(arg(args, "layernorm_zero_centered_gamma", False) or arg(args, "apply_layernorm_1p", False))
    return config, zero_centered


def args_from_config(config: ModelConfig, tensor: int, pipeline: int, virtual: int | None, iteration: int,
                     ckpt_format: str, transformer_impl: str) -> argparse.Namespace:
    """The Megatron-LM arguments that rebuild `config`'s model (what `--use-checkpoint-args`
    reads) and describe the saved layout; training options are left to the user's command."""
    c = config
    return argparse.Namespace(
        num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_size,
        num_attention_heads=c.num_heads, group_query_attention=c.kv_heads != c.num_heads,
        num_query_groups=c.kv_heads, kv_channels=c.head_dim, seq_length=c.max_seq_len,
        max_position_embeddings=c.max_seq_len,
        position_embedding_type="rope" if c.position_embedding == "rope" else "learned_absolute",
        add_position_embedding=True, use_rotary_position_embeddings=c.position_embedding == "rope",
        rotary_base=int(c.rope_theta) if float(c.rope_theta).is_integer() else c.rope_theta,
        rotary_percent=1.0, rotary_interleaved=False,
        normalization="RMSNorm" if c.norm == "rmsnorm" else "LayerNorm", layernorm_epsilon=c.norm_eps,
        layernorm_zero_centered_gamma=False, apply_layernorm_1p=False,
        swiglu=c.activation == "swiglu", squared_relu=False, add_bias_linear=False, add_qkv_bias=False,
        untie_embeddings_and_output_weights=not c.tie_embeddings, padded_vocab_size=c.vocab_size,
        make_vocab_size_divisible_by=vocab_divisor(c, tensor), init_method_std=c.init_std,
        hidden_dropout=0.0, attention_dropout=0.0, use_legacy_models=False, transformer_impl=transformer_impl,
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual, ckpt_format=ckpt_format, iteration=iteration,
        consumed_train_samples=0, consumed_valid_samples=0)


def check_exportable(config: ModelConfig) -> None:
    """Refuse what megatron-core's GPTModel does not compute as we do."""
    if config.activation != "swiglu":
        raise ConversionError(f"model.activation={config.activation}: megatron-core's GELU is the exact (erf) GELU, "
                              "ours the tanh approximation; only SwiGLU models export to Megatron-LM exactly")


# ----------------------------------------------------------------------------- canonical <-> ours


def _layer_tensors(config: ModelConfig) -> dict[str, tuple[str, str]]:
    tensors = {name: (ours, GATE_UP if name == "mlp.linear_fc1.weight" and config.activation == "swiglu" else split)
               for name, (ours, split) in LAYER_TENSORS.items()}
    if config.norm != "layernorm":
        tensors = {name: value for name, value in tensors.items() if not name.endswith("layernorm.bias")}
    return tensors


def canonical_names(config: ModelConfig) -> dict[str, str]:
    """megatron-core's canonical tensor name -> ours, for `config`'s model."""
    names = {EMBEDDING: "embedding.weight", FINAL_NORM + "weight": "norm.weight"}
    if config.norm == "layernorm":
        names[FINAL_NORM + "bias"] = "norm.bias"
    if config.position_embedding == "learned":
        names[POSITIONS] = "position_embedding.weight"
    if not config.tie_embeddings:
        names[OUTPUT] = "output.weight"
    for i in range(config.num_layers):
        names.update({f"{LAYERS}{i}.{name}": f"layers.{i}.{ours}" for name, (ours, _) in _layer_tensors(config).items()})
    return names


def is_norm_weight(name: str) -> bool:
    return name.endswith("layernorm.weight")


def to_ours(state: dict[str, torch.Tensor], config: ModelConfig, zero_centered: bool) -> dict[str, torch.Tensor]:
    """Our weights from canonical megatron-core tensors; every tensor must find its place.
    `zero_centered`: the norms store w - 1 (`--apply-layernorm-1p`)."""
    names = canonical_names(config)
    missing = [n for n in names if n not in state]
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensor(s) the arguments need: "
                              + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    unexpected = sorted(set(state) - set(names))
    if unexpected:
        raise ConversionError(f"tensors our model has no place for: {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    ours = {}
    for name, our_name in names.items():
        tensor = state[name]
        if zero_centered and is_norm_weight(name):
            tensor = tensor + 1
        if our_name.endswith("mlp.up.weight") and config.activation == "swiglu":
            tensor = tensor.view(2, config.ffn_size, config.hidden_size)
        ours[our_name] = tensor
    return ours


def from_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical megatron-core tensors (norms stored as they are, not w - 1) from our weights."""
    return {name: state[ours].flatten(0, 1) if state[ours].dim() == 3 else state[ours]
            for name, ours in canonical_names(config).items()}


# ------------------------------------------------------------------------------ tensor parallelism


def _split_kind(name: str, config: ModelConfig) -> str | None:
    """How Megatron splits `name` over tensor-parallel ranks; None for a tensor our model has no
    place for (refused by name later, by to_ours)."""
    if name in (EMBEDDING, OUTPUT):
        return ROWS
    if name.startswith(LAYERS):
        return _layer_tensors(config).get(name.split(".", 3)[3], (None, None))[1]
    return WHOLE if name in (POSITIONS, FINAL_NORM + "weight", FINAL_NORM + "bias") else None


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]], config: ModelConfig,
                          where: str = "") -> dict[str, torch.Tensor]:
    """One canonical state from the per-rank states of the same chunk on every tensor-parallel
    rank (in rank order). Tensors stored whole on each rank must agree."""
    merged = {}
    for name, first in shards[0].items():
        parts = [shard[name] for shard in shards]
        kind = _split_kind(name, config)
        if kind == ROWS:
            merged[name] = torch.cat(parts, 0)
        elif kind == COLUMNS:
            merged[name] = torch.cat(parts, 1)
        elif kind == GATE_UP:
            halves = [p.view(2, -1, p.shape[-1]) for p in parts]
            merged[name] = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        elif kind is None:
            merged[name] = first
        else:
            for rank, part in enumerate(parts[1:], start=1):
                if not torch.equal(part, first):
                    raise ConversionError(f"{where}{name} differs between tensor-parallel ranks 0 and {rank} (max "
                                          f"|difference| {(part.float() - first.float()).abs().max():.3g}); it "
                                          "should be the same on every rank")
            merged[name] = first
    return merged


def split_tensor_parallel(state: dict[str, torch.Tensor], config: ModelConfig, tensor: int) -> list[dict[str, torch.Tensor]]:
    """The per-rank states of `tensor` tensor-parallel ranks from a canonical state."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tensor)]
    for name, t in state.items():
        kind = _split_kind(name, config)
        if kind == ROWS:
            parts = t.chunk(tensor, 0)
        elif kind == COLUMNS:
            parts = t.chunk(tensor, 1)
        elif kind == GATE_UP:
            gate, up = t.view(2, -1, t.shape[-1])
            parts = [torch.cat(pair) for pair in zip(gate.chunk(tensor), up.chunk(tensor))]
        else:
            parts = [t] * tensor
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def check_tensor_parallel(config: ModelConfig, tensor: int) -> None:
    """Refuse a tensor-parallel size that cannot split `config`'s model by Megatron's rules."""
    sizes = {"padded_vocab_size (model.vocab_size)": config.vocab_size,
             "num_query_groups (model.num_kv_heads)": config.kv_heads, "ffn_hidden_size": config.ffn_size}
    bad = [f"{name}={size}" for name, size in sizes.items() if size % tensor]
    if bad:
        raise ConversionError(f"--tensor {tensor} does not divide {', '.join(bad)}")


# ---------------------------------------------------------------------------- pipeline parallelism


def layer_index(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith(LAYERS) else None


def _renumber(name: str, offset: int) -> str:
    index, _, rest = name[len(LAYERS):].partition(".")
    return f"{LAYERS}{int(index) + offset}.{rest}"


def merge_pipeline(chunks: list[dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """One state with global layer numbers from the model chunks in model order (virtual stage
    major, pipeline rank minor), each numbering its layers from 0. A tied output layer stored on
    the last stage must equal the embedding."""
    merged: dict[str, torch.Tensor] = {}
    offset = 0
    for chunk in chunks:
        count = 0
        for name, tensor in chunk.items():
            index = layer_index(name)
            if index is None:
                if name == OUTPUT and config.tie_embeddings:
                    continue  # compared with the embedding below
                merged[name] = tensor
            else:
                merged[_renumber(name, offset)] = tensor
                count = max(count, index + 1)
        offset += count
    if offset != config.num_layers:
        raise ConversionError(f"the pipeline stages hold {offset} layers; the arguments say num_layers={config.num_layers}")
    if config.tie_embeddings:
        stored = [c[OUTPUT] for c in chunks if OUTPUT in c]
        if stored and EMBEDDING in merged and not torch.equal(stored[-1], merged[EMBEDDING]):
            raise ConversionError(f"the last stage's {OUTPUT} differs from the first stage's {EMBEDDING} (max |difference| "
                                  f"{(stored[-1].float() - merged[EMBEDDING].float()).abs().max():.3g}) although "
                                  "the embeddings are tied")
    return merged


def chunk_layers(num_layers: int, pipeline: int, virtual: int) -> list[range]:
    """The global layers of each model chunk in model order (Megatron's even split)."""
    chunks = pipeline * virtual
    if num_layers % chunks:
        raise ConversionError(f"num_layers={num_layers} does not split evenly over --pipeline {pipeline} x "
                              f"{virtual} virtual stages")
    per = num_layers // chunks
    return [range(i * per, (i + 1) * per) for i in range(chunks)]


def split_pipeline(state: dict[str, torch.Tensor], config: ModelConfig, pipeline: int,
                   virtual: int) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """(pipeline rank, virtual stage) -> that chunk's canonical state, layers numbered from 0.
    The first chunk holds the embeddings, the last the final norm and output layer (with tied
    embeddings and several stages, a copy of the embedding, as megatron-core keeps it)."""
    ranges = chunk_layers(config.num_layers, pipeline, virtual)
    out = {}
    for index, layers in enumerate(ranges):
        vp, pp = divmod(index, pipeline)
        chunk = {}
        for name, tensor in state.items():
            layer = layer_index(name)
            if layer is not None:
                if layer in layers:
                    chunk[_renumber(name, -layers.start)] = tensor
            elif name.startswith("embedding.") and index == 0:
                chunk[name] = tensor
            elif not name.startswith("embedding.") and index == len(ranges) - 1:
                chunk[name] = tensor
        if index == len(ranges) - 1 and config.tie_embeddings and len(ranges) > 1:
            chunk[OUTPUT] = state[EMBEDDING]
        out[(pp, vp)] = chunk
    return out


# ------------------------------------------------------------------------- spec names, torch_dist


def from_te_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformer Engine's fused norm names as the local spec's; `_extra_state` entries dropped."""
    out = {}
    for name, tensor in state.items():
        if name.rsplit(".", 1)[-1] in IGNORED_SUFFIXES:
            continue
        for local, fused in TE_FUSED_NORMS.items():
            if fused in name:
                name = name.replace(fused, local)
        out[name] = tensor
    return out


def to_te_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for local, fused in TE_FUSED_NORMS.items():
            name = name.replace(local, fused) if name.startswith(LAYERS) else name
        out[name] = tensor
    return out


def from_sharded(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical tensors from `torch_dist`'s: every stacked `decoder.layers.<x>` unstacked."""
    out = {}
    for name, tensor in from_te_names(state).items():
        if name.startswith(LAYERS):
            if tensor.shape[0] != config.num_layers:
                raise ConversionError(f"{name} stacks {tensor.shape[0]} layers; the arguments say "
                                      f"num_layers={config.num_layers}")
            out.update({f"{LAYERS}{i}.{name[len(LAYERS):]}": tensor[i] for i in range(config.num_layers)})
        else:
            out[name] = tensor
    return out


def to_sharded(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`torch_dist`'s tensors from canonical ones: layers stacked, Transformer Engine's norm names."""
    out = {name: t for name, t in state.items() if not name.startswith(LAYERS)}
    for suffix in _layer_tensors(config):
        out[LAYERS + suffix] = torch.stack([state[f"{LAYERS}{i}.{suffix}"] for i in range(config.num_layers)])
    return to_te_names(out)


def padded_vocab(tokenizer_vocab: int, divisible_by: int, tensor: int) -> int:
    """Megatron-LM's padded_vocab_size: the tokenizer's size rounded up to divisible_by x tensor."""
    multiple = divisible_by * tensor
    return math.ceil(tokenizer_vocab / multiple) * multiple


def vocab_divisor(config: ModelConfig, tensor: int) -> int:
    """The --make-vocab-size-divisible-by with which Megatron-LM pads the tokenizer's ids to
    exactly our embedding's rows at `tensor` ranks (Megatron-LM pads its tokenizer's size itself
    whatever padded_vocab_size the checkpoint records): ours when it does, else rows / tensor."""
    if padded_vocab(config.real_vocab_size, config.pad_vocab_to_multiple_of, tensor) == config.vocab_size:
        return config.pad_vocab_to_multiple_of
    return config.vocab_size // tensor
