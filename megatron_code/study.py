"""The papers' arms, end to end, from one command:

    python -m megatron_code.study --name code_stage [--size default|ci] [--out DIR]

code_stage (Ma et al., ICLR 2024): pretrain NL (text only) and CODE (2:1 text:code) from the
recipes ma_nl.yaml and ma_code.yaml, and beside them ADAPTIVE (ours: CODE's sources with the
weights set online from the run's losses by Online Data Mixing, extensions/adaptive_code.yaml);
instruction-tune NN, NC, CC and CC with stepwise increasing
and decreasing code from sft/ma_sft_*.yaml (CC at the data's 5:3 text:code, one shuffle, as the released code tunes it); evaluate
every model on the offline tasks of megatron_code.evaluation (arithmetic and logic multiple
choice, Python functions by pass@1 and BLEU), the pretrained arms with raw prompts and the tuned
arms through the chat template of their instruction data; print one comparison table per prompt
format and write plots. The recipes are examples/recipes/ of the checkout, installed with the
package as `megatron_code.recipes`; they are shrunk by overrides (the model, sequence length,
steps, batch, learning rate); everything else is theirs.

Data, all made here with no network: the built-in text and code corpus and its tokenizer
(megatron_code.data.builtin, as for the quickstart), and instruction sets from
megatron_code.data.instructions (text: prose cloze, arithmetic, logic, digit sums; code: Python
functions, standard-library functions; 5:3 text:code by count).

Each stage reuses what an earlier run built from the same inputs: its marker records a digest of
each input (the config, the data and tokenizer, the checkpoint it starts from or evaluates), so
a changed pretraining arm has its tuned arms trained and every affected arm evaluated again; an
interrupted training run continues from its latest checkpoint. What would stop a later stage (its
imports, the device, the code sandbox, an arm's config) is checked before any work. `--size default`
takes about 11 minutes on 2 quiet CPU cores (up to 30 on a loaded machine), `--size ci` under a minute. The
numbers are tiny-scale: they show the pipeline runs, not what code data does to a large model.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.resources
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from megatron_code.cli import user_errors

RECIPES = "megatron_code.recipes"
"""The package the recipes install as (from examples/recipes)."""
PRETRAIN_ARMS = {"NL": "ma_nl", "CODE": "ma_code", "ADAPTIVE": "extensions/adaptive_code"}
TUNE_ARMS = {"NN": ("sft/ma_sft_nn", "NL"), "NC": ("sft/ma_sft_nc", "NL"), "CC": ("sft/ma_sft_cc", "CODE"),
             "CC_stepwise_increase": ("sft/ma_sft_cc_stepwise_increase", "CODE"),
             "CC_stepwise_decrease": ("sft/ma_sft_cc_stepwise_decrease", "CODE")}
"""Arm -> (recipe, the pretrained arm it starts from)."""


@dataclass(frozen=True)
class Size:
    max_bytes: int
    """Corpus cap per source."""
    vocab_size: int
    model: tuple[str, ...]
    """Overrides that shrink the recipes' model."""
    seq_length: int
    batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    sft_steps: int
    sft_lr: float
    text_instructions: dict = field(default_factory=dict)
    code_instructions: dict = field(default_factory=dict)
    eval_items: dict = field(default_factory=dict)
    """Task -> items: the first items of the shipped evaluation files."""
    max_new_tokens: int = 64
    """Generation length for code tasks (greedy, recomputing the window: the costliest part of
    evaluating a tiny model on CPU)."""


SIZES = {
    "ci": Size(256_000, 1024, ("--model.preset=tiny",), 128, 8, 12, 3e-3, 6, 1e-3,
               {"prose_qa": 40, "arithmetic": 30, "logic": 30, "digit_sums": 20},
               {"python_functions": 50, "stdlib_functions": 22},
               {"arithmetic": 16, "logic": 16, "python_functions": 2}, 16),
    "default": Size(2_000_000, 4096, ("--model.preset=tiny", "--model.hidden_size=128", "--model.num_layers=4",
                                       "--model.ffn_hidden_size=384"), 256, 8, 600, 2e-3, 200, 1e-3,
                    {"prose_qa": 400, "arithmetic": 400, "logic": 200, "digit_sums": 80},
                    {"python_functions": 350, "stdlib_functions": 300},
                    {"arithmetic": 200, "logic": 200, "python_functions": 20}, 64),
}
INSTRUCTION_SEED = 1
"""Seeds the instruction sets (the evaluation items come from the other split of the same
generators, whatever the seed)."""
STAGE_IMPORTS = {
    "data": ("megatron_code.data.builtin", "megatron_code.data.corpus", "megatron_code.data.tokenizer",
             "megatron_code.data.preprocess", "megatron_code.data.instructions", "megatron_code.data.sft",
             "megatron_code.data.synthetic", "megatron_code.evaluation.tasks"),
    "training": ("megatron_code.config", "megatron_code.training.trainer", "megatron_code.training.checkpoint",
                 "torch"),
    "evaluation": ("megatron_code.evaluation.lm", "megatron_code.evaluation.score", "megatron_code.evaluation.results",
                   "megatron_code.model.hf", "transformers:LlamaForCausalLM", "transformers:GPT2LMHeadModel",
                   "transformers:StoppingCriteriaList"),
    "report": ("megatron_code.training.plots", "megatron_code.training.run_summary", "matplotlib.pyplot"),
}
"""What each stage imports (`module:name` for a name a module loads lazily, as transformers does its
models), all imported at start-up: a missing or broken dependency stops the study before any work,
not after the training it would have thrown away."""


def _log(text: str) -> None:
    print(text, flush=True)


def recipe_file(name: str) -> Path:
    """A recipe by its name under examples/recipes (`sft/ma_sft_nn`), from the installed package."""
    try:
        folder = importlib.resources.files(RECIPES)
    except ModuleNotFoundError:
        raise SystemExit(f"error: the recipes are not installed ({RECIPES} is missing): reinstall megatron_code "
                         "(pip install . or pip install -e . from the checkout)") from None
    path = folder.joinpath(*f"{name}.yaml".split("/"))
    if not path.is_file():
        raise SystemExit(f"error: recipe {name}.yaml is missing from {folder}: reinstall megatron_code")
    return Path(str(path))


def check_stages(device: str) -> None:
    """What would stop a stage, checked before any work: every stage's imports (STAGE_IMPORTS), the
    device, and that generated code can run contained here (the evaluation's sandbox)."""
    for stage, needs in STAGE_IMPORTS.items():
        for need in needs:
            module, _, name = need.partition(":")
            try:
                loaded = importlib.import_module(module)
                if name:
                    getattr(loaded, name)
            except Exception as e:  # a broken install raises more than ImportError (version checks, shadowing)
                why = (str(e).splitlines() or [""])[0]
                raise SystemExit(f"error: the study's {stage} stage needs {need.replace(':', '.')}, which does not "
                                 f"import here ({type(e).__name__}: {why}); stopped before any work") from None
    from megatron_code.config import ConfigError
    from megatron_code.evaluation.sandbox import SandboxUnavailable, sandbox_features
    from megatron_code.parallel.distributed import pick_device

    try:
        pick_device(device)
        sandbox_features()
    except (ConfigError, SandboxUnavailable) as e:
        raise SystemExit(f"error: {e}; stopped before any work") from None


# --------------------------------------------------------------------------------- stage markers
# A stage is done when its marker records the digests of the inputs it was made from and they are
# still the inputs' digests now; a stage whose inputs changed is done again from scratch.


def content_digest(*paths: Path) -> str:
    """sha256 over the bytes of files, and of every file under a directory (by relative name)."""
    digest = hashlib.sha256()
    for path in paths:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
                with file.open("rb") as f:
                    digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def value_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def changed_inputs(recorded: dict | None, inputs: dict[str, str]) -> list[str]:
    """The inputs whose digests differ from the marker's (all of them without a marker)."""
    return [k for k in inputs if recorded is None or recorded["inputs"].get(k) != inputs[k]]


def write_marker(marker: Path, inputs: dict[str, str], done: bool) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"inputs": inputs, "done": done}, indent=1))
    tmp.replace(marker)


# ------------------------------------------------------------------------------------- data


def instruction_prefixes(out: Path) -> dict[str, str]:
    """Where build_instructions puts each instruction set's indexed files, known before it runs."""
    return {name: str(out / "instructions" / name) for name in ("text", "code")}


def build_instructions(out: Path, size: Size, tokenizer: Path, prose: Path) -> dict[str, str]:
    """text and code instruction JSONL and their indexed files (reused when current)."""
    from megatron_code.data.corpus import write_jsonl
    from megatron_code.data.instructions import make_instructions
    from megatron_code.data.sft import preprocess_sft
    from megatron_code.data.preprocess import dataset_is_current

    folder = out / "instructions"
    folder.mkdir(parents=True, exist_ok=True)
    prefixes = {}
    for name, counts in (("text", size.text_instructions), ("code", size.code_instructions)):
        path, marker = folder / f"{name}.jsonl", folder / f"{name}.stage.json"
        prefix = Path(instruction_prefixes(out)[name])
        inputs = {"generator": value_digest([counts, INSTRUCTION_SEED]), "prose": content_digest(prose)}
        if changed_inputs(read_marker(marker), inputs) or not path.is_file():
            write_jsonl(path, make_instructions(counts, INSTRUCTION_SEED, prose))
            write_marker(marker, inputs, done=True)
        if dataset_is_current(prefix, path, tokenizer):
            _log(f"instructions: {prefix}.{{bin,idx}} is up to date")
        else:
            preprocess_sft(path, prefix, tokenizer, max_length=size.seq_length + 1)
        prefixes[name] = str(prefix)
    return prefixes


def build_eval_tasks(out: Path, size: Size) -> list[Path]:
    """The first `size.eval_items` items of each built-in evaluation task."""
    from megatron_code.data.corpus import write_jsonl
    from megatron_code.data.synthetic import EVAL_SEED, generate

    folder = out / "eval" / "tasks"
    return [path if (path := folder / f"{task}.jsonl").is_file() else
            write_jsonl(path, (item.to_json() for item in generate(task, n, EVAL_SEED, "eval")))
            for task, n in size.eval_items.items()]


# ------------------------------------------------------------------------------------ training


def _sources(recipe: Path, prefixes: dict[str, str]) -> tuple[str, list[str]]:
    """The recipe's sources (names and weights) pointed at this study's files, and those files."""
    raw = yaml.safe_load(recipe.read_text())["data"]["sources"]
    override = "--data.sources=[" + ", ".join(f"{{name: {s['name']}, prefix: '{prefixes[s['name']]}', "
                                              f"weight: {s['weight']}}}" for s in raw) + "]"
    return override, [prefixes[s["name"]] for s in raw]


def _completed_step(run_dir: Path) -> int | None:
    from megatron_code.training.checkpoint import CheckpointError, resolve

    try:
        return json.loads((resolve(run_dir) / "trainer_state.json").read_text())["step"]
    except CheckpointError:
        return None


def checkpoint_digest(run_dir: Path) -> str:
    """The model in a run's latest checkpoint: its config and every weight's bytes (not the files,
    whose bytes differ between two saves of equal weights)."""
    import torch

    from megatron_code.training.checkpoint import load_model_state, read_trainer_state

    digest = hashlib.sha256(value_digest(read_trainer_state(run_dir)["config"]["model"]).encode())
    for name, tensor in sorted(load_model_state(run_dir).items()):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_arm(name: str, recipe: Path, run_dir: Path, overrides: list[str], inputs: dict[str, str]) -> None:
    """Train one arm from its recipe, or continue it from its latest checkpoint, or do nothing when
    it is complete. `inputs` are digests of its data (and of the checkpoint it starts from); with
    the config's digest they make its marker. A run made from other inputs is deleted first."""
    from megatron_code.config import load_config
    from megatron_code.training.trainer import Trainer

    config = load_config(recipe, overrides)
    settings = config.to_dict()
    settings["train"].pop("progress")
    inputs = {"config": value_digest(settings), **inputs}
    marker = run_dir / "study_stage.json"
    recorded, done = read_marker(marker), _completed_step(run_dir)
    changed = changed_inputs(recorded, inputs)
    if not changed and recorded["done"] and done is not None and done >= config.train.steps:
        _log(f"{name}: trained ({run_dir}, step {done})")
        return
    if changed and run_dir.exists():
        why = (f"its {', '.join(changed)} changed since {run_dir} was trained" if recorded else
               f"{run_dir} has no record of the inputs it was trained from")
        _log(f"{name}: {why}: training it again from the start")
        shutil.rmtree(run_dir)
        done = None
    if done is not None:  # interrupted: the trainer resumes train.output_dir's latest checkpoint itself
        _log(f"{name}: resuming from step {done} ({run_dir})")
    else:
        _log(f"{name}: training {config.train.steps} steps from recipe {recipe.name} ({run_dir})")
    write_marker(marker, inputs, done=False)
    started = time.perf_counter()
    result = Trainer(config).train()
    write_marker(marker, inputs, done=True)
    _log(f"{name}: step {result.step}, train loss {result.losses[-1]:.3f}, valid loss "
         + ", ".join(f"{k} {v:.3f}" for k, v in result.valid_losses.items())
         + f" ({time.perf_counter() - started:.0f} s)")


def _common(size: Size, tokenizer: Path, run_dir: Path, steps: int, lr: float, progress: bool,
            device: str) -> list[str]:
    return [*size.model, f"--data.tokenizer={tokenizer}", f"--data.seq_length={size.seq_length}",
            "--data.split=95,5,0", f"--train.steps={steps}", f"--train.micro_batch_size={size.batch_size}",
            f"--train.global_batch_size={size.batch_size}", f"--train.eval_interval={steps}",
            f"--train.log_interval={max(1, steps // 4)}", f"--optim.lr={lr}", f"--optim.min_lr={lr / 20}",
            f"--optim.warmup_steps={max(1, steps // 10)}", f"--train.output_dir={run_dir}",
            f"--checkpoint.interval={max(1, steps // 2)}", "--checkpoint.keep_last=2",
            f"--train.progress={progress}", f"--train.device={device}"]


# ---------------------------------------------------------------------------------- evaluation


def evaluate_arm(name: str, run_dir: Path, tasks: list[Path], out: Path, size: Size, device: str,
                 chat_template: str) -> Path:
    """Score one model on the task files with raw prompts (`chat_template` none) or through its
    chat template (auto); reused when its marker shows the same checkpoint, tasks, prompt format
    and generation length."""
    from megatron_code.evaluation.lm import load_language_model
    from megatron_code.evaluation.results import write_results
    from megatron_code.evaluation.score import score_tasks
    from megatron_code.evaluation.tasks import load_task

    marker = out.with_suffix(".stage.json")
    inputs = {"checkpoint": checkpoint_digest(run_dir), "tasks": content_digest(*tasks),
              "prompts": value_digest([chat_template, size.max_new_tokens])}
    if out.is_file() and not changed_inputs(read_marker(marker), inputs):
        _log(f"{name}: evaluated ({out})")
        return out
    started = time.perf_counter()
    model = load_language_model(run_dir, "cuda" if device == "cuda" else "cpu")
    scores, record = score_tasks(model, list(map(load_task, tasks)), chat_template, max_new_tokens=size.max_new_tokens,
                                 log=lambda line: _log(f"{name}: {line}"))
    write_results(out, model.path, model.step, scores, record)
    write_marker(marker, inputs, done=True)
    _log(f"{name}: scored in {time.perf_counter() - started:.0f} s")
    return out


# -------------------------------------------------------------------------------------- report


def _arm_table(runs: dict[str, Path]) -> str:
    from megatron_code.training.run_summary import summarize

    lines = ["| arm | steps | train loss first -> last | validation loss |", "|---|---|---|---|"]
    for name, run_dir in runs.items():
        s = summarize(run_dir)
        valid = ", ".join(f"{k} {v:.3f}" for k, v in s["valid_loss"].items())
        lines.append(f"| {name} | {s['step']} | {s['first_loss']:.3f} -> {s['last_loss']:.3f} | {valid} |")
    return "\n".join(lines)


def _plot_scores(results: dict[str, Path], path: Path) -> Path:
    """A bar per arm and (task, metric), all on the 0-1 scale, with the 95% bootstrap interval of
    the arm's mean over the items; the legend beside the axes, clear of the bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_code.evaluation.results import RAW, SCORE_SCALE, bootstrap_interval, read_results

    files = {name: read_results(p) for name, p in results.items()}
    rows = {f"{name} ({f.get('prompt_format', RAW)})": {
        (r["task"], r["metric"]): f["items"][r["task"]]["values"][r["metric"]] for r in f["results"]}
        for name, f in files.items()}
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)) + 2.5, 3.8))
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        intervals = [bootstrap_interval(row[k]) if row.get(k) else (0.0, 0.0, 0.0) for k in keys]
        means = [mean for mean, _, _ in intervals]
        errors = [[mean - low for mean, low, _ in intervals], [high - mean for mean, _, high in intervals]]
        ax.bar([j + i * width for j in range(len(keys))], means, width, yerr=errors, capsize=2,
               error_kw={"elinewidth": 0.8}, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [f"{t}\n{m}" for t, m in keys],
                  fontsize="x-small", rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"score ({SCORE_SCALE}, BLEU included)")
    ax.set_title("evaluation by arm (tiny-scale); bars: 95% bootstrap interval over items", fontsize="small")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(out: Path, pretrain: dict[str, Path], tune: dict[str, Path], results: dict[str, Path]) -> list[Path]:
    from megatron_code.training.plots import plot_runs

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    return [_plot_scores(results, plots / "scores.png"), *plot_runs(list(pretrain.values()), plots / "pretrain"),
            *plot_runs(list(tune.values()), plots / "tune")]


# ---------------------------------------------------------------------------------------- main


def run(argv: list[str] | None = None) -> dict:
    """The study; returns the comparison table, the results files and the plots (for tests)."""
    parser = argparse.ArgumentParser(prog="python -m megatron_code.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, choices=["code_stage"], help="which study")
    parser.add_argument("--size", default="default", choices=list(SIZES),
                        help="default: about 11 minutes on 2 CPU cores; ci: under a minute")
    parser.add_argument("--out", type=Path, help="where everything goes (default: runs/study/NAME/SIZE)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    size, out = SIZES[args.size], args.out or Path("runs/study") / args.name / args.size
    recipes = {**{arm: recipe_file(recipe) for arm, recipe in PRETRAIN_ARMS.items()},
               **{arm: recipe_file(recipe) for arm, (recipe, _) in TUNE_ARMS.items()}}
    progress = not args.no_progress
    check_stages(args.device)

    # Every arm's config is checked before the data is built: the paths are known in advance.
    from megatron_code.config import ConfigError, load_config
    from megatron_code.data.builtin import build_builtin_data, builtin_data_paths

    tokenizer, corpus = builtin_data_paths(out)
    pretrain = {arm: out / "pretrain" / arm for arm in PRETRAIN_ARMS}
    tune = {arm: out / "tune" / arm for arm in TUNE_ARMS}
    plans = {}  # arm -> (overrides, the dataset prefixes it reads)
    for arm in PRETRAIN_ARMS:
        sources, prefixes = _sources(recipes[arm], corpus)
        plans[arm] = [sources, *_common(size, tokenizer, pretrain[arm], size.pretrain_steps, size.pretrain_lr,
                                        progress, args.device)], prefixes
    for arm, (_, base) in TUNE_ARMS.items():
        sources, prefixes = _sources(recipes[arm], instruction_prefixes(out))
        plans[arm] = [sources, "--train.epochs=0", f"--checkpoint.init_from={pretrain[base]}", *_common(
            size, tokenizer, tune[arm], size.sft_steps, size.sft_lr, progress, args.device)], prefixes
    for arm, (overrides, _) in plans.items():
        try:
            load_config(recipes[arm], overrides).validate()
        except ConfigError as e:
            raise SystemExit(f"error: arm {arm} ({recipes[arm]}): {e}; stopped before any work") from None

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build_builtin_data(out, size.vocab_size, size.max_bytes, workers=2, progress=progress)
    build_instructions(out, size, tokenizer, out / "corpus" / "text.jsonl")
    tasks = build_eval_tasks(out, size)

    def data_digest(prefixes: list[str]) -> str:
        return content_digest(tokenizer, *(Path(p + suffix) for p in prefixes for suffix in (".bin", ".idx")))

    for arm, run_dir in pretrain.items():
        overrides, prefixes = plans[arm]
        train_arm(arm, recipes[arm], run_dir, overrides, {"data": data_digest(prefixes)})
    for arm, (_, base) in TUNE_ARMS.items():
        overrides, prefixes = plans[arm]
        train_arm(arm, recipes[arm], tune[arm], overrides,
                  {"data": data_digest(prefixes), "base checkpoint": checkpoint_digest(pretrain[base])})

    runs = {**pretrain, **tune}
    results = {arm: evaluate_arm(arm, run_dir, tasks, out / "eval" / f"{arm}.json", size, args.device,
                                 "none" if arm in pretrain else "auto")
               for arm, run_dir in runs.items()}
    from megatron_code.evaluation.results import compare

    tables = {"pretrained": compare([results[arm] for arm in pretrain]),
              "tuned": compare([results[arm] for arm in tune])}
    report = "\n".join([
        f"# Study {args.name} ({args.size} size)", "",
        "Tiny-scale numbers: models of about a million parameters (0.16M at the ci size) trained for minutes on "
        "CPU. They show that the papers' pipeline runs end to end from the recipes; they say nothing about what "
        "code data does at the papers' scale.", "",
        f"Arms: NL, CODE and ADAPTIVE pretrained ({size.pretrain_steps} steps; ADAPTIVE, ours, starts from CODE's "
        "2:1 and sets the weights online from the run's per-source losses by Online Data Mixing, Albalak et al. "
        "2023); NN = NL tuned on text instructions; NC = NL "
        "and CC = CODE tuned on text + code instructions at 5:3 (Ma et al.'s uniform strategy); CC_stepwise_* "
        f"= CODE tuned with the stepwise schedules ({size.sft_steps} steps each).", "",
        "## Training", "", _arm_table(runs), "",
        "## Evaluation (each arm's difference from the first, 95% bootstrap interval)", "",
        "Pretrained arms, fed each task's text as written (raw):", "", tables["pretrained"], "",
        "Tuned arms, fed each task's text as the user turn of the chat template they were tuned with (their "
        "instruction data's, recorded with it): each question's options are scored as the assistant's reply, "
        "code is generated after the assistant header. Compare arms within a table: a difference across the two "
        "tables mixes the models with the prompt format.", "", tables["tuned"], ""])
    (out / "comparison.md").write_text(report)
    plots = write_plots(out, pretrain, tune, results)
    print("\n" + report)
    print(f"study {args.name}: {out}/comparison.md, plots in {out / 'plots'} "
          f"({(time.perf_counter() - started) / 60:.1f} min)")
    return {"tables": tables, "report": report, "results": results, "plots": plots, "out": out,
            "size": asdict(size)}


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    with user_errors():
        main()
