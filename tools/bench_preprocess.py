"""Benchmark tools/preprocess_data.py against Megatron-LM's own tools/preprocess_data.py, side by side.

Both tools run as they are run by hand: a fresh process each, the same JSONL corpus, the same
flags (`--tokenizer-type SentencePieceTokenizer --append-eod --workers N`), one tokenizer at a
time; wall time includes start-up. CPU time is that of the tool and all its processes. Then
the .bin and .idx files are compared byte for byte.

    python tools/bench_preprocess.py --megatron-lm /path/to/Megatron-LM [--megatron-python PY]

The corpus (default at least 50 MB) is built from what the running Python installation
carries: the .py files of its installed packages and standard library as code, the docstrings
of those modules as prose, shuffled together with a fixed seed. The tokenizers are 32k-piece
SentencePiece models trained on it: one with SentencePiece's default options (unigram,
nmt_nfkc, dummy prefix), one with those defaults but BPE and byte fallback (the kind Llama-2
and Mistral ship), and tools/train_tokenizer.py's own. Megatron-LM's tool needs torch and
`six regex pyyaml pydantic` in the interpreter that runs it (--megatron-python).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import sentencepiece as spm

from megatron_code.data.corpus import _docstring_document, _module_name
from megatron_code.data.tokenizer import train_tokenizer

TOOL = Path(__file__).resolve().parent / "preprocess_data.py"


def build_corpus(path: Path, megabytes: float, seed: int = 1234) -> Path:
    """Code and docstring prose from the installed packages, about 55:45 by bytes (see module doc)."""
    if path.exists():
        return path
    roots = [Path(sysconfig.get_paths()[k]) for k in ("purelib", "stdlib")]
    files = sorted((root, p.relative_to(root)) for root in roots for p in root.rglob("*.py")
                   if not {"test", "tests", "__pycache__"} & set(p.relative_to(root).parts))
    random.Random(seed).shuffle(files)
    docs, code_bytes, text_bytes = [], 0, 0
    for root, rel in files:
        if code_bytes + text_bytes >= megabytes * 1e6:
            break
        try:
            source = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not 200 <= len(source) <= 1_000_000:
            continue
        if code_bytes <= 1.2 * text_bytes:
            docs.append(source)
            code_bytes += len(source.encode())
        if (prose := _docstring_document(_module_name(str(rel)), source)) is not None:
            docs.append(prose)
            text_bytes += len(prose.encode())
    random.Random(seed).shuffle(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    os.replace(tmp, path)
    print(f"corpus: {path} ({code_bytes / 1e6:.1f} MB code, {text_bytes / 1e6:.1f} MB prose, {len(docs):,} documents)")
    return path


def build_tokenizers(corpus: Path, out: Path, vocab_size: int) -> dict[str, Path]:
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    lines = [s for t in texts for s in t.splitlines() if s.strip()]
    models = {}
    for name, options in (("sentencepiece-defaults", {}),
                          ("sentencepiece-defaults-bpe-byte-fallback", {"model_type": "bpe", "byte_fallback": True})):
        models[name] = out / f"{name}-{vocab_size}.model"
        if not models[name].exists():
            spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(models[name])[:-6],
                                           vocab_size=vocab_size, input_sentence_size=300_000,
                                           shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
                                           minloglevel=2, **options)
    jsonl = out / "tokenizer-sample.jsonl"
    if not jsonl.exists():
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[::4]), encoding="utf-8")
    models["train_tokenizer"] = train_tokenizer([jsonl], out / f"own-{vocab_size}", vocab_size=vocab_size,
                                                progress=False)
    return models


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its processes); fails loudly."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def bench(corpus: Path, models: dict[str, Path], megatron_lm: Path, megatron_python: str, workers: int,
          repeat: int, out: Path) -> bool:
    megabytes = corpus.stat().st_size / 1e6
    documents = sum(1 for _ in corpus.open("rb"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(megatron_lm), os.environ.get("PYTHONPATH", "")])}
    print(f"{corpus.name}: {megabytes:.1f} MB, {documents:,} documents, {workers} workers each, "
          f"{os.cpu_count()} cores, median of {repeat}; wall includes start-up; CPU = all processes of the tool")
    all_identical = True
    for name, model in models.items():
        flags = ["--input", str(corpus), "--json-keys", "text", "--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", str(model), "--append-eod", "--workers", str(workers)]
        commands = {"Megatron-LM": [megatron_python, str(megatron_lm / "tools" / "preprocess_data.py"), *flags,
                                    "--output-prefix", str(out / "megatron"), "--log-interval", "100000000"],
                    "megatron_code": [sys.executable, str(TOOL), *flags, "--output-prefix", str(out / "ours"),
                                      "--quiet"]}
        runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool in commands}
        for _ in range(repeat):
            for tool, command in commands.items():  # interleaved, so that noise hits both alike
                runs[tool].append(timed(command, env if tool == "Megatron-LM" else dict(os.environ), out))
        identical = all(Path(f"{out}/ours_text_document.{ext}").read_bytes()
                        == Path(f"{out}/megatron_text_document.{ext}").read_bytes() for ext in ("bin", "idx"))
        all_identical &= identical
        print(f"\n{name} ({model.name})")
        medians = {}
        for tool, times in runs.items():
            wall, cpu = (sorted(x)[len(x) // 2] for x in zip(*times))
            medians[tool] = wall, cpu
            print(f"  {tool:14s} wall {wall:7.2f} s  CPU {cpu:7.2f} s  {megabytes / wall:6.2f} MB/s  "
                  f"(walls: {', '.join(f'{w:.2f}' for w, _ in times)})")
        (their_wall, their_cpu), (our_wall, our_cpu) = medians["Megatron-LM"], medians["megatron_code"]
        print(f"  speed-up {their_wall / our_wall:.2f}x wall, {their_cpu / our_cpu:.2f}x CPU; "
              f".bin/.idx byte-identical: {identical}")
    return all_identical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-lm", type=Path, default=os.environ.get("MEGATRON_LM_DIR"),
                        help="Megatron-LM checkout (default: $MEGATRON_LM_DIR)")
    parser.add_argument("--megatron-python", default=os.environ.get("MEGATRON_LM_PYTHON", sys.executable),
                        help="interpreter for Megatron-LM's tool (default: $MEGATRON_LM_PYTHON, else this one)")
    parser.add_argument("--megabytes", type=float, default=55, help="corpus size")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="run only these tokenizers (names as printed)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench_preprocess"))
    args = parser.parse_args(argv)
    if args.megatron_lm is None or not (args.megatron_lm / "tools" / "preprocess_data.py").is_file():
        parser.error("--megatron-lm (or $MEGATRON_LM_DIR) must name a Megatron-LM checkout")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.out_dir / f"corpus-{args.megabytes:g}MB.jsonl", args.megabytes)
    models = {name: path for name, path in build_tokenizers(corpus, args.out_dir, args.vocab_size).items()
              if not args.only or name in args.only}
    return 0 if bench(corpus, models, args.megatron_lm.resolve(), args.megatron_python, args.workers, args.repeat,
                      args.out_dir.resolve()) else 1


if __name__ == "__main__":
    sys.exit(main())
