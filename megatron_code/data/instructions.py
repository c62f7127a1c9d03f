"""Instruction sets the project makes itself, offline and deterministically, for tests and the
mini-study: natural-language (text) instructions and code instructions, written as Alpaca-style
JSONL (`instruction`, `output`, plus `family` and `id`) for tools/preprocess_sft.py.

Text families:
  prose_qa      a paragraph of the prose corpus (Python's documentation) and one of its
                sentences with a word blanked; the answer is that word, read off the passage.
  arithmetic    the evaluation generator's arithmetic items (sums, differences, products,
                two-step expressions, word problems), its answer computed by the generator.
  logic         its logic items (syllogisms, conditionals, boolean expressions, orderings),
                answers checked by construction.
  digit_sums    one narrow format a tiny model learns in seconds: the sum of two digits,
                asked in five phrasings (500 distinct questions).
Code families:
  python_functions  the evaluation generator's "write a function that ..." items: the function's
                    description and first assert as the instruction, signature + reference body
                    as the response (the asserts are computed from that reference).
  stdlib_functions  short documented top-level functions of Python's standard library: "write a
                    function <signature> that <its docstring's first paragraph>", answered by its
                    real source.

arithmetic, logic and python_functions come from `megatron_code.data.synthetic` with
`split="train"`: that module sends every problem (keyed by what it asks, not its wording) to
exactly one of its splits, so no instruction asks an evaluation item, whatever the seeds.

    python -m megatron_code.data.instructions --out runs/sft/text.jsonl \
        --count prose_qa=400 arithmetic=400 logic=200 --prose runs/quickstart/corpus/text.jsonl
"""
from __future__ import annotations

import argparse
import ast
import random
import sys
import re
import sysconfig
import textwrap
from collections.abc import Callable
from pathlib import Path

from megatron_code.cli import user_errors
from megatron_code.data.corpus import iter_jsonl, write_jsonl
from megatron_code.data.errors import DataError
from megatron_code.data.synthetic import generate

TEXT_FAMILIES = ("prose_qa", "arithmetic", "logic", "digit_sums")
CODE_FAMILIES = ("python_functions", "stdlib_functions")
DIGIT_SUM_FORMS = ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.",
                   "What do you get when you add {b} to {a}?", "What is the sum of {a} and {b}?")
_STOPWORDS = frozenset("that this with from have will which when then than there their these those been were "
                       "what into only also such more most each other some same used uses using returns return "
                       "value values should would could must does done".split())


def _record(family: str, key: str, instruction: str, output: str) -> dict:
    return {"instruction": instruction, "output": output, "family": family, "id": f"{family}:{key}"}


def _choice_answer(item) -> tuple[str, str]:
    """(question, answer) of a synthetic multiple-choice item, without its "Question:" frame."""
    question = item.question.removeprefix("Question: ").removesuffix("\nAnswer:")
    return question, item.options[item.answer]


def _synthetic(task: str, n: int, seed: int) -> list:
    return generate(task, n, seed, split="train")


def arithmetic(n: int, seed: int, prose=None) -> list[dict]:
    return [_record("arithmetic", item.id, *_choice_answer(item)) for item in _synthetic("arithmetic", n, seed)]


def logic(n: int, seed: int, prose=None) -> list[dict]:
    return [_record("logic", item.id, *_choice_answer(item)) for item in _synthetic("logic", n, seed)]


def python_functions(n: int, seed: int, prose=None) -> list[dict]:
    out = []
    for item in _synthetic("python_functions", n, seed):
        function = ast.parse(item.prompt + "    pass\n").body[0]
        signature = f"{function.name}({ast.unparse(function.args)})"
        instruction = (f"Write a Python function `{signature}`. {ast.get_docstring(function)}\n"
                       f"It must pass: {item.tests[0]}")
        out.append(_record("python_functions", item.id, instruction, item.prompt + item.reference))
    return out


def digit_sums(n: int, seed: int, prose=None) -> list[dict]:
    combos = [(f, a, b) for f in range(len(DIGIT_SUM_FORMS)) for a in range(10) for b in range(10)]
    if n > len(combos):
        raise DataError(f"digit_sums: asked for {n} questions, the format has {len(combos)}")
    return [_record("digit_sums", f"{f}:{a}+{b}", DIGIT_SUM_FORMS[f].format(a=a, b=b), str(a + b))
            for f, a, b in random.Random(f"digit_sums:{seed}").sample(combos, n)]


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if 6 <= len(s.split()) <= 30]


def prose_qa(n: int, seed: int, prose: Path | None = None) -> list[dict]:
    """Cloze questions on paragraphs of the prose corpus (JSONL with a "text" key): one per
    sentence of 6 to 30 words that has a content word to blank."""
    if prose is None:
        raise DataError("prose_qa needs the prose corpus (a JSONL file with a 'text' key)")
    rng = random.Random(f"prose_qa:{seed}")
    candidates = []
    for line_no, text in iter_jsonl(Path(prose)):
        for p, block in enumerate(re.split(r"\n\s*\n", text)):
            paragraph = " ".join(block.split())
            if not 150 <= len(paragraph) <= 450 or ">>>" in paragraph:
                continue
            for s, sentence in enumerate(_sentences(paragraph)):
                words = [w for w in dict.fromkeys(re.findall(r"\b[a-z]{4,12}\b", sentence)) if w not in _STOPWORDS]
                if words:
                    candidates.append((f"{line_no}.{p}.{s}", paragraph, sentence, rng.choice(words)))
    if n > len(candidates):
        raise DataError(f"prose_qa: the prose corpus {prose} gives {len(candidates)} questions, {n} were asked for")
    out = []
    for key, paragraph, sentence, word in rng.sample(candidates, n):
        blanked = re.sub(rf"\b{word}\b", "____", sentence, count=1)
        out.append(_record("prose_qa", key, "Read the passage and give the missing word.\n\n"
                           f"Passage: {paragraph}\n\nSentence: {blanked}", word))
    return out


def stdlib_functions(n: int, seed: int, prose=None) -> list[dict]:
    """Short documented top-level functions of the standard library, from its files in a seeded
    order (parsing stops once n are found)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(f"stdlib_functions:{seed}")
    out = []
    for path in rng.sample(sorted(root.glob("*.py")), len(list(root.glob("*.py")))):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            lines = node.end_lineno - node.lineno if doc else 0
            if not doc or node.name.startswith("_") or node.decorator_list or not 3 <= lines < 25:
                continue
            summary = " ".join(doc.split("\n\n")[0].split())
            code = textwrap.dedent(ast.get_source_segment(source, node))
            if len(summary) < 20 or len(code) > 1200 or ">>>" in summary:
                continue
            signature = f"{node.name}({ast.unparse(node.args)})"
            out.append(_record("stdlib_functions", f"{path.stem}.{node.name}",
                               f"Write a Python function `{signature}`: {summary}", code + "\n"))
            if len(out) == n:
                return out
    raise DataError(f"stdlib_functions: asked for {n}, the standard library has {len(out)} that fit")


FAMILIES: dict[str, Callable[..., list[dict]]] = {
    "prose_qa": prose_qa, "arithmetic": arithmetic, "logic": logic, "digit_sums": digit_sums,
    "python_functions": python_functions, "stdlib_functions": stdlib_functions,
}


def make_instructions(counts: dict[str, int], seed: int, prose: Path | None = None) -> list[dict]:
    """`counts[family]` examples of each family, shuffled together (seeded)."""
    unknown = sorted(set(counts) - set(FAMILIES))
    if unknown:
        raise DataError(f"unknown instruction family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    records = [r for family, n in counts.items() if n for r in FAMILIES[family](n, seed, prose)]
    random.Random(f"shuffle:{seed}").shuffle(records)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_code.data.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSONL to write")
    parser.add_argument("--count", nargs="+", required=True, metavar="FAMILY=N", help="examples per family")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prose", type=Path, help="prose corpus JSONL (for prose_qa)")
    args = parser.parse_args(argv)
    try:
        counts = {family: int(n) for family, _, n in (c.partition("=") for c in args.count)}
        records = make_instructions(counts, args.seed, args.prose)
    except ValueError as e:  # DataError, or a count that is not a number
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_jsonl(args.out, records)
    print(f"{args.out}: " + ", ".join(f"{n} {family}" for family, n in counts.items()))
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
