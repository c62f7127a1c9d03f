"""Write one JSONL corpus per source (`{"text": ..., "source": ..., "path" | "id": ...}`).

    python tools/prepare_corpus.py --out-dir runs/corpus                        # built-in text + code, all of it
    python tools/prepare_corpus.py --out-dir runs/corpus --max-bytes-per-source 4M
    python tools/prepare_corpus.py --out-dir runs/corpus \\
        --source 'code=dir:~/src/project?glob=*.py,*.c&exclude=tests' \\
        --source 'web=jsonl:data/web.jsonl.gz?key=content' \\
        --source 'wiki=hf:wikitext?config=wikitext-103-raw-v1&split=train'

Sources are NAME=KIND:LOCATION[?option=value&...] with KIND dir (options glob, exclude,
max_file_bytes), jsonl (key), hf (config, split, key) or stdlib (code | text). Documents are
deduplicated, shuffled with --seed and capped; a rerun with the same parameters does nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_code.cli import user_errors
from megatron_code.data.corpus import builtin_sources, parse_source, prepare_corpus
from megatron_code.data.errors import DataError


def parse_size(text: str) -> int | None:
    """'4M' -> 4194304, '500K', '1G', '123' (bytes); '0' means no cap (None)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        value = int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4M, 500K, 1G or bytes)") from None
    return value or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True, help="where <name>.jsonl and manifest.json go")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=KIND:LOCATION[?opts]",
                        help="a source (repeatable); default: the built-in text and code sources")
    parser.add_argument("--seed", type=int, default=1234, help="shuffle seed")
    parser.add_argument("--max-bytes-per-source", type=parse_size, default=None,
                        help="cap on each output file, e.g. 4M (default: no cap)")
    parser.add_argument("--min-chars", type=int, default=1, help="drop shorter documents (after stripping)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        sources = [parse_source(s) for s in args.source] or builtin_sources()
        outputs = prepare_corpus(sources, args.out_dir, seed=args.seed, max_bytes_per_source=args.max_bytes_per_source,
                                 min_chars=args.min_chars, force=args.force, progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in outputs.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
