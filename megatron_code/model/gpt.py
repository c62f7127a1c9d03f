"""The GPT decoder: Llama-style by default (RMSNorm, RoPE, SwiGLU, GQA), GPT-2/PanGu by config.

Math only. Linear and embedding layers come from an injected `LayerFactory` (plain torch on one
rank, tensor-parallel layers otherwise); kernels and attention come from injected `KernelOps`
and attention function. A pipeline stage is this model with some modules set to None (a later
stage is also told, by `embeds_input`, that its input is hidden states).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_code.config import ModelConfig
from megatron_code.kernels.ops import TORCH_OPS, KernelOps, attention_torch, rope_tables


class FusedLinear(nn.Module):
    """`parts` projections of the same input in one matmul (SwiGLU's gate and up). The weight is
    (parts, out, in): a tensor-parallel column split of dim 1 gives every rank a slice of each
    part, and the saved tensor is the same whatever the number of ranks."""

    def __init__(self, in_features: int, out_features: int, parts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(parts, out_features, in_features))

    def forward(self, x):
        return F.linear(x, self.weight.flatten(0, 1))  # (..., parts * out): [part_0 | part_1 | ...]


@dataclass(frozen=True)
class LayerFactory:
    """Builds the layers tensor parallelism replaces. `parallel` is "column" (output dim split,
    e.g. qkv, up projection, output head) or "row" (input dim split, e.g. attention/MLP output).
    `parts` > 1 fuses that many column projections of one input (see FusedLinear)."""

    def linear(self, in_features: int, out_features: int, parallel: str, init_std: float,
               parts: int = 1) -> nn.Module:
        layer = (nn.Linear(in_features, out_features, bias=False) if parts == 1
                 else FusedLinear(in_features, out_features, parts))
        nn.init.normal_(layer.weight, std=init_std)
        return layer

    def embedding(self, num: int, dim: int, init_std: float) -> nn.Module:
        layer = nn.Embedding(num, dim)
        nn.init.normal_(layer.weight, std=init_std)
        return layer


class Norm(nn.Module):
    def __init__(self, config: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops, self.eps, self.kind = ops, config.norm_eps, config.norm
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.hidden_size)) if config.norm == "layernorm" else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, residual=None):
        """norm(x), or with `residual`: (norm(x + residual), x + residual) in one fused pass."""
        if self.kind == "rmsnorm":
            return self.ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self.ops.layer_norm(x, self.weight, self.bias, self.eps)
        x = x + residual
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps), x


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layers: LayerFactory, out_std: float,
                 ops: KernelOps, attention: Callable):
        super().__init__()
        self.ops, self.attention, self.config = ops, attention, config
        self.head_dim = config.head_dim
        self.q_per_kv = config.num_heads // config.kv_heads
        # Fused qkv, grouped per kv head as [q_1..q_g, k, v], so a column split keeps groups whole.
        qkv_out = (config.num_heads + 2 * config.kv_heads) * config.head_dim
        self.qkv = layers.linear(config.hidden_size, qkv_out, "column", config.init_std)
        self.out = layers.linear(config.num_heads * config.head_dim, config.hidden_size, "row", out_std)

    def forward(self, x, rope, positions, document_ids):
        qkv = self.qkv(x)
        # Sizes come from the projection: a tensor-parallel shard holds fewer heads, and under
        # sequence parallelism x holds part of the sequence while qkv covers all of it.
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, -1, self.q_per_kv + 2, self.head_dim)  # (B, T, Hk, g+2, D)
        # split (not indexing): its backward is one cat, not a zero-filled qkv-sized grad per piece
        q, k, v = qkv.split([self.q_per_kv, 1, 1], dim=3)
        q = q.reshape(B, T, -1, self.head_dim)  # (B, T, Hq, D)
        k, v = k.squeeze(3), v.squeeze(3)  # (B, T, Hk, D)
        if rope is not None:
            q, k = self.ops.apply_rope(q, k, rope[0], rope[1], positions)
        y = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), document_ids)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layers: LayerFactory, out_std: float, ops: KernelOps):
        super().__init__()
        self.gated = config.activation == "swiglu"
        self.activation = ops.swiglu if self.gated else ops.gelu
        # SwiGLU: one matmul to [gate | up]; each tensor-parallel shard holds its own pair.
        self.up = layers.linear(config.hidden_size, config.ffn_size, "column", config.init_std,
                                parts=2 if self.gated else 1)
        self.down = layers.linear(config.ffn_size, config.hidden_size, "row", out_std)

    def forward(self, x):
        return self.down(self.activation(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layers: LayerFactory, ops: KernelOps, attention: Callable):
        super().__init__()
        out_std = config.init_std / math.sqrt(2 * config.num_layers)  # GPT-2: residual branches scaled
        self.attention_norm = Norm(config, ops)
        self.attention = Attention(config, layers, out_std, ops, attention)
        self.mlp_norm = Norm(config, ops)
        self.mlp = MLP(config, layers, out_std, ops)

    def forward(self, x, rope, positions, document_ids):
        attn_out = self.attention(self.attention_norm(x), rope, positions, document_ids)
        normed, x = self.mlp_norm(attn_out, residual=x)
        return x + self.mlp(normed)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, layers: LayerFactory | None = None,
                 ops: KernelOps = TORCH_OPS, attention: Callable = attention_torch):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        layers = layers or LayerFactory()
        self.config = config
        self.embeds_input = True
        """The input is token ids to embed; False on a later pipeline stage, whose input is the
        previous stage's hidden states (set by the pipeline split, not guessed from the dtype)."""
        self.embedding = layers.embedding(config.vocab_size, config.hidden_size, config.init_std)
        self.position_embedding = (layers.embedding(config.max_seq_len, config.hidden_size, config.init_std)
                                   if config.position_embedding == "learned" else None)
        self.layers = nn.ModuleDict({str(i): Block(config, layers, ops, attention)
                                     for i in range(config.num_layers)})
        self.norm = Norm(config, ops)
        self.output = (None if config.tie_embeddings else
                       layers.linear(config.hidden_size, config.vocab_size, "column", config.init_std))
        if config.position_embedding == "rope":
            cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def reset_parameters(self) -> None:
        """This module's own tensors (the RoPE tables), for a model built on the meta device."""
        if self.rope_cos is not None:
            cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """tokens (B, T) ids, or (B, T, H) hidden states when `embeds_input` is False.
        Returns logits (B, T, V) on the last stage, else hidden states; `return_hidden` stops
        after the final norm (for a fused linear + cross-entropy loss)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2])
        # A last pipeline stage with tied embeddings holds the embedding for its head, not to embed.
        h = self.embedding(tokens) if self.embeds_input else tokens
        if self.position_embedding is not None and self.embeds_input:
            h = h + self.position_embedding(positions)
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        for layer in self.layers.values():
            h = layer(h, rope, positions, document_ids)
        if self.norm is None:
            return h
        h = self.norm(h)
        if return_hidden:
            return h
        return F.linear(h, self.output_weight)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.output is None else self.output.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in (self.embedding, self.position_embedding) if m is not None)
        return n
