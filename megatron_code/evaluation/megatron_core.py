"""megatron-core's own `GPTModel`, built on CPU in fp32 at tensor-parallel size 1 from a
Megatron-LM run's arguments, as the reference our Megatron-LM conversions are checked against.

megatron-core assumes CUDA in two places a CPU forward meets: its RoPE allocates on
`torch.cuda.current_device()`, and its attention forks the CUDA RNG tracker (for dropout, which
is off here). Both are patched only while the reference is built and called, and its model
needs a process group: a one-rank gloo group on an in-memory store, made for the check and
destroyed after it (or the process's own one-rank group; never one of several ranks).
"""
from __future__ import annotations

import contextlib
import warnings
from types import SimpleNamespace
from typing import Iterator
from unittest import mock

import torch

from megatron_code.model.megatron_lm import arg


class ReferenceUnavailable(RuntimeError):
    """megatron-core cannot build this model here; the message says why."""


def transformer_config(args):
    """megatron-core's TransformerConfig for `args` as Megatron-LM makes it (the field of the same
    name; `--swiglu` as SiLU gated; `num_query_groups` only with `--group-query-attention`), for
    a single CPU process in fp32 without dropout or fused kernels."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    gated = bool(arg(args, "swiglu", False))
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=arg(args, "num_query_groups") if arg(args, "group_query_attention", False) else None,
        ffn_hidden_size=arg(args, "ffn_hidden_size"), kv_channels=arg(args, "kv_channels"),
        normalization=arg(args, "normalization", "LayerNorm"),
        layernorm_epsilon=arg(args, "layernorm_epsilon", arg(args, "norm_epsilon", 1e-5)),
        add_bias_linear=arg(args, "add_bias_linear", True), add_qkv_bias=arg(args, "add_qkv_bias", False),
        gated_linear_unit=gated, activation_func=F.silu if gated else F.gelu,
        init_method_std=arg(args, "init_method_std", 0.02),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, perform_initialization=False,
        params_dtype=torch.float32, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False)


@contextlib.contextmanager
def cpu_shims() -> Iterator[None]:
    """megatron-core's two CUDA assumptions on a CPU forward, patched for the duration."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with mock.patch("torch.cuda.current_device", lambda: "cpu"), \
            mock.patch.object(get_cuda_rng_tracker(), "fork", contextlib.nullcontext):
        yield


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """megatron-core's parallel state over a one-rank group: this process's own when it already has
    one (a training run in the same process makes one), else a gloo group made for the check."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ReferenceUnavailable(f"this process is one of {dist.get_world_size()} torch.distributed ranks; "
                                   "megatron-core's reference needs a process of its own")
    try:
        parallel_state.initialize_model_parallel(1, 1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if made:
            dist.destroy_process_group()


class MegatronCoreReference:
    """A megatron-core GPTModel called like a transformers causal LM: `(input_ids=...).logits`
    (batch, sequence, vocabulary) and greedy `generate` over the first `vocab_size` ids."""

    def __init__(self, model, vocab_size: int):
        self.model, self.vocab_size = model, vocab_size

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        b, t = input_ids.shape
        positions = torch.arange(t).expand(b, t)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)[None, None]  # True: masked out
        with cpu_shims(), torch.no_grad():
            return SimpleNamespace(logits=self.model(input_ids, positions, causal))

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **_) -> torch.Tensor:
        ids = prompt
        for _ in range(max_new_tokens):
            next_id = self(input_ids=ids).logits[:, -1, : self.vocab_size].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        return ids


@contextlib.contextmanager
def megatron_core_reference(args, state: dict[str, torch.Tensor], vocab_size: int) -> Iterator[MegatronCoreReference]:
    """megatron-core's GPTModel for `args` holding `state` (canonical tensors, fp32, norms as
    plain weights: w, not w - 1), alive for the duration; raises ReferenceUnavailable when
    megatron-core is missing or cannot build this model on CPU."""
    try:
        with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": we know
            warnings.simplefilter("ignore")
            from megatron.core.models.gpt import GPTModel
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    except ImportError as e:
        raise ReferenceUnavailable(f"megatron-core is not installed ({e})") from None
    with single_process_group():
        with cpu_shims(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = GPTModel(
                    transformer_config(args), get_gpt_layer_local_spec(normalization=arg(args, "normalization")),
                    vocab_size=args.padded_vocab_size,
                    max_sequence_length=arg(args, "max_position_embeddings", args.seq_length),
                    position_embedding_type=arg(args, "position_embedding_type", "learned_absolute"),
                    rotary_percent=arg(args, "rotary_percent", 1.0), rotary_base=arg(args, "rotary_base", 10000),
                    share_embeddings_and_output_weights=not arg(args, "untie_embeddings_and_output_weights", False))
            except (AssertionError, ValueError, RuntimeError) as e:
                raise ReferenceUnavailable(f"megatron-core cannot build this model on CPU ({type(e).__name__}: {e})") from None
        model.load_state_dict(state, strict=True)
        yield MegatronCoreReference(model.eval(), vocab_size)
