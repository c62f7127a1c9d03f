"""Reasoning items the project writes itself: arithmetic and logic multiple choice, and tiny
Python functions with asserts; and the two item types every task file holds (ChoiceItem,
CodeItem; evaluation/tasks.py reads and writes them). Deterministic, offline, and made for two
users: the evaluation task files (`evaluation.tasks.write_builtin_tasks`) and instruction-tuning
data (data/instructions.py), which must never contain an evaluation item. Both import this
module; it imports neither.

How disjointness is kept: every item's id is a key naming what it asks, independent of wording
details that do not change the problem (the expression with commutative operands sorted; the
function family and its constants, not its name or test inputs). `split_of(key)` sends one key in
eight to "eval" and the rest to "train" by a hash, and every generator keeps only the items of
the split it is asked for. So the two sets are disjoint for any seeds either side uses; seeds
only choose which items of a split are drawn.

    from megatron_code.data.synthetic import generate
    items = generate("arithmetic", n=1000, seed=7, split="train")   # for instruction data
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    question: str
    options: tuple[str, ...]
    answer: int
    family: str = ""
    """The generator form that made it, if any."""

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "options": list(self.options), "answer": self.answer,
                **({"family": self.family} if self.family else {})}


@dataclass(frozen=True)
class CodeItem:
    id: str
    prompt: str
    tests: tuple[str, ...]
    reference: str
    family: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "tests": list(self.tests), "reference": self.reference,
                **({"family": self.family} if self.family else {})}


SPLITS = ("eval", "train")
EVAL_SHARE = 8
"""One key in EVAL_SHARE belongs to the eval split."""
_GIVE_UP_AFTER = 5_000
"""Draws in a row without a new item after which a split counts as exhausted."""


def split_of(key: str) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "little") % EVAL_SHARE == 0 else "train"


def _mc(key: str, question: str, correct: str, distractors: list[str], family: str,
        rng: random.Random) -> ChoiceItem:
    """An item asked as "Question: ...\nAnswer:", each option following after a space."""
    options = [correct] + [d for i, d in enumerate(distractors) if d != correct and d not in distractors[:i]]
    rng.shuffle(options)
    return ChoiceItem(key, f"Question: {question}\nAnswer:", tuple(options), options.index(correct), family)


# ------------------------------------------------------------------------------------- arithmetic


def _number_distractors(value: int, rng: random.Random) -> list[str]:
    near = [value + d for d in (-10, -2, -1, 1, 2, 10)] + [int(str(abs(value))[::-1]) * (1 if value >= 0 else -1)]
    picks = rng.sample([v for v in near if v != value], 3)
    return [str(v) for v in picks]


def _arithmetic(rng: random.Random) -> ChoiceItem:
    kind = rng.choice(["add", "sub", "mul", "two_step", "word"])
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
    if kind == "add":
        question, value, key = f"What is {a} + {b}?", a + b, f"{min(a, b)}+{max(a, b)}"
    elif kind == "sub":
        a, b = max(a, b) + c, min(a, b)
        question, value, key = f"What is {a} - {b}?", a - b, f"{a}-{b}"
    elif kind == "mul":
        question, value, key = f"What is {a} * {c}?", a * c, f"{min(a, c)}*{max(a, c)}"
    elif kind == "two_step":
        question, value, key = f"What is ({a} + {b}) * {c}?", (a + b) * c, f"({min(a, b)}+{max(a, b)})*{c}"
    else:
        name, thing = rng.choice(["Ana", "Ben", "Chen", "Dara", "Eli"]), rng.choice(["apples", "coins", "books", "pens"])
        give = rng.randint(1, a - 1)
        question = (f"{name} has {a} {thing}, gives away {give} and then gets {b} more. "
                    f"How many {thing} does {name} have now?")
        value, key = a - give + b, f"{a}-{give}+{b}"
    return _mc(f"arithmetic:{key}", question, str(value), _number_distractors(value, rng), kind, rng)


# ------------------------------------------------------------------------------------------ logic

_WORDS = ["wugs", "daxes", "blickets", "feps", "tovs", "zorbs", "glims", "snarps", "trobs", "mips", "kelts", "vorns"]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Juno"]


def _syllogism(rng: random.Random) -> ChoiceItem:
    x, y, z = rng.sample(_WORDS, 3)
    valid = rng.random() < 0.5
    if valid:  # Barbara: all X are Y, all Y are Z => all X are Z
        premises, form = f"All {x} are {y}. All {y} are {z}.", "barbara"
    else:  # undistributed middle: all X are Y, all Z are Y =/=> all X are Z
        premises, form = f"All {x} are {y}. All {z} are {y}.", "middle"
    question = f"{premises} Does it follow that all {x} are {z}?"
    return _mc(f"syllogism:{form}:{x}:{y}:{z}", question, "yes" if valid else "no", ["no" if valid else "yes"],
               "syllogism", rng)


def _conditional(rng: random.Random) -> ChoiceItem:
    name = rng.choice(_NAMES)
    p, q = rng.sample(["it rains", "the bell rings", "the lamp is on", "the door is open", "the dog barks",
                       "the road is wet", "the alarm sounds"], 2)
    form = rng.choice(["modus_ponens", "modus_tollens", "affirm_consequent", "deny_antecedent"])
    fact, conclusion, follows = {
        "modus_ponens": (f"{p}", f"{q}", True),
        "modus_tollens": (f"it is not true that {q}", f"it is not true that {p}", True),
        "affirm_consequent": (f"{q}", f"{p}", False),
        "deny_antecedent": (f"it is not true that {p}", f"it is not true that {q}", False),
    }[form]
    question = f"{name} knows: if {p}, then {q}. Also, {fact}. Does it follow that {conclusion}?"
    return _mc(f"conditional:{form}:{p}:{q}", question, "yes" if follows else "no", ["no" if follows else "yes"],
               "conditional", rng)


def _boolean(rng: random.Random) -> ChoiceItem:
    def expr(depth: int) -> tuple[str, bool]:
        """(text, value) of a random expression over True/False with and/or/not."""
        if depth == 0:
            value = rng.random() < 0.5
            return str(value), value
        op = rng.choice(["and", "or", "not"])
        left, a = expr(depth - 1)
        if op == "not":
            return f"not {left}", not a
        right, b = expr(depth - 1)
        return f"({left} {op} {right})", (a and b) if op == "and" else (a or b)
    text, value = expr(rng.randint(2, 3))
    return _mc(f"boolean:{text}", f"What is the value of the expression {text}?", str(value), [str(not value)],
               "boolean", rng)


def _ordering(rng: random.Random) -> ChoiceItem:
    people = rng.sample(_NAMES, 3)  # in decreasing height
    facts = [f"{people[0]} is taller than {people[1]}.", f"{people[1]} is taller than {people[2]}."]
    rng.shuffle(facts)
    ask_tallest = rng.random() < 0.5
    correct = people[0] if ask_tallest else people[2]
    question = " ".join(facts) + f" Who is the {'tallest' if ask_tallest else 'shortest'}?"
    return _mc(f"ordering:{'>'.join(people)}:{ask_tallest}", question, correct,
               [p for p in people if p != correct], "ordering", rng)


def _logic(rng: random.Random) -> ChoiceItem:
    return rng.choice([_syllogism, _conditional, _boolean, _ordering])(rng)


# ----------------------------------------------------------------------------- python functions


def _ints(rng):
    return [(rng.randint(-20, 99),) for _ in range(3)]


def _naturals(rng):
    return [(rng.randint(0, 12),) for _ in range(3)]


def _int_lists(rng):
    return [([rng.randint(-9, 30) for _ in range(rng.randint(1, 6))],) for _ in range(3)]


_LETTERS = "abcdeiloprstu"


def _words(rng):
    return [("".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 8))),) for _ in range(3)]


def _sentences(rng):
    vocab = ["the", "cat", "sat", "on", "a", "mat", "code", "runs", "fast", "data", "helps", "models"]
    return [(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))),) for _ in range(3)]


def _pairs(rng):
    return [(rng.randint(1, 60), rng.randint(1, 60)) for _ in range(3)]


# (family, name template, parameters, docstring, body, argument generator). {k} is an integer
# from 2 to 20 and {c} a letter, drawn per item; both are part of the item's key, so a family
# without them is wholly in one split.
_FUNCTIONS: list[tuple[str, str, str, str, str, Callable]] = [
    ("add_k", "add_{k}", "x", "Return x plus {k}.", "return x + {k}", _ints),
    ("subtract_k", "subtract_{k}", "x", "Return x minus {k}.", "return x - {k}", _ints),
    ("times_k", "times_{k}", "x", "Return x multiplied by {k}.", "return x * {k}", _ints),
    ("power_k", "power_{k}", "x", "Return x to the power {k}.", "return x ** {k}", _naturals),
    ("mod_k", "mod_{k}", "x", "Return the remainder of x divided by {k} (between 0 and {k} - 1).",
     "return x % {k}", _ints),
    ("round_down_k", "round_down_to_{k}", "x", "Return the largest multiple of {k} that is not above x.",
     "return x // {k} * {k}", _ints),
    ("distance_k", "distance_to_{k}", "x", "Return the distance between x and {k}.", "return abs(x - {k})", _ints),
    ("divisible_by_k", "is_divisible_by_{k}", "x", "Return True if x is divisible by {k}.",
     "return x % {k} == 0", _ints),
    ("clamp_k", "clamp_to_{k}", "x", "Return x limited to the range from -{k} to {k}.",
     "return max(-{k}, min({k}, x))", _ints),
    ("multiples_below", "multiples_of_{k}", "n", "Return the positive multiples of {k} below n, ascending.",
     "return list(range({k}, n, {k}))", _naturals),
    ("repeat_k", "repeat_{k}", "s", "Return s repeated {k} times.", "return s * {k}", _words),
    ("pad_k", "pad_to_{k}", "s", "Return s padded on the right with '*' to at least {k} characters.",
     "return s.ljust({k}, '*')", _words),
    ("greater_than_k", "greater_than_{k}", "xs", "Return the elements of xs greater than {k}, in order.",
     "return [x for x in xs if x > {k}]", _int_lists),
    ("count_greater_k", "count_above_{k}", "xs", "Return how many elements of xs are greater than {k}.",
     "return sum(1 for x in xs if x > {k})", _int_lists),
    ("multiples_in_list", "multiples_of_{k}_in", "xs", "Return the elements of xs divisible by {k}, in order.",
     "return [x for x in xs if x % {k} == 0]", _int_lists),
    ("first_k", "first_{k}", "xs", "Return the first {k} elements of xs (all of them if there are fewer).",
     "return xs[:{k}]", _int_lists),
    ("last_k", "last_{k}", "xs", "Return the last {k} elements of xs (all of them if there are fewer).",
     "return xs[-{k}:]", _int_lists),
    ("count_letter", "count_{c}", "s", "Return how many times the letter '{c}' occurs in s.",
     "return s.count('{c}')", _words),
    ("starts_with", "starts_with_{c}", "s", "Return True if s starts with the letter '{c}'.",
     "return s.startswith('{c}')", _words),
    ("ends_with", "ends_with_{c}", "s", "Return True if s ends with the letter '{c}'.",
     "return s.endswith('{c}')", _words),
    ("remove_letter", "remove_{c}", "s", "Return s with every letter '{c}' removed.", "return s.replace('{c}', '')",
     _words),
    ("find_letter", "find_{c}", "s", "Return the index of the first '{c}' in s, or -1 if there is none.",
     "return s.find('{c}')", _words),
    ("sum_list", "total", "xs", "Return the sum of the numbers in xs.", "return sum(xs)", _int_lists),
    ("max_list", "largest", "xs", "Return the largest number in xs.", "return max(xs)", _int_lists),
    ("min_list", "smallest", "xs", "Return the smallest number in xs.", "return min(xs)", _int_lists),
    ("reverse", "reverse", "s", "Return s reversed.", "return s[::-1]", _words),
    ("palindrome", "is_palindrome", "s", "Return True if s reads the same backwards.", "return s == s[::-1]", _words),
    ("factorial", "factorial", "n", "Return n factorial.",
     "result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result", _naturals),
    ("fibonacci", "fibonacci", "n", "Return the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.",
     "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a", _naturals),
    ("sum_squares", "sum_of_squares", "n", "Return 1*1 + 2*2 + ... + n*n.",
     "return sum(i * i for i in range(1, n + 1))", _naturals),
    ("count_vowels", "count_vowels", "s", "Return the number of vowels (a, e, i, o, u) in s.",
     "return sum(1 for ch in s if ch in 'aeiou')", _words),
    ("gcd", "gcd", "a, b", "Return the greatest common divisor of a and b.",
     "while b:\n        a, b = b, a % b\n    return a", _pairs),
    ("sum_digits", "digit_sum", "n", "Return the sum of the decimal digits of n.",
     "return sum(int(d) for d in str(n))", _naturals),
    ("dedupe", "unique", "xs", "Return xs without repeated elements, keeping first occurrences in order.",
     "seen = []\n    for x in xs:\n        if x not in seen:\n            seen.append(x)\n    return seen", _int_lists),
    ("argmax", "index_of_max", "xs", "Return the index of the first largest element of xs.",
     "return xs.index(max(xs))", _int_lists),
    ("running_sum", "running_sum", "xs", "Return the list of running totals of xs.",
     "out, total = [], 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out", _int_lists),
    ("count_words", "count_words", "s", "Return the number of space-separated words in s.",
     "return len(s.split())", _sentences),
    ("capitalize", "capitalize_words", "s", "Return s with the first letter of every word in upper case.",
     "return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))", _sentences),
    ("longest_word", "longest_word", "s", "Return the first longest word of s.", "return max(s.split(), key=len)",
     _sentences),
    ("is_sorted", "is_sorted", "xs", "Return True if xs is in non-decreasing order.",
     "return all(a <= b for a, b in zip(xs, xs[1:]))", _int_lists),
    ("triangle", "triangle_number", "n", "Return the n-th triangle number, 1 + 2 + ... + n.",
     "return n * (n + 1) // 2", _naturals),
    ("swap_case", "swap_case", "s", "Return s with lower-case letters made upper-case and the reverse.",
     "return s.swapcase()", _words),
]


def _python_function(rng: random.Random) -> CodeItem:
    family, name, params, doc, body, arguments = rng.choice(_FUNCTIONS)
    fill = {"k": rng.randint(2, 20), "c": rng.choice(_LETTERS)}
    used = {f: v for f, v in fill.items() if "{" + f + "}" in name + doc + body}
    name, doc, body = (t.format(**fill) for t in (name, doc, body))
    prompt = f'def {name}({params}):\n    """{doc}"""\n'
    reference = f"    {body}\n"
    namespace: dict = {}
    exec(prompt + reference, namespace)  # our own reference: computes the expected outputs
    tests = tuple(f"assert {name}({', '.join(map(repr, args))}) == {namespace[name](*args)!r}"
                  for args in arguments(rng))
    key = f"python:{family}:" + ",".join(f"{f}={v}" for f, v in sorted(used.items()))
    return CodeItem(key, prompt, tests, reference, family)


GENERATORS: dict[str, Callable[[random.Random], ChoiceItem | CodeItem]] = {
    "arithmetic": _arithmetic,
    "logic": _logic,
    "python_functions": _python_function,
}
"""Task name -> a function drawing one item (of either split) from a random generator."""


def generate(task: str, n: int, seed: int, split: str) -> list[ChoiceItem | CodeItem]:
    """`n` distinct items of `task` from `split`, the same for the same arguments. Raises when
    the split holds fewer than `n` distinct items."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_distinct(GENERATORS[task], n, random.Random(f"{task}:{seed}"), split, task))


def _distinct(draw: Callable, n: int, rng: random.Random, split: str, task: str) -> Iterator:
    seen: set[str] = set()
    misses = 0
    while len(seen) < n and misses < _GIVE_UP_AFTER:
        item = draw(rng)
        if item.id in seen or split_of(item.id) != split:
            misses += 1
            continue
        misses = 0
        seen.add(item.id)
        yield item
    if len(seen) < n:
        raise ValueError(f"{task}: the {split} split has fewer than {n} distinct items ({len(seen)} found)")


EVAL_SIZES = {"arithmetic": 200, "logic": 200, "python_functions": 40}
"""How many items the shipped evaluation files hold."""
EVAL_SEED = 0
