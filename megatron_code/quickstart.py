"""The main job, end to end, with no arguments: embedded text+code corpus -> tokenizer ->
indexed binaries -> a small GPT trained on a text+code blend -> checkpoint -> report.

    python -m megatron_code.quickstart            (or: megatron-code-quickstart)

Every stage reuses what an earlier run built; training resumes from the latest checkpoint, and
a run that already reached --steps is reported from its files without training.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Ma et al. (ICLR 2024) pretrain their CODE arm on about one third code.
BLEND = {"text": 2.0, "code": 1.0}


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
        f"--train.output_dir={args.out / 'train'}",
        f"--train.progress={not args.no_progress}",
        "--optim.lr=2e-3", "--optim.min_lr=2e-4", f"--optim.warmup_steps={max(1, args.steps // 10)}",
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


def run(argv: list[str] | None = None) -> dict:
    """The quickstart; returns the train result and the paths it built (for tests)."""
    parser = argparse.ArgumentParser(prog="megatron-code-quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where everything goes")
    parser.add_argument("--size", default="quickstart", help="model preset (tiny for a smoke test)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus cap per source")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from megatron_code.config import load_config
    from megatron_code.data.builtin import build_builtin_data
    from megatron_code.training.checkpoint import CheckpointError, resolve

    started = time.perf_counter()
    tokenizer, prefixes = build_builtin_data(args.out, args.vocab_size, args.max_bytes, args.workers)
    overrides = overrides_for(args, tokenizer, prefixes)
    from megatron_code.training.run_summary import summarize

    run_dir = args.out / "train"
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
        from megatron_code.training.trainer import Trainer

        trainer = Trainer(load_config(None, overrides))
        params, device = trainer.model.num_parameters(), trainer.runtime.device
        result = trainer.train()
        done = summarize(run_dir)
        headline = (f"quickstart report ({(time.perf_counter() - started) / 60:.1f} min, {params / 1e6:.1f}M "
                    f"parameters, device {device})")
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
    run(argv)


if __name__ == "__main__":
    main()
