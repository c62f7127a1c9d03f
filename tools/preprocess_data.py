"""Tokenize JSONL corpora into Megatron indexed datasets: <prefix>_<key>_document.bin/.idx.

Takes Megatron-LM's own command line, so an existing preprocessing script works unchanged,
and writes byte for byte what Megatron-LM's tools/preprocess_data.py (core_r0.16.0) writes
for the same flags:

    python tools/preprocess_data.py --input runs/corpus/code.jsonl --output-prefix runs/data/code \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model runs/tokenizer/spm.model \\
        --json-keys text --append-eod --workers 2

--input may be .jsonl or .jsonl.gz (with --partitions > 1, a glob, as there). Tokenizer types:
SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer (a .model file),
HuggingFaceTokenizer (a local folder), GPT2BPETokenizer (--vocab-file, --merge-file, with
--legacy-tokenizer), NullTokenizer (--vocab-size); --legacy-tokenizer selects Megatron-LM's
older wrappers as there. Differences: one run does what needs two there with --split-sentences
(which first only writes the split sentences), no partition files are left behind, and
--vocab-extra-ids is accepted and, as there, has no effect (that tool resets it to 0).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from megatron_code.cli import user_errors
from megatron_code.data.errors import DataError
from megatron_code.data.megatron_tokenizers import TOKENIZER_TYPES, TokenizerOptions, build_document_tokenizer
from megatron_code.data.preprocess import preprocess
from megatron_code.data.sentences import load_sentence_splitter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("input and output")
    data.add_argument("--input", required=True, help="JSONL file (plain or .gz); a glob with --partitions > 1")
    data.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    data.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset each")
    data.add_argument("--append-eod", action="store_true", help="end every non-empty document with EOD")
    data.add_argument("--split-sentences", action="store_true",
                      help="one sequence per sentence (NLTK punkt); writes <prefix>_<key>_sentence.bin/.idx")
    data.add_argument("--keep-newlines", action="store_true", help="keep newlines between split sentences")
    data.add_argument("--lang", default="english", help="language of the punkt model for --split-sentences")
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    tok.add_argument("--tokenizer-model", help="SentencePiece .model, or a Hugging Face tokenizer folder")
    tok.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    tok.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    tok.add_argument("--vocab-size", type=int, help="NullTokenizer: ids are below it; it is the EOD id")
    tok.add_argument("--legacy-tokenizer", action="store_true", help="Megatron-LM's older tokenizer wrappers")
    tok.add_argument("--tokenizer-hf-use-fast", action="store_true", help="load the fast Hugging Face tokenizer")
    tok.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                     help="Hugging Face ids as tokenizer(text).input_ids (BOS/EOS included)")
    tok.add_argument("--trust-remote-code", action="store_true", help="let transformers run the folder's code")
    tok.add_argument("--vocab-extra-ids", type=int, default=0, help="accepted; no effect, as in Megatron-LM's tool")
    run = parser.add_argument_group("runtime")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    run.add_argument("--partitions", type=int, default=1,
                     help="order documents as Megatron-LM's partitions do: line i goes to partition i mod N")
    run.add_argument("--keep-sequential-samples", action="store_true",
                     help="with --partitions: partitions are contiguous blocks, so the input order is kept")
    run.add_argument("--log-interval", type=int, default=1000, help="a progress line every N documents")
    run.add_argument("--chunk-bytes", type=int, default=None, help="input bytes per task (default: adaptive)")
    run.add_argument("--quiet", action="store_true", help="no progress and no summary line")
    parser.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, value in (("--workers", args.workers), ("--partitions", args.partitions)):
        if value < 1:
            print(f"error: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 1
    partitions = 1 if args.keep_sequential_samples else args.partitions  # contiguous blocks = input order
    inputs = [Path(p) for p in glob.glob(args.input)] if args.partitions > 1 else [Path(args.input)]
    if not inputs:
        print(f"error: --input {args.input}: no file matches", file=sys.stderr)
        return 1
    options = TokenizerOptions(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                               args.vocab_size, args.legacy_tokenizer, args.tokenizer_hf_use_fast,
                               args.tokenizer_hf_include_special_tokens, args.trust_remote_code)
    try:
        splitter = load_sentence_splitter(args.lang, args.keep_newlines) if args.split_sentences else None
        preprocess(inputs, args.output_prefix, build_document_tokenizer(options), json_keys=args.json_keys,
                   append_eod=args.append_eod, workers=args.workers, chunk_bytes=args.chunk_bytes,
                   partitions=partitions, splitter=splitter, log_interval=0 if args.quiet else args.log_interval,
                   progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
