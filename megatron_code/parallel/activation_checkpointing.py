"""Activation checkpointing: keep fewer activations in forward, recompute them in backward.

selective: Megatron's selective recomputation -- the attention core (scores, softmax, weighted
           values: the part that grows with sequence length) is recomputed, matmul outputs kept.
full:      each transformer layer keeps only its input and is recomputed whole.
"""
from __future__ import annotations

import functools

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

from megatron_code.model import GPT


def apply_ac(model: GPT, mode: str) -> None:
    if mode == "full":
        for name in list(model.layers):
            model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=False)
    elif mode == "selective":
        for block in model.layers.values():
            block.attention.attention = functools.partial(checkpoint, block.attention.attention,
                                                          use_reentrant=False, preserve_rng_state=False)
    elif mode != "none":
        raise ValueError(f"parallel.activation_checkpointing={mode!r} is not one of none, selective, full")
