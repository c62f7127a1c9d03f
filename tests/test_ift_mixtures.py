"""Zhang et al.'s instruction sets from ShareGPT records written by hand in ShareGPT's own format:
conversations classified as code or not, equal-size sets counted in conversations, nested across
shares, readable by tools/preprocess_sft.py."""
import json

import pytest

from megatron_code.data.errors import DataError
from megatron_code.data.ift_mixtures import main

FENCE = "```"


def conversation(cid, question, answer, *more):
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": cid, "conversations": turns + [{"from": f, "value": v} for f, v in more]}


RECORDS = [
    conversation("t1", "Who wrote Hamlet?", "William Shakespeare."),
    conversation("t2", "Capital of Peru?", "Lima."),
    conversation("t3", "Translate 'cat' to French.", "chat", ("human", "And dog?"), ("gpt", "chien")),
    conversation("t4", "Is 7 prime?", "Yes: its only divisors are 1 and 7."),
    conversation("t5", "Name a prime above 10.", "11."),
    conversation("t6", "What is 12 x 12?", "144."),
    # code in the question only: the rule looks at the answers
    conversation("t7", f"What does this print?\n{FENCE}python\nprint(1)\n{FENCE}", "It prints 1."),
    conversation("c1", "Reverse a list in Python.", f"Use slicing:\n{FENCE}python\nxs[::-1]\n{FENCE}"),
    conversation("c2", "Sum in Rust?", f"{FENCE}rust\nv.iter().sum::<i32>()\n{FENCE}"),
    conversation("c3", "Hello world in C", "Here:", ("human", "full file?"),
                 ("gpt", f"  {FENCE}c\nint main(){{puts(\"hi\");}}\n  {FENCE}")),
    conversation("c4", "SQL for all rows?", f"{FENCE}sql\nSELECT * FROM t;\n{FENCE}"),
    conversation("x1", "An empty answer follows", ""),  # left out: empty response
    {"id": "x2", "conversations": [{"from": "human", "value": "no answer at all"}]},  # left out: no response
]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_equal_size_sets_by_conversation_count(tmp_path, tiny_corpus, capsys):
    source = tmp_path / "sharegpt.json"
    source.write_text(json.dumps(RECORDS))  # ShareGPT dumps are one JSON list
    assert main(["--input", str(source), "--out-dir", str(tmp_path / "sets"), "--shares", "0", "0.5", "1"]) == 0
    sets = {n: read(tmp_path / "sets" / f"code_{n}.jsonl") for n in (0, 50, 100)}
    # 7 text and 4 code conversations: 4 is the largest size the 100% set can fill
    assert {n: len(s) for n, s in sets.items()} == {0: 4, 50: 4, 100: 4}
    assert {n: sum(r["code"] for r in s) for n, s in sets.items()} == {0: 0, 50: 2, 100: 4}
    ids = {n: {r["id"] for r in s} for n, s in sets.items()}
    assert ids[100] == {"c1", "c2", "c3", "c4"} and ids[0] <= {f"t{i}" for i in range(1, 8)}
    # nested: the 50% set's code is among the 100% set's, its text among the 0% set's
    assert {i for i in ids[50] if i.startswith("c")} <= ids[100] and {i for i in ids[50] if i.startswith("t")} <= ids[0]
    c3 = next(r for r in sets[100] if r["id"] == "c3")
    assert [m["role"] for m in c3["messages"]] == ["user", "assistant", "user", "assistant"]
    summary = json.loads((tmp_path / "sets" / "mixtures.json").read_text())
    assert (summary["conversations"], summary["code"], summary["text"], summary["left_out_no_response"]) == (11, 4, 7, 2)
    assert summary["sets"]["code_50.jsonl"]["ids"] == [r["id"] for r in sets[50]]

    # the sets are instruction data as tools/preprocess_sft.py reads it
    from megatron_code.data.sft import preprocess_sft
    report = preprocess_sft(tmp_path / "sets" / "code_50.jsonl", tmp_path / "code_50", tiny_corpus.tokenizer,
                            progress=False)
    assert report["examples"] == 4

    # a fixed size, and labels that override the rule (here: t7 counts as code)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"id": "t7", "code": True}) + "\n")
    main(["--input", str(source), "--out-dir", str(tmp_path / "labelled"), "--shares", "0", "1", "--size", "5",
          "--labels", str(labels)])
    assert "t7" in {r["id"] for r in read(tmp_path / "labelled" / "code_100.jsonl")}
    with pytest.raises(DataError, match=r"--size 6 at 100% code needs 6 code and 0 text conversations; the input has 4 "
                                        r"code and 7 text \(at most --size 4 fits every share\)"):
        main(["--input", str(source), "--out-dir", str(tmp_path / "big"), "--shares", "0", "1", "--size", "6"])
    assert not (tmp_path / "big").exists()


def test_sets_smaller_than_the_pools_are_nested(tmp_path):
    """From 30 code and 30 text conversations, sets of 12 at 25/50/75/100% code: each set's code
    conversations are among the next set's, and its text among the previous set's."""
    records = [conversation(f"c{i}", f"Write function {i}.", f"{FENCE}python\ndef f{i}(): return {i}\n{FENCE}")
               for i in range(30)] + [conversation(f"t{i}", f"What is {i} + 1?", str(i + 1)) for i in range(30)]
    source = tmp_path / "sharegpt.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    main(["--input", str(source), "--out-dir", str(tmp_path / "sets"), "--shares", "0.25", "0.5", "0.75", "1",
          "--size", "12"])
    sets = [read(tmp_path / "sets" / f"code_{n}.jsonl") for n in (25, 50, 75, 100)]
    code = [{r["id"] for r in s if r["code"]} for s in sets]
    text = [{r["id"] for r in s if not r["code"]} for s in sets]
    assert [len(c) for c in code] == [3, 6, 9, 12] and all(len(s) == 12 for s in sets)
    assert all(a < b for a, b in zip(code, code[1:])) and all(a > b for a, b in zip(text, text[1:]))


def test_a_malformed_record_is_named(tmp_path):
    source = tmp_path / "sharegpt.jsonl"
    source.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"id": "bad", "conversations": [{"from": "robot",
                                                                                                  "value": "hi"}]}))
    with pytest.raises(DataError, match=rf"{source}:2: conversations\[0\] must be {{from: human\|"):
        main(["--input", str(source), "--out-dir", str(tmp_path / "out")])
