"""Evaluate models on reasoning and code tasks, and compare experiment arms.

    python tools/evaluate.py --list                          # tasks, and which need a download
    python tools/evaluate.py make-tasks --out runs/eval_tasks [--scale 5] [--mbpp mbpp.jsonl] [--humaneval ...]
    python tools/evaluate.py run --model runs/code_arm       # a run/step dir of ours or an HF folder
    python tools/evaluate.py run --model runs/hf/code_arm --lm-eval local sciq
    python tools/evaluate.py compare runs/text_arm runs/code_arm

run scores JSONL tasks (megatron_code/evaluation/tasks.py; default: the built-in arithmetic,
logic and python_functions files, written under runs/eval_tasks when missing) with our
evaluators: multiple choice by option log-likelihood (acc, acc_norm, acc_ppl), code by greedy
completion (pass@1 in a sandbox, BLEU). `--chat-template` (default auto) feeds an
instruction-tuned model each prompt as a user turn of the chat template it was tuned with
(megatron_code/evaluation/score.py); other models get raw prompts. `--lm-eval` also runs
lm-evaluation-harness on a transformers folder, with raw prompts: `local` for our
multiple-choice files, or registered task names.
Results go to <run>/eval/step_N.json (a checkpoint) or <folder>/eval_results.json (an HF
folder), or --out, with the prompt format of every row. compare prints a markdown table of
arms by task with each arm's difference from the first and a 95% bootstrap confidence interval,
and says so where arms were fed different prompt formats.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_code.cli import add_debug_flag, user_error, user_errors

DEFAULT_TASK_DIR = Path("runs/eval_tasks")
PAPER_SETS = {  # megatron_code/evaluation/paper_sets.py: each file in the format its authors released
    "mbpp": "a local MBPP JSONL (text, code, test_list) to mbpp.jsonl",
    "humaneval": "HumanEval's JSONL (prompt, canonical_solution, test, entry_point)",
    "logic": "C-Eval's logic CSV (id, question, A-D, answer; Ma et al.'s logic task)",
    "jec_qa": "a JEC-QA JSONL (statement, option_list, answer)",
    "scienceqa": "ScienceQA's problems.json (its text-only test questions)",
    "e_kar": "an E-KAR JSON/JSONL (question, choices, answerKey)",
    "cosqa": "a CosQA JSON list (doc, code, label) as yes/no questions",
}


def _list() -> None:
    from megatron_code.evaluation.harness import HarnessUnavailable, registered_tasks
    from megatron_code.data.synthetic import EVAL_SIZES

    print("built-in tasks (offline; `make-tasks` writes them):")
    for name, size in EVAL_SIZES.items():
        path = DEFAULT_TASK_DIR / f"{name}.jsonl"
        print(f"  {name:18s} {size:4d} items  {path if path.is_file() else 'not written yet'}")
    print("lm-evaluation-harness tasks nearest to the papers:")
    try:
        for row in registered_tasks():
            need = "needs a download" if row["needs_download"] else "cached locally"
            print(f"  {row['task']:18s} {row['dataset']:32s} {need}" + (f"; {row['note']}" if row["note"] else ""))
    except HarnessUnavailable as e:
        print(f"  ({e})")


def _make_tasks(args) -> None:
    from megatron_code.evaluation.paper_sets import SKIPPED, convert_paper_set
    from megatron_code.evaluation.tasks import write_builtin_tasks

    for path in write_builtin_tasks(args.out, args.scale):
        print(path)
    for name in PAPER_SETS:
        if getattr(args, name):
            path, kept, left_out = convert_paper_set(name, getattr(args, name), args.out)
            print(f"{path}: {kept} items" + (f"; {left_out} left out ({SKIPPED[name]})" if left_out else ""))


def _default_out(model) -> Path:
    path = Path(model.path)
    if model.step is None:
        return path / "eval_results.json"
    return path.parent.parent / "eval" / f"{path.name}.json"  # <run>/checkpoints/step_N -> <run>/eval/step_N.json


def _run(args) -> None:
    from megatron_code.evaluation.lm import load_language_model
    from megatron_code.evaluation.results import write_results
    from megatron_code.evaluation.sandbox import Limits
    from megatron_code.evaluation.score import score_tasks
    from megatron_code.evaluation.tasks import MULTIPLE_CHOICE, load_task, write_builtin_tasks

    paths = args.tasks or write_builtin_tasks(DEFAULT_TASK_DIR)
    tasks = [load_task(p) for p in paths]  # every task file checked before the model loads
    model = load_language_model(args.model, args.device, tokenizer=args.tokenizer)
    limits = Limits(seconds=args.timeout, memory_mb=args.memory_mb)
    scores, record = score_tasks(model, tasks, args.chat_template, limits, args.max_new_tokens, args.batch_size,
                                 progress=True)
    if args.lm_eval:
        from megatron_code.evaluation.harness import run_lm_eval

        local = [t for t in tasks if t.kind == MULTIPLE_CHOICE] if "local" in args.lm_eval else []
        harness_scores, _ = run_lm_eval(args.model, local, [t for t in args.lm_eval if t != "local"],
                                        args.batch_size, args.device,
                                        confirm_run_unsafe_code=args.confirm_run_unsafe_code)
        for s in harness_scores:
            s.task = f"lm-eval/{s.task}"
            print(f"{s.task}: " + ", ".join(f"{m} {v:.4f}" for m, v in s.metrics.items()) + f" (n={s.n}, raw prompts)")
        scores += harness_scores
    out = write_results(args.out or _default_out(model), model.path, model.step, scores, record)
    print(f"results: {out}")


def main(argv: list[str] | None = None) -> int:
    from megatron_code.evaluation.score import CHAT_TEMPLATES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list tasks and which need a download")
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command")
    make = commands.add_parser("make-tasks", help="write the built-in task files")
    make.add_argument("--out", type=Path, default=DEFAULT_TASK_DIR)
    make.add_argument("--scale", type=int, default=1, help="multiply the default sizes")
    for name, help_text in PAPER_SETS.items():
        make.add_argument(f"--{name.replace('_', '-')}", metavar="FILE", help=f"also convert {help_text}")
    run = commands.add_parser("run", help="score one model")
    run.add_argument("--model", required=True, help="run/checkpoints/step directory of ours, or a transformers folder")
    run.add_argument("--tasks", nargs="+", help="JSONL task files (default: the built-in ones)")
    run.add_argument("--lm-eval", nargs="+", default=[], metavar="TASK",
                     help="also run lm-evaluation-harness: `local` (our multiple-choice files) and/or registered names")
    run.add_argument("--confirm-run-unsafe-code", action="store_true",
                     help="let lm-eval execute generated code for its code tasks (outside our sandbox)")
    run.add_argument("--out", help="results JSON (default: <run>/eval/step_N.json or <folder>/eval_results.json)")
    run.add_argument("--tokenizer", help="tokenizer file or folder, when a checkpoint's data.tokenizer moved")
    run.add_argument("--chat-template", default="auto", choices=CHAT_TEMPLATES,
                     help="prompts as user turns of a chat template. auto: a model tuned here gets the template "
                          "recorded with its instruction data, another its tokenizer folder's own; raw prompts "
                          "without one. none: raw prompts. (lm-eval always gets raw prompts)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-new-tokens", type=int, default=128, help="code generation length")
    run.add_argument("--timeout", type=float, default=5.0, help="seconds per code sample")
    run.add_argument("--memory-mb", type=int, default=512, help="address space per code sample")
    compare = commands.add_parser("compare", help="markdown table of arms with bootstrap intervals")
    compare.add_argument("arms", nargs="+", help="results files, or run/model directories holding them")
    compare.add_argument("--resamples", type=int, default=2000)
    for command in (make, run, compare):
        add_debug_flag(command)
    args = parser.parse_args(argv)
    if args.list:
        _list()
        return 0
    if args.command is None:
        parser.error("give --list or a command (make-tasks, run, compare)")
    from megatron_code.config import ConfigError
    from megatron_code.data.errors import DataError
    from megatron_code.evaluation.harness import HarnessUnavailable
    from megatron_code.evaluation.lm import is_hf_folder
    from megatron_code.evaluation.results import ResultsError
    from megatron_code.evaluation.sandbox import SandboxUnavailable
    from megatron_code.evaluation.tasks import TaskError
    from megatron_code.training.checkpoint import CheckpointError

    if args.command == "run" and args.lm_eval and not is_hf_folder(args.model):
        parser.error(f"--lm-eval needs a transformers folder; export {args.model} first (tools/convert_checkpoint.py)")
    try:
        if args.command == "make-tasks":
            _make_tasks(args)
        elif args.command == "run":
            _run(args)
        else:
            from megatron_code.evaluation.results import compare as compare_arms
            print(compare_arms(args.arms, args.resamples))
    except (TaskError, CheckpointError, DataError, ConfigError, SandboxUnavailable, HarnessUnavailable,
            ResultsError, FileNotFoundError) as e:
        return user_error(e)
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
