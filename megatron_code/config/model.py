"""The model section and the named sizes (presets)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import ConfigError, check_choice


@dataclass
class ModelConfig:
    preset: str | None = None
    """Named size (see PRESETS); explicit fields in YAML or overrides win over it."""
    vocab_size: int = 0
    """0 = take it from the tokenizer (padded to `pad_vocab_to_multiple_of`)."""
    pad_vocab_to_multiple_of: int = 128
    """Megatron pads the embedding so it splits evenly over tensor-parallel ranks; export cuts it."""
    tokenizer_vocab_size: int = 0
    """The tokenizer's ids, the first rows of the embedding and head; rows past them are padding,
    left out of the loss's softmax (zero gradient), so training, evaluation and the export all
    normalize over the tokenizer's vocabulary. Set from the tokenizer at start-up and saved with
    the checkpoint. 0: none known (a checkpoint saved before this field; whoever has the tokenizer
    -- resume, evaluation, export -- takes it from there); a bare model then has no padding."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 0
    """Grouped-query attention: 0 = same as num_heads (plain multi-head attention)."""
    ffn_hidden_size: int = 0
    """0 = Llama's rule: 8/3 * hidden rounded up to a multiple of 64 (4 * hidden for GELU)."""
    max_seq_len: int = 2048
    norm: str = "rmsnorm"
    """rmsnorm (Llama) | layernorm (GPT-2 / PanGu)."""
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    """swiglu (gated) | gelu (GPT-2 / PanGu, tanh approximation)."""
    position_embedding: str = "rope"
    """rope | learned (absolute positions, GPT-2 / PanGu)."""
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    kernels: str = "auto"
    """auto | triton | torch: who computes norms, RoPE, activations and the loss."""
    attention: str = "auto"
    """auto | sdpa | flash_attn | triton. auto decides per batch: SDPA (flash-attn before Hopper
    when installed); packed sequences (document ids) on CUDA through flash-attn's variable-length
    path when installed, else the Triton kernel; on CPU SDPA with the document mask."""
    fused_linear_cross_entropy: bool = False
    """Compute the output projection and the loss together in token chunks, so the full
    [tokens, vocab] logits are never held (5-20x less loss memory at large vocabularies)."""

    def validate(self) -> None:
        check_choice("model.norm", self.norm, ("rmsnorm", "layernorm"))
        check_choice("model.activation", self.activation, ("swiglu", "gelu"))
        check_choice("model.position_embedding", self.position_embedding, ("rope", "learned"))
        check_choice("model.kernels", self.kernels, ("auto", "triton", "torch"))
        check_choice("model.attention", self.attention, ("auto", "sdpa", "flash_attn", "triton"))
        for name in ("hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tokenizer_vocab_size <= (self.vocab_size or self.tokenizer_vocab_size):
            raise ConfigError(f"model.tokenizer_vocab_size={self.tokenizer_vocab_size} must be >= 0 and at most "
                              f"model.vocab_size={self.vocab_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.kv_heads}")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "gelu":
            return 4 * self.hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64

    @property
    def real_vocab_size(self) -> int:
        """The ids the loss normalizes over: the tokenizer's, else the whole vocabulary."""
        return self.tokenizer_vocab_size or self.vocab_size

    def padded_vocab(self, tokenizer_vocab: int, tensor_parallel: int = 1) -> int:
        """The tokenizer's vocabulary rounded up to `pad_vocab_to_multiple_of x tensor_parallel`,
        so every tensor-parallel rank holds an equal, aligned slice of the embedding."""
        m = self.pad_vocab_to_multiple_of * tensor_parallel
        return -(-tokenizer_vocab // m) * m


def _llama(hidden: int, layers: int, heads: int, kv: int, ffn: int, seq: int, tie: bool = False) -> dict:
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                ffn_hidden_size=ffn, max_seq_len=seq, tie_embeddings=tie)


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: runs in milliseconds on CPU; GQA on so every code path is exercised.
    "tiny": _llama(64, 2, 4, 2, 192, 256, tie=True),
    # The quickstart: ~7M parameters with a 8K vocabulary, trains on 2 CPU cores in minutes.
    "quickstart": _llama(256, 6, 8, 4, 704, 256, tie=True),
    "125m": _llama(768, 12, 12, 12, 2048, 2048, tie=True),
    # Cohere's "To Code, or Not To Code?" sizes (seq 8192).
    "470m": _llama(1024, 24, 16, 16, 2816, 8192),
    "1.3b": _llama(2048, 24, 16, 16, 5632, 2048),
    "2.8b": _llama(2560, 32, 32, 32, 6912, 8192),
    # PanGu-alpha 2.6B as in Ma et al. (ICLR 2024): the older GPT architecture.
    "2.6b-pangu": dict(hidden_size=2560, num_layers=32, num_heads=32, num_kv_heads=32,
                       ffn_hidden_size=10240, max_seq_len=1024, norm="layernorm",
                       activation="gelu", position_embedding="learned"),
    # PanGu-alpha 13B, Ma et al.'s instruction-tuning arms at 13B.
    "13b-pangu": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, ffn_hidden_size=20480,
                      max_seq_len=1024, norm="layernorm", activation="gelu", position_embedding="learned"),
    "7b": _llama(4096, 32, 32, 32, 11008, 4096),
}
