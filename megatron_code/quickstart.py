"""The main job, end to end, with no arguments: embedded text+code corpus -> tokenizer ->
indexed binaries -> a small GPT trained on a text+code blend -> checkpoint -> report.

    python -m megatron_code.quickstart            (or: megatron-code-quickstart)

Every stage reuses what an earlier run built; training resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

# Ma et al. (ICLR 2024) pretrain their CODE arm on about one third code.
BLEND = {"text": 2.0, "code": 1.0}


def build_data(out: Path, vocab_size: int, max_bytes: int, workers: int) -> tuple[Path, dict[str, str]]:
    from megatron_code.data.corpus import prepare_builtin_corpus
    from megatron_code.data.preprocess import preprocess
    from megatron_code.data.tokenizer import train_tokenizer

    corpus = prepare_builtin_corpus(out / "corpus", max_bytes_per_source=max_bytes)
    tokenizer = train_tokenizer([corpus["text"], corpus["code"]], out / "tokenizer" / "spm", vocab_size=vocab_size)
    prefixes = {}
    for name, path in corpus.items():
        summary = preprocess(path, out / "data" / name, tokenizer, json_keys=("text",), append_eod=True,
                             workers=workers)
        prefixes[name] = str(summary["outputs"]["text"])
    return tokenizer, prefixes


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
    from megatron_code.training.checkpoint import CheckpointError, resolve

    started = time.perf_counter()
    tokenizer, prefixes = build_data(args.out, args.vocab_size, args.max_bytes, args.workers)
    overrides = overrides_for(args, tokenizer, prefixes)
    try:
        overrides.append(f"--checkpoint.load={resolve(args.out / 'train')}")
    except CheckpointError:
        pass  # nothing to resume: a fresh run

    from megatron_code.training.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    params = trainer.model.num_parameters()
    result = trainer.train()
    minutes = (time.perf_counter() - started) / 60
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    lines = [
        "",
        f"quickstart report ({minutes:.1f} min, {params / 1e6:.1f}M parameters, "
        f"device {trainer.runtime.device})",
        f"  steps            {result.step}",
        "  tokens seen      " + ", ".join(f"{k} {v:,}" for k, v in result.tokens_per_source.items()),
        f"  train loss       {first:.3f} (first step this run) -> {last:.3f} (last)",
        "  valid loss       " + ", ".join(f"{k} {v:.3f}" for k, v in result.valid_losses.items()),
        f"  tokenizer        {tokenizer}",
        "  datasets         " + ", ".join(prefixes.values()),
        f"  checkpoint       {result.checkpoint}",
        f"  metrics          {result.run_dir / 'metrics.jsonl'}",
    ]
    print("\n".join(lines))
    return {"result": result, "tokenizer": tokenizer, "prefixes": prefixes}


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
