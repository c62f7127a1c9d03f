"""Our Llama-style GPT as transformers' LlamaForCausalLM: the weight mapping, in one place.

The fused qkv weight is grouped per kv head as [q_1..q_g, k, v] (so a tensor-parallel split keeps
groups whole); a naive split into thirds would scramble grouped-query models. The fused MLP up
projection's weight is (2, ffn, hidden): gate, then up. Vocab padding stays: callers that export cut it themselves.
"""
from __future__ import annotations

import torch

from megatron_code.model.gpt import GPT


def to_hf_llama(model: GPT):
    """A LlamaForCausalLM with `model`'s config and a copy of its weights (Llama-style models only)."""
    import transformers

    c = model.config
    if (c.norm, c.activation, c.position_embedding) != ("rmsnorm", "swiglu", "rope"):
        raise ValueError("only Llama-style models (rmsnorm, swiglu, rope) map onto LlamaForCausalLM")
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_config).to(model.embedding.weight.dtype)
    g, d, h = c.num_heads // c.kv_heads, c.head_dim, c.hidden_size
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.embedding.weight)
        for i, layer in model.layers.items():
            hl = hf.model.layers[int(i)]
            qkv = layer.attention.qkv.weight.view(c.kv_heads, g + 2, d, h)
            hl.self_attn.q_proj.weight.copy_(qkv[:, :g].reshape(-1, h))
            hl.self_attn.k_proj.weight.copy_(qkv[:, g].reshape(-1, h))
            hl.self_attn.v_proj.weight.copy_(qkv[:, g + 1].reshape(-1, h))
            hl.self_attn.o_proj.weight.copy_(layer.attention.out.weight)
            gate, up = layer.mlp.up.weight  # (2, ffn, hidden)
            hl.mlp.gate_proj.weight.copy_(gate)
            hl.mlp.up_proj.weight.copy_(up)
            hl.mlp.down_proj.weight.copy_(layer.mlp.down.weight)
            hl.input_layernorm.weight.copy_(layer.attention_norm.weight)
            hl.post_attention_layernorm.weight.copy_(layer.mlp_norm.weight)
        hf.model.norm.weight.copy_(model.norm.weight)
        if not c.tie_embeddings:
            hf.lm_head.weight.copy_(model.output.weight)
    return hf
