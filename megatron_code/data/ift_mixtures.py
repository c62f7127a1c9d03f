"""Instruction sets of one size and several code shares, built from ShareGPT-style conversations
the way Zhang et al. (AAAI 2025) build theirs: each conversation is classified as code or not,
and every set holds the same number of conversations, a given share of them code. Shares are
counted in conversations, as the paper counts them.

    python -m megatron_code.data.ift_mixtures --input sharegpt.json --out-dir runs/sft/zhang --shares 0 0.5 1

Input: a JSON list, or JSONL, of ShareGPT records {"id", "conversations": [{"from", "value"}]}
("from": human, user, gpt, chatgpt, bing, assistant or system), or of records already holding
{"messages": [...]} (megatron_code/data/chat.py). A conversation without a non-empty assistant
turn is left out and counted. Output per share s: `code_<100 s>.jsonl` of {"id", "code",
"messages"} records for tools/preprocess_sft.py, and `mixtures.json` with the counts, the rule,
the seed and each set's ids.

Classification: the paper asks ChatGPT which conversations are code. Offline, ours calls a
conversation code when an assistant turn holds a fenced code block (a line starting with ```),
which is how ShareGPT's answers show code; `--labels FILE` (JSONL of {"id", "code": true|false})
overrides it per conversation, e.g. with the paper's labels or a model's.

Sampling: each class is shuffled once (seeded); the set of share s takes the first round(s N)
code conversations and the first N - round(s N) text conversations, so the sets are nested (the
50% set's code is among the 100% set's) and differ only by what the share changes. N is --size,
or by default the largest size every share can fill.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from megatron_code.cli import user_errors
from megatron_code.data.chat import to_messages
from megatron_code.data.corpus import write_jsonl
from megatron_code.data.errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "assistant": "assistant", "system": "system"}
_FENCE = re.compile(r"^\s*```", re.M)
RULE = "an assistant turn holds a fenced code block (a line starting with ```)"


def _records(path: Path):
    """(where, record) of a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
        yield from ((f"{path} record {i}", r) for i, r in enumerate(records))
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not JSON ({e.msg})") from None


def _messages(record, where: str) -> list[dict[str, str]] | None:
    """The conversation of a ShareGPT record (or a {messages} one), checked by chat.to_messages;
    None for a ShareGPT conversation with no assistant turn or an empty one (dumps hold many)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: each record must be a JSON object")
    if "conversations" not in record:
        return to_messages(record, where)
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{i}] must be {{from: {'|'.join(SHAREGPT_ROLES)}, value: string}}, "
                            f"got {json.dumps(turn)[:80]}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    responses = [m["content"] for m in messages if m["role"] == "assistant"]
    if not responses or not all(r.strip() for r in responses):
        return None
    return to_messages({"messages": messages}, where)


def read_conversations(path: str | Path) -> tuple[list[dict], int]:
    """({id, messages} of every usable conversation, how many were left out for want of a response)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path} does not exist")
    out, skipped, seen = [], 0, set()
    for where, record in _records(path):
        messages = _messages(record, where)
        if messages is None:
            skipped += 1
            continue
        conversation_id = str(record.get("id", where))
        if conversation_id in seen:
            raise DataError(f"{where}: id {conversation_id!r} appears twice")
        seen.add(conversation_id)
        out.append({"id": conversation_id, "messages": messages})
    return out, skipped


def is_code(messages: list[dict[str, str]]) -> bool:
    return any(m["role"] == "assistant" and _FENCE.search(m["content"]) for m in messages)


def read_labels(path: str | Path) -> dict[str, bool]:
    labels = {}
    for where, record in _records(Path(path)):
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("code"), bool):
            raise DataError(f"{where}: a label is {{\"id\": ..., \"code\": true|false}}")
        labels[str(record["id"])] = record["code"]
    return labels


def largest_size(n_text: int, n_code: int, shares: list[float]) -> int:
    """The largest N every share s can fill: round(s N) code and N - round(s N) text conversations."""
    def fits(n: int) -> bool:
        return all(round(s * n) <= n_code and n - round(s * n) <= n_text for s in shares)
    n = n_text + n_code
    while n > 0 and not fits(n):
        n -= 1
    return n


def build_mixtures(conversations: list[dict], shares: list[float], size: int | None, seed: int,
                   labels: dict[str, bool] | None = None) -> dict[float, list[dict]]:
    """Share -> the set's records ({id, code, messages}), in a seeded order."""
    labels = labels or {}
    coded = [{"id": c["id"], "code": labels.get(c["id"], is_code(c["messages"])), "messages": c["messages"]}
             for c in conversations]
    code = [c for c in coded if c["code"]]
    text = [c for c in coded if not c["code"]]
    rng = random.Random(seed)
    rng.shuffle(code)
    rng.shuffle(text)
    n = largest_size(len(text), len(code), shares) if size is None else size
    if n <= 0:
        raise DataError(f"no set can be built: {len(text):,} text and {len(code):,} code conversations for shares "
                        f"{shares}")
    out = {}
    for s in shares:
        k = round(s * n)
        if k > len(code) or n - k > len(text):
            raise DataError(f"--size {n:,} at {s:.0%} code needs {k:,} code and {n - k:,} text conversations; the "
                            f"input has {len(code):,} code and {len(text):,} text "
                            f"(at most --size {largest_size(len(text), len(code), shares):,} fits every share)")
        chosen = code[:k] + text[:n - k]
        random.Random(f"{seed}/{s}").shuffle(chosen)
        out[s] = chosen
    return out


def set_name(share: float) -> str:
    percent = share * 100
    return f"code_{percent:g}" if percent != int(percent) else f"code_{int(percent)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_code.data.ift_mixtures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="ShareGPT JSON list or JSONL")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--shares", nargs="+", type=float, default=[0.0, 0.5, 1.0],
                        help="code shares, one set each (default: the paper's 0 0.5 1)")
    parser.add_argument("--size", type=int, help="conversations per set (default: the largest every share fills)")
    parser.add_argument("--labels", type=Path, help="JSONL of {id, code: true|false} overriding the rule")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if any(not 0 <= s <= 1 for s in args.shares):
        parser.error(f"--shares must lie in [0, 1], got {args.shares}")
    if args.size is not None and args.size <= 0:
        parser.error(f"--size must be positive, got {args.size}")
    conversations, skipped = read_conversations(args.input)
    labels = read_labels(args.labels) if args.labels else {}
    applied = len(set(labels) & {c["id"] for c in conversations})
    if labels and not applied:
        raise DataError(f"--labels {args.labels}: none of its {len(labels):,} ids is among the conversations of "
                        f"{args.input}")
    if labels:
        print(f"--labels: {applied:,} of {len(conversations):,} conversations labelled, the rest by the rule")
    sets = build_mixtures(conversations, args.shares, args.size, args.seed, labels)
    n_code = sum(labels.get(c["id"], is_code(c["messages"])) for c in conversations)
    summary = {"input": str(args.input), "conversations": len(conversations), "left_out_no_response": skipped,
               "code": n_code, "text": len(conversations) - n_code, "rule": f"--labels {args.labels}, else {RULE}"
               if labels else RULE, "seed": args.seed, "size": len(next(iter(sets.values()))), "sets": {}}
    for share, records in sets.items():
        path = write_jsonl(args.out_dir / f"{set_name(share)}.jsonl", records)
        summary["sets"][path.name] = {"share": share, "code": sum(r["code"] for r in records),
                                      "conversations": len(records), "ids": [r["id"] for r in records]}
        print(f"{path}: {len(records):,} conversations, {sum(r['code'] for r in records):,} code")
    tmp = args.out_dir / ".mixtures.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(args.out_dir / "mixtures.json")
    print(f"{len(conversations):,} usable conversations ({n_code:,} code by {summary['rule']}), {skipped:,} left out "
          f"with no response; {args.out_dir / 'mixtures.json'} lists each set's ids")
    return 0


if __name__ == "__main__":
    with user_errors(DataError):
        raise SystemExit(main())
