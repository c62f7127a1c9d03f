"""The training loop and its components: optimizer, LR schedule, checkpointing, metrics."""
