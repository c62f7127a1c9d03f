"""Tokenize instruction data into Megatron indexed binaries with loss masks, for train.stage=sft.

    python tools/preprocess_sft.py --input runs/sft/text_instructions.jsonl --output-prefix runs/sft/text \\
        --tokenizer-model runs/quickstart/tokenizer/spm.model --max-length 1024

Input: JSONL (plain or .gz), one example per line, in any of these shapes:
    {"instruction": ..., "input": ..., "output": ...}                    (Alpaca; input optional)
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   (multi-turn)
    {"prompt": ..., "completion": ...}

Writes <prefix>.bin/.idx (per example: its token ids, then its loss mask; only assistant tokens
carry loss, every assistant turn included) and <prefix>.meta.json (the chat template, the
tokenizer, the counts). The chat template is the tokenizer's role tokens (<|system|> <|user|>
<|assistant|> <|end|>), or, for a Hugging Face tokenizer folder with a chat template, that
template. A bad line stops the run with one line naming the file and line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_code.cli import user_errors
from megatron_code.data.chat import TEMPLATE_KINDS
from megatron_code.data.errors import DataError
from megatron_code.data.sft import OVERFLOW, preprocess_sft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="JSONL file (plain or .gz)")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx/.meta.json")
    parser.add_argument("--tokenizer-model", required=True,
                        help="SentencePiece .model, or a Hugging Face tokenizer folder")
    parser.add_argument("--template", default="auto", choices=TEMPLATE_KINDS,
                        help="auto: the folder's own chat template when it has one, else the role tokens")
    parser.add_argument("--max-length", type=int, default=0,
                        help="tokens per example at most (0: no limit); see --overflow")
    parser.add_argument("--overflow", default="truncate", choices=OVERFLOW,
                        help="longer examples: cut to --max-length, or left out (counts are reported)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    args = parser.parse_args(argv)
    try:
        preprocess_sft(args.input, args.output_prefix, args.tokenizer_model, args.max_length, args.overflow,
                       args.template, progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
