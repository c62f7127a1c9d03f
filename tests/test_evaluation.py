"""Evaluation: pass@1 of reference solutions (the sandbox itself: tests/test_sandbox.py), the
synthetic tasks, BLEU against sacrebleu, the bootstrap against scipy, our multiple-choice scorer
against lm-evaluation-harness on the exported model, chat-template prompts against the ids tools/preprocess_sft.py writes, in-training task scores,
and tools/evaluate.py end to end."""
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_code.evaluation.code import code_tokens, reply_code, sentence_bleu, truncate_completion
from megatron_code.evaluation.lm import load_language_model
from megatron_code.evaluation.multiple_choice import score_multiple_choice
from megatron_code.evaluation.results import (TaskScores, bootstrap_difference, bootstrap_interval, compare,
                                               write_results)
from megatron_code.evaluation.sandbox import Limits, run_python
from megatron_code.evaluation.score import score_tasks
from megatron_code.data.synthetic import EVAL_SIZES, GENERATORS, generate, split_of
from megatron_code.evaluation.tasks import TaskError, load_task

TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
LIMITS = Limits(seconds=1.5, memory_mb=256, output_bytes=4096, file_bytes=1 << 16)


def subset(path: Path, n: int, folder: Path) -> Path:
    """The first `n` items of a task file, under the same name in `folder`."""
    out = folder / path.name
    out.write_text("".join(path.read_text().splitlines(True)[:n]))
    return out


def test_generators_are_deterministic_and_keep_eval_out_of_train():
    for task in GENERATORS:
        eval_items = generate(task, EVAL_SIZES[task], 0, "eval")
        assert [i.to_json() for i in eval_items] == [i.to_json() for i in generate(task, EVAL_SIZES[task], 0, "eval")]
        assert all(split_of(i.id) == "eval" for i in eval_items)
        eval_keys = {i.id for i in eval_items}
        eval_texts = {getattr(i, "question", None) or i.prompt for i in eval_items}
        for seed in range(3):
            train = generate(task, 250, seed, "train")
            assert not eval_keys & {i.id for i in train}
            assert not eval_texts & {getattr(i, "question", None) or i.prompt for i in train}
    with pytest.raises(ValueError, match="fewer than"):
        generate("python_functions", 500, 0, "eval")


def test_data_never_imports_evaluation():
    """The item types and their generators live in data/synthetic.py, which evaluation imports
    downward: no module under megatron_code/data imports megatron_code.evaluation."""
    import ast

    import megatron_code.data

    upward = []
    for path in sorted(Path(megatron_code.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            upward += [f"{path.name} imports {name}" for name in names if name.startswith("megatron_code.evaluation")]
    assert not upward, upward


def test_reference_solutions_pass_and_options_are_sound(eval_task_dir):
    code = load_task(eval_task_dir / "python_functions.jsonl")
    assert code.kind == "code" and len(code.items) == EVAL_SIZES["python_functions"]
    results = [run_python(item.prompt + item.reference, "\n".join(item.tests), LIMITS) for item in code.items]
    assert [r.status for r in results] == ["passed"] * len(results)
    wrong = [run_python(item.prompt + "    return None\n", "\n".join(item.tests), LIMITS) for item in code.items[:5]]
    assert not any(r.passed for r in wrong)
    for name in ("arithmetic", "logic"):
        task = load_task(eval_task_dir / f"{name}.jsonl")
        assert all(len(set(i.options)) == len(i.options) >= 2 for i in task.items)
        positions = {(len(i.options), i.answer) for i in task.items}  # the answer is not always in one place
        assert positions == {(k, j) for k in {len(i.options) for i in task.items} for j in range(k)}


def test_task_files_name_their_problems(tmp_path):
    cases = {
        '{"question": "Q", "options": ["a", "b"], "answer": 2}': ":1: 'answer' must be the 0-based index",
        '{"question": "Q", "options": ["a"], "answer": 0}': "at least two choices",
        '{"prompt": "def f():", "tests": []}': "'tests' must be a non-empty list",
        '{"text": "x"}': "neither a multiple-choice item",
        "not json": ":1: not JSON",
    }
    for line, message in cases.items():
        path = tmp_path / "t.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(TaskError, match=message):
            load_task(path)
    path.write_text('{"question": "Q", "options": ["a", "b"], "answer": 0}\n{"prompt": "p", "tests": ["assert 1"]}\n')
    with pytest.raises(TaskError, match="mixes multiple-choice and code items"):
        load_task(path)


def test_mbpp_files_become_code_tasks(tmp_path):
    from megatron_code.evaluation.tasks import convert_mbpp

    record = {"task_id": 7, "text": "Write a function that returns the larger of two numbers.",
              "code": "def larger(a, b):\r\n    return a if a > b else b",
              "test_list": ["assert larger(1, 2) == 2", "assert larger(5, 3) == 5"], "test_setup_code": ""}
    (tmp_path / "mbpp.jsonl").write_text(json.dumps(record) + "\n")
    task = load_task(convert_mbpp(tmp_path / "mbpp.jsonl", tmp_path / "out" / "mbpp.jsonl"))
    (item,) = task.items
    assert task.kind == "code" and item.id == "7" and "larger(1, 2) == 2" in item.prompt
    assert run_python(item.prompt + item.reference, "\n".join(item.tests), LIMITS).passed
    assert not run_python(item.prompt + "def larger(a, b):\n    return a\n", "\n".join(item.tests), LIMITS).passed


def test_bleu_matches_sacrebleu():
    import sacrebleu  # installed with lm-eval (the dev extras)

    rng = np.random.default_rng(0)
    vocab = "def f ( x ) : return x + 1 * y if else".split()
    for _ in range(500):
        hyp = list(rng.choice(vocab, rng.integers(0, 15)))
        ref = list(rng.choice(vocab, rng.integers(1, 15)))
        theirs = sacrebleu.sentence_bleu(" ".join(hyp), [" ".join(ref)], tokenize="none").score
        assert sentence_bleu(hyp, ref) == pytest.approx(theirs / 100, abs=1e-11)  # 0-1, as every score here
    assert code_tokens("return a+b  # sum") == ["return", "a", "+", "b", "#", "sum"]
    assert truncate_completion("    return x\n\ndef g():\n    pass\nprint(g())\n") == "    return x\n\ndef g():\n    pass\n"


def test_chat_replies_yield_their_code():
    prompt = 'def add(a, b):\n    """Return a + b."""\n'
    assert reply_code(prompt + "    return a + b\n", prompt) == "    return a + b\n"  # the prompt repeated
    assert reply_code("    return a + b\n", prompt) == "    return a + b\n"
    fenced = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    assert reply_code(fenced, prompt) == "def add(a, b):\n    return a + b\n"
    assert run_python(prompt + reply_code(fenced, prompt), TESTS, LIMITS).passed  # the later def wins
    assert reply_code("```\nx = 1\n", prompt) == "x = 1\n"  # a block the reply never closed


def _chat_reference(tokenizer_path, template: str, conversations: list[tuple[str, str]], folder: Path):
    """(prompt ids, reply ids) of each (user, assistant) pair as tools/preprocess_sft.py writes it:
    the ids before the loss, and those carrying it."""
    from megatron_code.data.sft import preprocess_sft, read_sft

    folder.mkdir()
    path = folder / f"{template}.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in conversations))
    data = read_sft(preprocess_sft(path, folder / template, tokenizer_path, template=template, progress=False)["prefix"])
    out = []
    for d in range(len(data)):
        tokens, mask = np.split(data.document(d).astype(np.int64), 2)  # the ids, then the loss mask
        out.append((tokens[:np.flatnonzero(mask)[0]].tolist(), tokens[mask == 1].tolist()))
    return out


def test_the_scorers_feed_a_chat_template_as_instruction_data_encodes_it(trained_run, exported, eval_task_dir,
                                                                         tiny_corpus, tmp_path):
    """For each kind of template: the ids multiple choice scores (question as the user turn, the
    option and end of turn as the continuation) and the ids code generation starts from equal what
    data/sft.py writes for the same conversation. A transformers folder with its own template gets
    it by `auto`; spelling our layout, it scores as our checkpoint does with role tokens."""
    folder = tmp_path / "hf_chat"
    shutil.copytree(exported, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["split_special_tokens"] = False  # the template's role strings are the special tokens
    config["chat_template"] = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    choice = load_task(subset(eval_task_dir / "arithmetic.jsonl", 6, tmp_path))
    code = load_task(subset(eval_task_dir / "python_functions.jsonl", 2, tmp_path))
    pairs = [(item.question, option) for item in choice.items for option in item.options]
    checkpoint = load_language_model(trained_run)
    scored = {}
    for name, model, template, tokenizer in (("role_tokens", checkpoint, "role_tokens", tiny_corpus.tokenizer),
                                             ("text", checkpoint, "text", tiny_corpus.tokenizer),
                                             ("hf", load_language_model(folder), "auto", folder)):
        rows, prompts = [], []

        def sample_losses(tokens, labels, mask, model=model, rows=rows):
            for t, l, m in zip(tokens.tolist(), labels.tolist(), mask.bool().tolist()):
                n = max(i for i, on in enumerate(m) if on) + 1
                reply = [x for x, on in zip(l, m) if on]
                rows.append(((t[:n] + [l[n - 1]])[:-len(reply)], reply))
            return model.sample_losses(tokens, labels, mask)

        def generate(batch, max_new_tokens, finished, model=model, prompts=prompts):
            prompts.extend(batch)
            return model.generate(batch, max_new_tokens, finished)
        recording = replace(model, sample_losses=sample_losses, generate=generate)
        scores, record = score_tasks(recording, [choice, code], template, max_new_tokens=4, log=lambda line: None)
        assert record["prompt_format"] == f"chat:{name}" and [s.prompt_format for s in scores] == [f"chat:{name}"] * 2
        assert sorted(rows) == sorted(_chat_reference(tokenizer, name, pairs, tmp_path / name))
        assert prompts == [p for p, _ in _chat_reference(tokenizer, name, [(i.prompt, "x") for i in code.items],
                                                         tmp_path / f"{name}_code")]
        scored[name] = scores[0].per_item
    assert scored["hf"] == scored["role_tokens"]  # the export through its template: the checkpoint's answers


def test_bootstrap_matches_scipy():
    from scipy import stats as scipy_stats  # installed with lm-eval (the dev extras)

    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.4).astype(float)
    b = np.where(rng.random(300) < 0.8, a, 1 - a)  # paired: mostly the same items right
    diff, low, high = bootstrap_difference(list(a), list(b), paired=True, resamples=4000)
    reference = scipy_stats.bootstrap((b, a), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True,
                                      n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert diff == pytest.approx(b.mean() - a.mean())
    assert low == pytest.approx(reference.low, abs=0.01) and high == pytest.approx(reference.high, abs=0.01)
    assert bootstrap_difference([1.0, 0.0] * 50, [1.0, 0.0] * 50, paired=True) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_of_one_arm_matches_scipy():
    from scipy import stats as scipy_stats

    values = (np.random.default_rng(2).random(200) < 0.3).astype(float)
    mean, low, high = bootstrap_interval(list(values), resamples=4000)
    reference = scipy_stats.bootstrap((values,), np.mean, n_resamples=4000, method="percentile",
                                      random_state=0).confidence_interval
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(reference.low, abs=0.01) and high == pytest.approx(reference.high, abs=0.01)


def test_one_score_scale_and_old_results_files_compare_on_it(tmp_path, evaluate_tool, capsys):
    """Every score is stored and tabled from 0 to 1; a file written when our BLEU was 0-100 (no
    `score_scale`) compares correctly against a new one, and the table says so; a file of an
    unknown scale is refused with one line."""
    ids = [str(i) for i in range(30)]
    bleu = np.random.default_rng(3).uniform(0, 1, 30).tolist()
    passed = [float(i % 3 == 0) for i in range(30)]
    new = write_results(tmp_path / "new.json", "runs/b/checkpoints/step_0000010", 10,
                        [TaskScores.from_items("python_functions", "code", ids, {"pass@1": passed, "bleu": bleu})])
    stored = json.loads(new.read_text())
    assert stored["score_scale"] == "0-1"
    assert {r["metric"]: r["value"] for r in stored["results"]}["bleu"] == pytest.approx(np.mean(bleu))
    old = {**stored, "model": "runs/a/checkpoints/step_0000010"}
    del old["score_scale"]
    old["results"] = [{**r, "value": r["value"] * (100 if r["metric"] == "bleu" else 1)} for r in stored["results"]]
    old["items"] = {"python_functions": {"ids": ids, "values": {"pass@1": passed, "bleu": [100 * v for v in bleu]}}}
    (tmp_path / "old.json").write_text(json.dumps(old))

    table = compare([tmp_path / "old.json", new]).splitlines()
    row = next(line for line in table if line.startswith("| python_functions | bleu |"))
    cells = row.split(" | ")
    assert cells[4:6] == [f"{np.mean(bleu):.4f}"] * 2  # the old file's 0-100 BLEU read as the new file's 0-1
    assert [float(x) for x in re.findall(r"[+-]\d+\.\d+", cells[6])] == [0.0, 0.0, 0.0]  # difference, 95% CI
    assert "Scores are fractions from 0 to 1 (accuracies, pass@1, and BLEU divided by 100)." in table
    assert any(line.startswith(f"Note: {tmp_path / 'old.json'} was written with BLEU from 0 to 100") for line in table)
    assert not any(str(new) in line for line in table if line.startswith("Note:"))

    (tmp_path / "odd.json").write_text(json.dumps({**stored, "score_scale": "0-100"}))
    assert evaluate_tool.main(["compare", str(new), str(tmp_path / "odd.json")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'odd.json'}: scores on scale '0-100'; this version reads '0-1' (and files written "
        "before the scale was recorded)"]


def test_our_scorer_agrees_with_lm_eval(trained_run, exported, eval_task_dir, tmp_path):
    """Raw prompts: what `auto` gives a model that was not instruction-tuned."""
    from megatron_code.evaluation.harness import run_lm_eval

    task = load_task(subset(eval_task_dir / "logic.jsonl", 60, tmp_path))
    ours = load_language_model(trained_run)  # our checkpoint and model, not the export
    (scores,), record = score_tasks(ours, [task], "auto", batch_size=8, log=lambda line: None)
    assert record == {"prompt_format": "raw"} and scores.prompt_format == "raw"
    (theirs,), output = run_lm_eval(exported, [task], batch_size=8)
    assert theirs.ids == scores.ids and theirs.n == 60
    for metric in ("acc", "acc_norm"):
        assert theirs.per_item[metric] == scores.per_item[metric], metric
    from megatron_code.evaluation.multiple_choice import _requests, option_log_likelihoods
    lls, _ = option_log_likelihoods(_requests(task, ours.tokenizer, ours.max_length), ours.sample_losses, 8, "cpu")
    lm_eval_lls = [resp[0] for s in sorted(output["samples"]["local_logic"], key=lambda s: s["doc_id"])
                   for resp in s["filtered_resps"]]
    assert np.abs(np.array(lls) - np.array(lm_eval_lls)).max() < 1e-4
    hf_model = load_language_model(exported)  # the same scorer on the export: the same answers
    on_export = score_multiple_choice(task, hf_model.sample_losses, hf_model.tokenizer, hf_model.max_length)
    assert on_export.per_item == scores.per_item


def test_generation_is_our_models_greedy_decoding(trained_run, tiny_corpus, tmp_path):
    """Batched generation (on the transformers twin, with its KV cache; or by recomputation for a
    model no transformers class expresses) gives our GPT's own one-prompt greedy tokens."""
    from megatron_code.config import PRESETS, Config, ModelConfig
    from megatron_code.evaluation.lm import gpt_next_logits, greedy
    from megatron_code.model import GPT
    from megatron_code.training.weights import load_model, write_weights_only

    torch.manual_seed(0)
    mixed = Config(model=ModelConfig(**{**PRESETS["tiny"], "vocab_size": 1024, "activation": "gelu", "init_std": 0.3}))
    mixed.data.tokenizer = str(tiny_corpus.tokenizer)
    write_weights_only(tmp_path / "mixed", GPT(mixed.model).state_dict(), mixed)
    for run in (trained_run, tmp_path / "mixed"):
        model = load_language_model(run)
        prompts = [model.tokenizer.encode(t) for t in ("def f(x):\n    return", "The quick brown fox", "import os\n\n")]
        ours, _ = load_model(run)
        alone = [greedy(gpt_next_logits(ours, 1024), [p], 12, model.max_length)[0] for p in prompts]
        assert model.generate(prompts, 12, lambda ids: False) == alone
        stop = alone[1][4]  # rows finish at different steps; each is cut where it finished
        assert model.generate(prompts, 12, lambda ids: ids[-1] == stop) == [
            ids[:ids.index(stop) + 1] if stop in ids else ids for ids in alone]


def test_training_logs_task_scores(trained_run):
    """Training scores through its evaluation forward (the training loss); the offline scorer on
    the final checkpoint, over the tokenizer's 1024 ids as in an export, gives the logged numbers:
    the embedding's padding rows (to 1100) take no probability in either."""
    from megatron_code.training.weights import read_checkpoint

    lines = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    logged = {line["step"]: line for line in lines if "task/arithmetic_50/acc" in line}
    assert sorted(logged) == [8, 16]
    weights = read_checkpoint(trained_run)  # the final checkpoint: the weights of the last validation
    assert weights.state["embedding.weight"].shape[0] == 1100 and weights.config.model.tokenizer_vocab_size == 1024
    model = load_language_model(trained_run)
    with torch.no_grad():
        offline = score_multiple_choice(load_task(trained_run / "arithmetic_50.jsonl"), model.sample_losses,
                                        model.tokenizer, 64, batch_size=4)
    for metric in ("acc", "acc_norm", "acc_ppl"):
        assert logged[16][f"task/arithmetic_50/{metric}"] == pytest.approx(offline.metrics[metric])


def test_eval_tasks_are_checked_at_start_up(tiny_corpus, tiny_indexed, eval_task_dir, tmp_path):
    from megatron_code.config import load_config
    from megatron_code.training.trainer import Trainer

    def config(task):
        return load_config(None, base={"data": {"sources": [{"name": "text", "prefix": tiny_indexed["text"]}],
                                                "tokenizer": str(tiny_corpus.tokenizer)},
                                       "model": {"preset": "tiny", "max_seq_len": 256},
                                       "train": {"eval_tasks": [str(task)], "output_dir": str(tmp_path)}})
    with pytest.raises(TaskError, match=r"train.eval_tasks: task file .*nope.jsonl does not exist"):
        Trainer(config(tmp_path / "nope.jsonl"))
    with pytest.raises(TaskError, match="is a code task; only multiple-choice"):
        Trainer(config(eval_task_dir / "python_functions.jsonl"))


def test_evaluate_tool_end_to_end(evaluate_tool, trained_run, exported, eval_task_dir, tmp_path, capsys):
    evaluate = evaluate_tool
    assert evaluate.main(["--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("arithmetic", "logiqa", "sciq", "arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "mbpp"):
        assert name in listing
    assert "needs a download" in listing or "cached locally" in listing

    tasks = [subset(eval_task_dir / "logic.jsonl", 50, tmp_path), subset(eval_task_dir / "python_functions.jsonl", 3, tmp_path)]
    assert evaluate.main(["run", "--model", str(trained_run), "--tasks", *map(str, tasks), "--max-new-tokens", "6"]) == 0
    results = json.loads((trained_run / "eval" / "step_0000016.json").read_text())
    assert results["step"] == 16 and results["model"].endswith("step_0000016")
    rows = {(r["task"], r["metric"]): r for r in results["results"]}
    assert set(rows) == {("logic", "acc"), ("logic", "acc_norm"), ("logic", "acc_ppl"),
                         ("python_functions", "pass@1"), ("python_functions", "bleu")}
    assert rows[("logic", "acc")]["n"] == 50 and rows[("python_functions", "pass@1")]["n"] == 3
    assert len(results["samples"]["python_functions"]) == 3 and results["sandbox"]["limits"]["seconds"] == 5.0

    assert results["prompt_format"] == "raw"  # auto: the model was not instruction-tuned
    assert {r["prompt_format"] for r in results["results"]} == {"raw"}

    out = tmp_path / "export.json"
    assert evaluate.main(["run", "--model", str(exported), "--tasks", str(tasks[0]), "--out", str(out)]) == 0
    capsys.readouterr()
    assert evaluate.main(["compare", str(trained_run), str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| task | metric | n | prompt |") and "[95% CI]" in table[0]
    logic_acc = next(line for line in table if line.startswith("| logic | acc |"))
    assert "| raw |" in logic_acc and "+0.0000 [+0.0000, +0.0000]" in logic_acc  # the export scores as the checkpoint
    assert not any(line.startswith("Note:") for line in table)
    chat = tmp_path / "chat.json"  # a template forced on the pretrained model: the table says the formats differ
    assert evaluate.main(["run", "--model", str(trained_run), "--tasks", str(tasks[0]), "--out", str(chat),
                          "--chat-template", "role_tokens"]) == 0
    capsys.readouterr()
    assert evaluate.main(["compare", str(out), str(chat)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "| raw / chat:role_tokens |" in next(line for line in table if line.startswith("| logic | acc |"))
    assert "Note: on 3 of 3 rows the arms were fed different prompt formats" in table[-1]
    assert evaluate.main(["run", "--model", str(trained_run), "--tasks", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err
