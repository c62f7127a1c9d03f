"""Our GPT as transformers models, and Llama-architecture transformers models as our GPT: the
config and weight mappings in both directions, in one place.

- Llama style (rmsnorm, swiglu, rope) <-> `LlamaForCausalLM` (import also reads
  `MistralForCausalLM` without an active sliding window: the same weights and math).
- GPT-2 / PanGu style (layernorm, gelu tanh, learned positions) -> `GPT2LMHeadModel`, whose
  biases we do not have and export as zeros; it has no grouped-query attention.

Our fused qkv weight is grouped per kv head as [q_1..q_g, k, v] (so a tensor-parallel split keeps
groups whole); a naive split into thirds would scramble grouped-query models. The MLP up weight is
(2, ffn, hidden): gate, then up. GPT-2 keeps Conv1D weights as (in, out), the transpose of ours.
RoPE is the rotate-half convention of transformers' Llama (checked against it in the tests).
State dicts here are keyed by parameter names without the checkpoint's "model." prefix.
"""
from __future__ import annotations

import torch

from megatron_code.config import ModelConfig

LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class ConversionError(ValueError):
    """A model or checkpoint that cannot be converted; the message says what and why."""


def hf_architecture(config: ModelConfig) -> str:
    """"llama" or "gpt2": the transformers family that expresses `config` exactly."""
    style = (config.norm, config.activation, config.position_embedding)
    if style == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    if style == ("layernorm", "gelu", "learned"):
        if config.kv_heads != config.num_heads:
            raise ConversionError(f"GPT2LMHeadModel has no grouped-query attention: model.num_kv_heads="
                                  f"{config.kv_heads} differs from model.num_heads={config.num_heads}")
        return "gpt2"
    raise ConversionError(
        f"no transformers class expresses norm={config.norm}, activation={config.activation}, "
        f"position_embedding={config.position_embedding}: LlamaForCausalLM needs rmsnorm + swiglu + rope, "
        "GPT2LMHeadModel needs layernorm + gelu + learned positions")


def hf_config(config: ModelConfig, vocab_size: int, special_ids: dict[str, int | None]):
    """The transformers config for `config` with the vocabulary cut to `vocab_size`;
    `special_ids` holds bos_token_id, eos_token_id and pad_token_id."""
    import transformers

    if hf_architecture(config) == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
            max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings, hidden_act="silu",
            attention_bias=False, mlp_bias=False, initializer_range=config.init_std,
            architectures=["LlamaForCausalLM"], **special_ids)
    return transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
        n_positions=config.max_seq_len, n_inner=config.ffn_size, activation_function="gelu_new",
        layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std,
        architectures=["GPT2LMHeadModel"], **special_ids)


def _split_qkv(qkv: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, h = config.num_heads // config.kv_heads, config.head_dim, config.hidden_size
    grouped = qkv.view(config.kv_heads, g + 2, d, h)
    return grouped[:, :g].reshape(-1, h), grouped[:, g].reshape(-1, h), grouped[:, g + 1].reshape(-1, h)


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    g, d, h = config.num_heads // config.kv_heads, config.head_dim, config.hidden_size
    groups = torch.cat([q.reshape(config.kv_heads, g, d, h), k.reshape(config.kv_heads, 1, d, h),
                        v.reshape(config.kv_heads, 1, d, h)], dim=1)
    return groups.reshape(-1, h)


def to_hf_state(state: dict[str, torch.Tensor], config: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, the vocabulary cut to `vocab_size` rows."""
    if hf_architecture(config) == "gpt2":
        return _to_gpt2_state(state, config, vocab_size)
    out = {"model.embed_tokens.weight": state["embedding.weight"][:vocab_size], "model.norm.weight": state["norm.weight"]}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(state[ours + "attention.qkv.weight"], config)
        gate, up = state[ours + "mlp.up.weight"]
        out.update({
            theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
            theirs + "self_attn.v_proj.weight": v, theirs + "self_attn.o_proj.weight": state[ours + "attention.out.weight"],
            theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
            theirs + "input_layernorm.weight": state[ours + "attention_norm.weight"],
            theirs + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"]})
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"][:vocab_size]
    return {k: v.contiguous() for k, v in out.items()}


def _to_gpt2_state(state: dict[str, torch.Tensor], config: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    h = config.hidden_size
    out = {"transformer.wte.weight": state["embedding.weight"][:vocab_size],
           "transformer.wpe.weight": state["position_embedding.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"]}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        q, k, v = _split_qkv(state[ours + "attention.qkv.weight"], config)
        up, down = state[ours + "mlp.up.weight"], state[ours + "mlp.down.weight"]
        out.update({  # Conv1D weights are (in, out); the biases we do not have are zero
            theirs + "ln_1.weight": state[ours + "attention_norm.weight"], theirs + "ln_1.bias": state[ours + "attention_norm.bias"],
            theirs + "attn.c_attn.weight": torch.cat([q, k, v]).t(), theirs + "attn.c_attn.bias": q.new_zeros(3 * h),
            theirs + "attn.c_proj.weight": state[ours + "attention.out.weight"].t(), theirs + "attn.c_proj.bias": q.new_zeros(h),
            theirs + "ln_2.weight": state[ours + "mlp_norm.weight"], theirs + "ln_2.bias": state[ours + "mlp_norm.bias"],
            theirs + "mlp.c_fc.weight": up.t(), theirs + "mlp.c_fc.bias": up.new_zeros(up.shape[0]),
            theirs + "mlp.c_proj.weight": down.t(), theirs + "mlp.c_proj.bias": down.new_zeros(h)})
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"][:vocab_size]
    return {k: v.contiguous() for k, v in out.items()}


def _rope(hf) -> tuple[str, float, float]:
    """(rope type, theta, partial rotary factor) under transformers 4 and 5 config layouts."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    params.update(getattr(hf, "rope_scaling", None) or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    return rope_type, float(theta), float(partial)


def from_hf_config(hf, pad_vocab_to_multiple_of: int = 128) -> ModelConfig:
    """Our ModelConfig for a Llama-architecture transformers config; refuses, naming the field,
    whatever our model cannot express."""
    architectures = list(getattr(hf, "architectures", None) or [])
    name = architectures[0] if architectures else f"model_type={getattr(hf, 'model_type', '?')}"
    if not (set(architectures) & set(LLAMA_ARCHITECTURES) or getattr(hf, "model_type", None) in ("llama", "mistral")):
        raise ConversionError(f"{name}: import reads Llama-architecture models ({', '.join(LLAMA_ARCHITECTURES)})")
    problems = []
    if getattr(hf, "quantization_config", None):
        problems.append("quantization_config is set: quantized weights are not supported, import the full-precision model")
    for bias in ("attention_bias", "mlp_bias"):
        if getattr(hf, bias, False):
            problems.append(f"{bias}=true: our model has no biases in its linear layers")
    if getattr(hf, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.hidden_act!r}: our gated MLP is SwiGLU (silu)")
    heads, hidden = hf.num_attention_heads, hf.hidden_size
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    if hidden % heads or head_dim != hidden // heads:
        problems.append(f"head_dim={head_dim} is not hidden_size / num_attention_heads = {hidden}/{heads}: "
                        "our model derives the head size")
    rope_type, theta, partial = _rope(hf)
    if rope_type != "default":
        problems.append(f"rope_type={rope_type!r}: RoPE scaling is not implemented here (only the unscaled "
                        "rotate-half RoPE)")
    if partial != 1.0:
        problems.append(f"partial_rotary_factor={partial}: our RoPE rotates the whole head")
    window = getattr(hf, "sliding_window", None)
    if window is not None and window < hf.max_position_embeddings and getattr(hf, "use_sliding_window", True):
        problems.append(f"sliding_window={window} < max_position_embeddings={hf.max_position_embeddings}: "
                        "our attention is full causal attention")
    if problems:
        raise ConversionError(f"{name} cannot be imported exactly:\n  " + "\n  ".join(problems))
    config = ModelConfig(
        vocab_size=0, pad_vocab_to_multiple_of=pad_vocab_to_multiple_of, hidden_size=hidden,
        num_layers=hf.num_hidden_layers, num_heads=heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        ffn_hidden_size=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, norm="rmsnorm",
        norm_eps=hf.rms_norm_eps, activation="swiglu", position_embedding="rope", rope_theta=theta,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=getattr(hf, "initializer_range", 0.02))
    config.vocab_size = config.padded_vocab(hf.vocab_size)
    config.validate()
    return config


def hf_llama_names(config: ModelConfig) -> list[str]:
    """The tensor names a LlamaForCausalLM of `config` stores."""
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{p}.weight" for i in range(config.num_layers) for p in per_layer]
    return names + ([] if config.tie_embeddings else ["lm_head.weight"])


def from_hf_state(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights from a LlamaForCausalLM state dict; vocabulary rows beyond the transformers
    model's are zero. Every transformers tensor must find its place: none is dropped."""
    expected = hf_llama_names(config)
    missing = [n for n in expected if n not in hf_state]
    if missing:
        raise ConversionError(f"missing tensors: {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    ignorable = {n for n in hf_state if n.endswith("rotary_emb.inv_freq")}  # a buffer older checkpoints saved
    if config.tie_embeddings and "lm_head.weight" in hf_state:
        if not torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"]):
            raise ConversionError("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight")
        ignorable.add("lm_head.weight")
    unexpected = sorted(set(hf_state) - set(expected) - ignorable)
    if unexpected:
        raise ConversionError(f"tensors our model has no place for: {', '.join(unexpected[:5])}")

    def padded(weight: torch.Tensor) -> torch.Tensor:
        out = weight.new_zeros(config.vocab_size, weight.shape[1])
        out[: weight.shape[0]] = weight
        return out

    state = {"embedding.weight": padded(hf_state["model.embed_tokens.weight"]), "norm.weight": hf_state["model.norm.weight"]}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        state.update({
            ours + "attention.qkv.weight": _join_qkv(*(hf_state[f"{theirs}self_attn.{p}_proj.weight"] for p in "qkv"), config),
            ours + "attention.out.weight": hf_state[theirs + "self_attn.o_proj.weight"],
            ours + "mlp.up.weight": torch.stack([hf_state[theirs + "mlp.gate_proj.weight"], hf_state[theirs + "mlp.up_proj.weight"]]),
            ours + "mlp.down.weight": hf_state[theirs + "mlp.down_proj.weight"],
            ours + "attention_norm.weight": hf_state[theirs + "input_layernorm.weight"],
            ours + "mlp_norm.weight": hf_state[theirs + "post_attention_layernorm.weight"]})
    if not config.tie_embeddings:
        state["output.weight"] = padded(hf_state["lm_head.weight"])
    return state


def to_hf_model(model, vocab_size: int | None = None):
    """A transformers model (LlamaForCausalLM or GPT2LMHeadModel) with `model`'s config and a
    copy of its weights, the vocabulary cut to `vocab_size` rows (default: not cut)."""
    import transformers

    c = model.config
    vocab_size = vocab_size or c.vocab_size
    family = transformers.LlamaForCausalLM if hf_architecture(c) == "llama" else transformers.GPT2LMHeadModel
    hf = family(hf_config(c, vocab_size, {})).to(model.embedding.weight.dtype)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    hf.load_state_dict(to_hf_state(state, c, vocab_size), strict=not c.tie_embeddings)  # a tied head is not stored
    return hf
