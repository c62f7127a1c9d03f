"""Tokenize a JSONL corpus into Megatron indexed datasets: <prefix>_<key>_document.bin/.idx.

Takes Megatron-LM's own command line, so an existing preprocessing script works unchanged,
and writes byte for byte what Megatron-LM's tools/preprocess_data.py writes:

    python tools/preprocess_data.py --input runs/corpus/code.jsonl --output-prefix runs/data/code \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model runs/tokenizer/spm.model \\
        --json-keys text --append-eod --workers 2

--input may be .jsonl or .jsonl.gz. A JSON list value is taken as pre-split sentences (one
sequence each), as Megatron does. --partitions, --log-interval, --dataset-impl mmap,
--vocab-file, --merge-file and --keep-sequential-samples are accepted and have nothing to do
here (workers parallelize one pass; document order always follows the input).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_code.data.errors import DataError
from megatron_code.data.preprocess import preprocess

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("input and output")
    data.add_argument("--input", type=Path, required=True, help="JSONL file (plain or .gz)")
    data.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    data.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset each")
    data.add_argument("--append-eod", action="store_true", help="end every non-empty document with EOD")
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    tok.add_argument("--tokenizer-model", required=True,
                     help="SentencePiece .model, or a Hugging Face tokenizer folder or hub id")
    run = parser.add_argument_group("runtime")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    run.add_argument("--chunk-bytes", type=int, default=None, help="input bytes per task (default: adaptive)")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    compat = parser.add_argument_group("accepted for Megatron-LM compatibility")
    compat.add_argument("--partitions", type=int, default=1)
    compat.add_argument("--log-interval", type=int, default=1000)
    compat.add_argument("--dataset-impl", default="mmap", choices=["mmap"])
    compat.add_argument("--vocab-file")
    compat.add_argument("--merge-file")
    compat.add_argument("--keep-sequential-samples", action="store_true")
    compat.add_argument("--split-sentences", action="store_true", help="not supported: give sentences as a JSON list")
    compat.add_argument("--keep-newlines", action="store_true")
    compat.add_argument("--lang", default="english")
    args = parser.parse_args(argv)
    if args.split_sentences:
        print("error: --split-sentences is not supported; store pre-split sentences as a JSON list of strings",
              file=sys.stderr)
        return 1
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 1
    try:
        preprocess(args.input, args.output_prefix, args.tokenizer_model, json_keys=args.json_keys,
                   append_eod=args.append_eod, workers=args.workers, chunk_bytes=args.chunk_bytes,
                   progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
