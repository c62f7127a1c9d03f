"""The main job, end to end, with no arguments: embedded text+code corpus -> tokenizer ->
indexed binaries -> a small GPT trained on a text+code blend -> checkpoint -> report.

    python -m megatron_code.quickstart            (or: megatron-code-quickstart)

Every stage reuses what an earlier run built; training resumes from the latest checkpoint, and
a run that already reached --steps is reported from its files without training. Each --size
trains in its own directory (OUT/train for the default size, OUT/train-SIZE for the others), so
runs of different sizes never resume each other. A user error (a flag, a path, a run that
cannot resume) stops with one line and exit status 1 (2 for a bad flag).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_code.cli import user_errors

# Ma et al. (ICLR 2024) pretrain their CODE arm on about one third code.
BLEND = {"text": 2.0, "code": 1.0}
DEFAULT_SIZE = "quickstart"


class QuickstartError(Exception):
    """A problem the user must fix; main() prints it as one line."""


def run_dir_for(out: Path, size: str) -> Path:
    """The training run of one model size: its own directory, never another size's checkpoints."""
    return out / ("train" if size == DEFAULT_SIZE else f"train-{size}")


def overrides_for(args, tokenizer: Path, prefixes: dict[str, str]) -> list[str]:
    sources = ", ".join(f"{{name: {n}, prefix: '{p}', weight: {BLEND[n]}}}" for n, p in prefixes.items())
    return [
        f"--model.preset={args.size}",
        f"--data.sources=[{sources}]",
        f"--data.tokenizer={tokenizer}",
        f"--data.seq_length={args.seq_length}",
        "--data.split=95,5,0",  # a few code files make up many samples: hold out enough of them
        f"--train.steps={args.steps}",
        f"--train.micro_batch_size={args.batch_size}",
        f"--train.global_batch_size={args.batch_size}",
        f"--train.eval_interval={max(1, args.steps // 3)}",
        f"--train.device={args.device}",
        f"--train.dtype={args.dtype}",
        f"--train.output_dir={run_dir_for(args.out, args.size)}",
        f"--train.progress={not args.no_progress}",
        "--optim.lr=2e-3", "--optim.min_lr=2e-4", f"--optim.warmup_steps={max(1, args.steps // 10) if args.steps > 1 else 0}",
        "--checkpoint.keep_last=1",
    ]


def command_with_steps(argv: list[str] | None, steps: int) -> str:
    """This quickstart's command line with --steps set to `steps`."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--steps":
            del args[i: i + 2]
            break
        if arg.startswith("--steps="):
            del args[i]
            break
    return " ".join(["python -m megatron_code.quickstart", *args, "--steps", str(steps)])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad flag: one line (argparse's default prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None):
    from megatron_code.config import PRESETS

    parser = _Parser(prog="megatron-code-quickstart", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where everything goes")
    parser.add_argument("--size", default=DEFAULT_SIZE, choices=list(PRESETS),
                        help="model preset (tiny for a smoke test); each size trains in its own directory")
    parser.add_argument("--steps", type=_positive, default=300)
    parser.add_argument("--batch-size", type=_positive, default=8)
    parser.add_argument("--seq-length", type=_positive, default=256)
    parser.add_argument("--vocab-size", type=_positive, default=8192)
    parser.add_argument("--max-bytes", type=_positive, default=4_000_000, help="corpus cap per source")
    parser.add_argument("--workers", type=_positive, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 autocast on a GPU or a CPU with bf16 hardware, else fp32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (nor per-stage data lines)")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    """The quickstart; returns the train result and the paths it built (for tests)."""
    args = parse_args(argv)
    from megatron_code.config import ConfigError, load_config
    from megatron_code.parallel.distributed import pick_device
    from megatron_code.data.builtin import build_builtin_data, builtin_data_paths
    from megatron_code.training.checkpoint import CheckpointError, resolve
    from megatron_code.training.precision import pick_precision

    # the whole config first: a mistake surfaces before the corpus, tokenizer and binaries are built
    overrides = overrides_for(args, *builtin_data_paths(args.out))
    try:
        config = load_config(None, overrides)
        config.validate()
        pick_precision(config.train.dtype, pick_device(args.device), config.train.allow_emulated_bf16)
    except ConfigError as e:
        raise QuickstartError(str(e)) from None
    started = time.perf_counter()
    tokenizer, prefixes = build_builtin_data(args.out, args.vocab_size, args.max_bytes, args.workers,
                                             progress=not args.no_progress)
    data_built = time.perf_counter()
    from megatron_code.training.run_summary import summarize

    run_dir = run_dir_for(args.out, args.size)
    try:
        checkpoint = resolve(run_dir)
    except CheckpointError:
        checkpoint = None  # nothing to resume: a fresh run
    done = summarize(run_dir) if checkpoint is not None else None
    result = None
    if done is not None and done["step"] >= args.steps:
        headline = (f"quickstart report: nothing to train, the checkpoint is at step {done['step']} (--steps "
                    f"{args.steps}); to train further: {command_with_steps(argv, done['step'] + args.steps)}")
    else:
        if checkpoint is not None:
            overrides.append(f"--checkpoint.load={checkpoint}")
        from megatron_code.data.errors import DataError
        from megatron_code.training.trainer import Trainer

        try:
            trainer = Trainer(load_config(None, overrides))
        except (ConfigError, CheckpointError, DataError) as e:
            again = f" (it resumes {checkpoint}: remove {run_dir} to start over)" if checkpoint is not None else ""
            raise QuickstartError(f"{e}{again}") from None
        params, device = trainer.model.num_parameters(), trainer.runtime.device
        result = trainer.train()
        done = summarize(run_dir)
        finished = time.perf_counter()
        headline = (f"quickstart report ({(finished - started) / 60:.1f} min: data {data_built - started:.0f} s, "
                    f"training {finished - data_built:.0f} s; {params / 1e6:.1f}M parameters, device {device}, "
                    f"{trainer.precision.name})")
    lines = [
        "",
        headline,
        f"  steps            {done['step']}",
        "  tokens seen      " + ", ".join(f"{k} {v:,}" for k, v in done["tokens"].items()),
        f"  train loss       {done['first_loss']:.3f} (step 1) -> {done['last_loss']:.3f} (step {done['step']})",
        "  valid loss       " + ", ".join(f"{k} {v:.3f}" for k, v in done["valid_loss"].items()),
        f"  tokenizer        {tokenizer}",
        "  datasets         " + ", ".join(prefixes.values()),
        f"  checkpoint       {done['checkpoint']}",
        f"  metrics          {run_dir / 'metrics.jsonl'} (plots: python tools/plot_run.py {run_dir})",
    ]
    print("\n".join(lines))
    return {"result": result, "summary": done, "tokenizer": tokenizer, "prefixes": prefixes}


def main(argv: list[str] | None = None) -> None:
    from megatron_code.data.errors import DataError

    with user_errors(QuickstartError, DataError):
        run(argv)


if __name__ == "__main__":
    main()
