"""`python -m megatron_code.train --config examples/X.yaml [--section.field=value ...] [--load DIR]`

Under torchrun every rank runs this; the layout comes from `parallel.*`, the ranks from torchrun:
    torchrun --nproc_per_node=8 -m megatron_code.train --config X.yaml --parallel.tensor=2 --parallel.pipeline=2
"""
from __future__ import annotations

import argparse
import os

from megatron_code.cli import add_debug_flag, user_errors
from megatron_code.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="megatron-code", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be set as --section.field=value, e.g. --train.steps=100.")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--load", help="resume from this checkpoint (same as --checkpoint.load=DIR)")
    add_debug_flag(parser)
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    stray = [a for a in rest if a not in overrides]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (overrides look like --section.field=value)")
    if args.load:
        overrides.append(f"--checkpoint.load={args.load}")
    return args.config, overrides


def checked_config(argv: list[str] | None, world_size: int):
    """The config this command line gives, validated for `world_size` ranks: every check that
    runs before any work (tests run it on the launch examples' command lines)."""
    path, overrides = parse_args(argv)
    config = load_config(path, overrides)
    config.validate(world_size=world_size)
    return config


def main(argv: list[str] | None = None) -> None:
    # Every rank stops with the message: torchrun ends the other ranks as soon as one exits, so a
    # message left to rank 0 alone could be cut off.
    with user_errors(ConfigError):
        config = checked_config(argv, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's ranks fit the layout
    # heavy imports only after the config is valid
    from megatron_code.data.errors import DataError
    from megatron_code.parallel.distributed import shutdown_distributed
    from megatron_code.training.checkpoint import CheckpointError
    from megatron_code.training.guard import NonFiniteError
    from megatron_code.training.trainer import Trainer

    with user_errors(ConfigError, CheckpointError, DataError, NonFiniteError):
        trainer = Trainer(config)
        result = trainer.train()
    if trainer.runtime.is_main:
        print(f"{'stopped' if result.stopped else 'done'}: step {result.step}, final train loss "
              f"{result.losses[-1] if result.losses else float('nan'):.4f}, checkpoint {result.checkpoint}")
    shutdown_distributed()


if __name__ == "__main__":
    main()
