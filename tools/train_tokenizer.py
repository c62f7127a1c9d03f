"""Train the SentencePiece BPE tokenizer (plus its Hugging Face files) on JSONL corpora.

    python tools/train_tokenizer.py --input runs/corpus/text.jsonl runs/corpus/code.jsonl \\
        --output-prefix runs/tokenizer/spm --vocab-size 8192

Writes <prefix>.model, <prefix>.vocab, <prefix>.meta.json and the folder <prefix>_hf/
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
transformers.AutoTokenizer loads. A rerun with the same inputs and parameters does nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_code.cli import user_errors
from megatron_code.data.errors import DataError
from megatron_code.data.tokenizer import hf_tokenizer_dir, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="JSONL files (plain or .gz)")
    parser.add_argument("--output-prefix", type=Path, required=True, help="writes <prefix>.model etc.")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--sample-docs", type=int, default=10_000,
                        help="documents sampled in total, split evenly between the inputs")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed")
    parser.add_argument("--text-key", default="text", help="JSON key holding the text")
    parser.add_argument("--force", action="store_true", help="retrain even when the metadata matches")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        model = train_tokenizer(args.input, args.output_prefix, vocab_size=args.vocab_size,
                                sample_docs=args.sample_docs, seed=args.seed, text_key=args.text_key,
                                force=args.force, progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{model}\n{hf_tokenizer_dir(model)}")
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
