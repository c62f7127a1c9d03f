"""`python -m megatron_code.train --config examples/X.yaml [--section.field=value ...] [--load DIR]`"""
from __future__ import annotations

import argparse
import sys

from megatron_code.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="megatron-code", description=__doc__,
        epilog="Any config field can be set as --section.field=value, e.g. --train.steps=100.")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--load", help="resume from this checkpoint (same as --checkpoint.load=DIR)")
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    stray = [a for a in rest if a not in overrides]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (overrides look like --section.field=value)")
    if args.load:
        overrides.append(f"--checkpoint.load={args.load}")
    return args.config, overrides


def main(argv: list[str] | None = None) -> None:
    path, overrides = parse_args(argv)
    try:
        config = load_config(path, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    from megatron_code.training.trainer import Trainer  # heavy imports only after the config is valid

    result = Trainer(config).train()
    print(f"done: step {result.step}, final train loss {result.losses[-1] if result.losses else float('nan'):.4f}, "
          f"checkpoint {result.checkpoint}")


if __name__ == "__main__":
    main()
