"""The papers' evaluation sets converted from hand-written items in the formats their authors
release (C-Eval CSV, JEC-QA JSONL, ScienceQA problems.json, E-KAR JSON, CosQA JSON, HumanEval
JSONL), through `tools/evaluate.py make-tasks`: each item's question, options and answer as the
original file states them, the items our evaluators cannot score left out and counted, and a
record missing a field stopped with its file and line."""
import json

import pytest

from megatron_code.evaluation.paper_sets import convert_paper_set
from megatron_code.evaluation.sandbox import Limits, run_python
from megatron_code.evaluation.tasks import TaskError, load_task

LIMITS = Limits(seconds=1.5, memory_mb=256, output_bytes=4096, file_bytes=1 << 16)

CEVAL_LOGIC = '''id,question,A,B,C,D,answer,explanation
0,"所有的鸟都会飞，企鹅是鸟，所以企鹅会飞。以下哪项最能指出上述推理的错误？",前提为假,偷换概念,以偏概全,循环论证,A,"1. 前提""所有的鸟都会飞""为假。"
1,甲、乙、丙三人中只有一人说真话，以下哪项为真？,甲说真话,乙说真话,"丙说真话, 且甲说假话",无法确定,C,
'''
JEC_QA = [
    {"answer": ["B"], "id": "3_2613", "option_list": {"A": "甲构成盗窃罪", "B": "甲构成诈骗罪", "C": "甲构成侵占罪",
                                                      "D": "甲不构成犯罪"}, "statement": "甲冒充乙的朋友骗取财物，甲的行为如何定性？",
     "type": "1"},
    {"answer": ["A", "C"], "id": "1_204", "option_list": {"A": "合同成立", "B": "合同无效", "C": "合同生效",
                                                         "D": "合同可撤销"}, "statement": "关于该合同，下列说法正确的是？",
     "type": "0"},
]
SCIENCEQA = {
    "5": {"question": "Which tense does the sentence use?", "choices": ["past tense", "present tense", "future tense"],
          "answer": 2, "hint": "Mona will print her name with care.", "image": None, "task": "closed choice",
          "grade": "grade6", "subject": "language science", "topic": "verbs", "category": "Verb tense",
          "skill": "Is the sentence in the past, present, or future tense?", "lecture": "...", "solution": "...",
          "split": "test"},
    "6": {"question": "Which country is highlighted?", "choices": ["Tonga", "Fiji"], "answer": 0, "hint": "",
          "image": "image.png", "task": "closed choice", "grade": "grade5", "subject": "social science",
          "topic": "geography", "category": "Oceania: geography", "skill": "Identify countries of Oceania",
          "lecture": "", "solution": "", "split": "test"},
    "7": {"question": "What is the mass of a pencil?", "choices": ["10 grams", "10 kilograms"], "answer": 0,
          "hint": "", "image": None, "task": "closed choice", "grade": "grade3", "subject": "natural science",
          "topic": "units", "category": "Units and measurement", "skill": "Choose metric units of mass",
          "lecture": "", "solution": "", "split": "train"},
    "8": {"question": "Which word would you find on a dictionary page with the guide words pad - plow?",
          "choices": ["pen", "purple"], "answer": 0, "hint": "", "image": None, "task": "closed choice",
          "grade": "grade2", "subject": "language science", "topic": "word-study", "category": "Use guide words",
          "skill": "Use guide words", "lecture": "", "solution": "", "split": "test"},
}
E_KAR = [
    {"id": "ekar-zh-1", "question": "白天：黑夜", "choices": {"label": ["A", "B", "C", "D"],
                                                             "text": ["春天：夏天", "胜利：失败", "老师：学生", "水：冰"]},
     "answerKey": "B", "explanation": ["白天与黑夜是反义关系", "", "", "", ""], "relation": "矛盾"},
]
COSQA = [
    {"idx": "cosqa-train-0", "doc": "python remove first item of list", "code": "def pop_first(xs):\n    return xs[1:]",
     "code_tokens": "def pop_first ( xs ) : return xs [ 1 : ]", "docstring_tokens": "python remove first item of list",
     "label": 1},
    {"idx": "cosqa-train-1", "doc": "python read file into string", "code": "def area(r):\n    return 3.14 * r * r",
     "code_tokens": "def area ( r ) : return 3.14 * r * r", "docstring_tokens": "python read file into string",
     "label": 0},
]
HUMANEVAL = {
    "task_id": "HumanEval/0",
    "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              "    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than\n"
              "    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n    \"\"\"\n",
    "canonical_solution": "    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
                          "            if abs(a - b) < threshold:\n                return True\n    return False\n",
    "test": "\n\nMETADATA = {'author': 'jt', 'dataset': 'test'}\n\n\ndef check(candidate):\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n",
    "entry_point": "has_close_elements",
}

MBPP = {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character "
        "from the string.", "code": "def remove_Occ(s,ch): \r\n    return s.replace(ch, '', 1)[::-1].replace(ch, '', 1)[::-1]",
        "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"'],
        "test_setup_code": "", "challenge_test_list": []}


@pytest.fixture
def released_files(tmp_path):
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "logic_val.csv").write_text(CEVAL_LOGIC, encoding="utf-8")
    (folder / "jec_qa.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in JEC_QA) + "\n")
    (folder / "problems.json").write_text(json.dumps(SCIENCEQA))
    (folder / "ekar.jsonl").write_text(json.dumps(E_KAR[0], ensure_ascii=False) + "\n")
    (folder / "cosqa-train.json").write_text(json.dumps(COSQA, indent=2))
    (folder / "HumanEval.jsonl").write_text(json.dumps(HUMANEVAL) + "\n")
    (folder / "mbpp.jsonl").write_text(json.dumps(MBPP) + "\n")
    return folder


def choices(task):
    return [(item.id, item.question, list(item.options), item.answer) for item in task.items]


def test_make_tasks_converts_each_papers_set_as_released(evaluate_tool, released_files, tmp_path, capsys):
    out = tmp_path / "tasks"
    assert evaluate_tool.main(["make-tasks", "--out", str(out), "--logic", str(released_files / "logic_val.csv"),
                               "--jec-qa", str(released_files / "jec_qa.json"),
                               "--scienceqa", str(released_files / "problems.json"),
                               "--e-kar", str(released_files / "ekar.jsonl"),
                               "--cosqa", str(released_files / "cosqa-train.json"),
                               "--humaneval", str(released_files / "HumanEval.jsonl"),
                               "--mbpp", str(released_files / "mbpp.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'jec_qa.jsonl'}: 1 items; 1 left out (with several correct options)" in printed
    assert f"{out / 'scienceqa.jsonl'}: 2 items; 2 left out (with an image or of another split)" in printed
    assert f"{out / 'logic.jsonl'}: 2 items\n" in printed and f"{out / 'mbpp.jsonl'}: 1 items\n" in printed

    assert choices(load_task(out / "logic.jsonl")) == [
        ("0", "所有的鸟都会飞，企鹅是鸟，所以企鹅会飞。以下哪项最能指出上述推理的错误？\n答案：",
         ["前提为假", "偷换概念", "以偏概全", "循环论证"], 0),
        ("1", "甲、乙、丙三人中只有一人说真话，以下哪项为真？\n答案：", ["甲说真话", "乙说真话", "丙说真话, 且甲说假话", "无法确定"], 2)]
    assert choices(load_task(out / "jec_qa.jsonl")) == [
        ("3_2613", "甲冒充乙的朋友骗取财物，甲的行为如何定性？\n答案：", ["甲构成盗窃罪", "甲构成诈骗罪", "甲构成侵占罪", "甲不构成犯罪"], 1)]
    assert choices(load_task(out / "scienceqa.jsonl")) == [
        ("5", "Context: Mona will print her name with care.\nQuestion: Which tense does the sentence use?\nAnswer:",
         ["past tense", "present tense", "future tense"], 2),
        ("8", "Question: Which word would you find on a dictionary page with the guide words pad - plow?\nAnswer:",
         ["pen", "purple"], 0)]
    assert choices(load_task(out / "e_kar.jsonl")) == [
        ("ekar-zh-1", "类比：白天：黑夜\n答案：", ["春天：夏天", "胜利：失败", "老师：学生", "水：冰"], 1)]
    cosqa = choices(load_task(out / "cosqa.jsonl"))
    assert [(i, o, a) for i, _, o, a in cosqa] == [("cosqa-train-0", ["no", "yes"], 1), ("cosqa-train-1", ["no", "yes"], 0)]
    assert "python read file into string" in cosqa[1][1] and "return 3.14 * r * r" in cosqa[1][1]

    (item,) = load_task(out / "humaneval.jsonl").items
    assert item.id == "HumanEval/0" and item.prompt == HUMANEVAL["prompt"]
    assert run_python(item.prompt + item.reference, "\n".join(item.tests), LIMITS).passed
    (mbpp,) = load_task(out / "mbpp.jsonl").items
    assert run_python(mbpp.prompt + mbpp.reference, "\n".join(mbpp.tests), LIMITS).passed
    wrong = item.prompt + "    return False\n"  # fails the first assert of check(), which the tests must call
    assert not run_python(wrong, "\n".join(item.tests), LIMITS).passed


def test_a_record_of_the_wrong_set_stops_with_its_file_and_line(released_files, tmp_path):
    mixed = released_files / "jec_qa.json"
    mixed.write_text(json.dumps(JEC_QA[0], ensure_ascii=False) + "\n" + json.dumps(HUMANEVAL) + "\n")
    with pytest.raises(TaskError, match=r"jec_qa.json:2: missing statement, option_list, answer"):
        convert_paper_set("jec_qa", mixed, tmp_path)
    (released_files / "logic_val.csv").write_text(CEVAL_LOGIC.replace(',A,"1.', ',E,"1.'), encoding="utf-8")
    with pytest.raises(TaskError, match=r"logic_val.csv:2: answer 'E' is not one of the option letters A, B, C, D"):
        convert_paper_set("logic", released_files / "logic_val.csv", tmp_path)
    (released_files / "broken.jsonl").write_text(json.dumps(COSQA[0]) + "\n" + json.dumps(COSQA[1])[:-9] + "\n")
    with pytest.raises(TaskError, match=r"broken.jsonl:2: not JSON"):
        convert_paper_set("cosqa", released_files / "broken.jsonl", tmp_path)
    with pytest.raises(TaskError, match="evaluation set .*nope.json does not exist"):
        convert_paper_set("cosqa", released_files / "nope.json", tmp_path)
    assert not list(tmp_path.glob("*.jsonl"))  # nothing half-written
