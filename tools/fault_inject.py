"""Kill -9 a random rank of a 2-rank pipeline-parallel run at random moments, mid-save among them,
resume it each time, and check that its losses and final weights are bit-identical to an
uninterrupted run's.

    python tools/fault_inject.py --kills 6 --steps 40 --out runs/fault_inject

It builds a small text+code corpus and tokenizer under OUT/data (reused when there), then trains
the tiny model with torchrun on 2 CPU ranks as 2 pipeline stages, saving every --interval steps:
first uninterrupted (OUT/reference), then the same run (OUT/faulted) launched again and again.
Launch i (for i = 1..--kills) is ended by SIGKILL to a randomly chosen rank at a random moment,
the kinds taken in turn: during one of the launch's checkpoint saves (once its step_N.tmp
folder appears, plus up to 10 ms), during training (after a random step of this launch, plus up
to 0.1 s), or during start-up (up to the reference's time from the ranks' start to its first
step); torchrun then ends the other rank. Each next launch resumes from the newest intact
checkpoint; a last launch runs to the end. The verdict compares every step's loss, per-source
losses, gradient norm and learning rate in metrics.jsonl, and every weight of the final
checkpoint, bit for bit; exit status 0 when all match, 1 otherwise.
CPU only (gloo); Linux (it finds the ranks through /proc).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

COMPARED = ("loss", "grad_norm", "lr")
"""Besides the per-source losses (loss/<source>): what must be bit-identical at every step."""


def build_data(out: Path) -> list[str]:
    """The config overrides of the run: the built-in corpus (256 KB per source), its tokenizer."""
    from megatron_code.data.builtin import build_builtin_data

    tokenizer, prefixes = build_builtin_data(out, vocab_size=1024, max_bytes=256_000, workers=1, progress=False)
    sources = ", ".join(f"{{name: {name}, prefix: '{prefix}', weight: {weight}}}"
                        for (name, prefix), weight in zip(prefixes.items(), (2, 1)))
    return [f"--data.sources=[{sources}]", f"--data.tokenizer={tokenizer}", f"--data.cache_dir={out / 'cache'}"]


def train_command(data: list[str], run_dir: Path, steps: int, interval: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "megatron_code.train", "--model.preset=tiny", *data, "--data.seq_length=64",
            "--data.split=90,10,0", "--train.micro_batch_size=1", "--train.global_batch_size=4",
            f"--train.steps={steps}", "--train.eval_interval=0", "--train.progress=false",
            "--train.log_interval=1", "--optim.warmup_steps=2", "--optim.lr=3e-3", "--parallel.pipeline=2",
            f"--checkpoint.interval={interval}", "--checkpoint.keep_last=2", f"--train.output_dir={run_dir}"]


def clean_environment() -> dict[str, str]:
    """This environment without a process group's variables (a test may have made one)."""
    skip = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in skip}


def rank_processes(launcher: int) -> dict[int, int]:
    """Global rank -> pid of the worker processes under a torchrun process (from /proc)."""
    found, todo = {}, [launcher]
    while todo:
        pid = todo.pop()
        try:
            children = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                        for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            continue
        for child in children:
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            if rank is not None and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
                found[rank] = child
            todo.append(child)
    return found


@dataclass
class Launch:
    seconds: float
    returncode: int
    log: str
    killed: str = ""
    """What was killed, when (empty: the launch ran to its end)."""
    startup: float = 0.0
    """Seconds from the ranks' start to the first step's line."""


MOMENTS = ("mid-save", "training", "start-up")


def logged_steps(log_path: Path) -> list[int]:
    """The steps this launch has finished (rank 0 prints `step N: loss ...` for each)."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    return [int(line.split()[1].rstrip(":")) for line in text.splitlines()
            if line.startswith("step ") and ": loss " in line]


def launch(command: list[str], log_path: Path, steps: int, interval: int, checkpoints: Path, timeout: float,
           rng: random.Random | None = None, moment: str = "", startup: float = 0.0) -> Launch:
    """Run one launch; with `rng`, SIGKILL one of its ranks at a random `moment` (MOMENTS): during
    one of its saves (a step_N.tmp folder exists), after a random step of its own, or up to
    `startup` seconds after the ranks started."""
    start = time.monotonic()
    deadline = start + timeout
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**clean_environment(), "PYTHONUNBUFFERED": "1"})
    ranks, killed, ranks_started, first_step = {}, "", None, None
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if len(ranks) < 2:
                ranks = rank_processes(process.pid)
                ranks_started = time.monotonic() if len(ranks) == 2 else None
            elif first_step is None and logged_steps(log_path):
                first_step = time.monotonic()
            if rng is not None and ranks_started is not None:
                killed = _kill_one(process, ranks, rng, moment, startup, log_path, steps, interval, checkpoints,
                                   deadline)
                break
            time.sleep(0.005)
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed += f" (launch timed out after {timeout:.0f} s and was killed)"
    startup_seconds = (first_step - ranks_started) if first_step and ranks_started else 0.0
    return Launch(time.monotonic() - start, process.returncode, log_path.read_text(errors="replace"), killed,
                  startup_seconds)


def _kill_one(process: subprocess.Popen, ranks: dict[int, int], rng: random.Random, moment: str, startup: float,
              log_path: Path, steps: int, interval: int, checkpoints: Path, deadline: float) -> str:
    rank = rng.randrange(2)
    started = time.monotonic()

    def wait_for(condition) -> bool:
        while not condition():
            if process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True
    if moment == "start-up":
        at = started + rng.uniform(0, startup)
        wait_for(lambda: time.monotonic() >= at or logged_steps(log_path))
        what = "during start-up" if not logged_steps(log_path) else "at its first step"
    elif moment == "training":
        if not wait_for(lambda: logged_steps(log_path)):
            return ""
        target = rng.randrange(logged_steps(log_path)[0], steps)
        wait_for(lambda: logged_steps(log_path)[-1] >= target)
        time.sleep(rng.uniform(0, 0.1))
        what = f"training, after step {target}"
    else:  # one of the saves this launch still makes, at random
        if not wait_for(lambda: logged_steps(log_path)):
            return ""
        first = logged_steps(log_path)[0]
        saves = sorted({*range(first + (-first) % interval, steps + 1, interval), steps})
        final = checkpoints / f"step_{saves[rng.randrange(len(saves))]:07d}"
        partial = final.with_name(final.name + ".tmp")
        wait_for(lambda: partial.exists() or final.exists())
        time.sleep(rng.uniform(0, 0.01))  # a save of the tiny model takes longer: the kill lands inside it
        what = f"mid-save ({partial.name} being written)" if partial.exists() else f"just after saving {final.name}"
    if process.poll() is not None:
        return ""
    try:
        os.kill(ranks[rank], signal.SIGKILL)
    except ProcessLookupError:
        return ""
    left = sorted(p.name for p in checkpoints.glob("step_*.tmp"))
    return (f"rank {rank} killed {time.monotonic() - started:.1f} s after the ranks started, {what}"
            + (f"; {', '.join(left)} left behind" if left else ""))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compare(reference: Path, faulted: Path, steps: int) -> list[str]:
    """What differs between the two runs (empty: every step's numbers and the final weights are
    bit-identical)."""
    from megatron_code.training.checkpoint import load_model_state

    problems = []
    ours, theirs = metrics(faulted), metrics(reference)
    logged = [r["step"] for r in ours]
    if logged != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps are {logged}, not 1..{steps} once each")
    for a, b in zip(theirs, ours):
        keys = [k for k in a if k in COMPARED or k.startswith("loss/")]
        differ = [k for k in keys if a[k] != b.get(k)]
        if differ:
            problems.append(f"step {a['step']}: {', '.join(f'{k} {b.get(k)!r} vs {a[k]!r}' for k in differ)}")
    want, got = load_model_state(reference), load_model_state(faulted)
    unequal = [name for name in want if name not in got or not want[name].equal(got[name])]
    if unequal:
        problems.append(f"final weights differ: {', '.join(unequal[:5])}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=6, help="launches ended by SIGKILL to one rank")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=4, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds which rank dies and when")
    parser.add_argument("--out", type=Path, default=Path("runs/fault_inject"))
    parser.add_argument("--timeout", type=float, default=600, help="seconds one launch may take")
    args = parser.parse_args(argv)
    if sys.platform != "linux":
        sys.exit("error: tools/fault_inject.py finds the ranks through /proc: Linux only")
    import shutil

    data = build_data(args.out / "data")
    reference, faulted = args.out / "reference", args.out / "faulted"
    for run_dir in (reference, faulted):
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
    done = launch(train_command(data, reference, args.steps, args.interval), reference / "launch.log", args.steps,
                  args.interval, reference / "checkpoints", args.timeout)
    if done.returncode != 0:
        print(done.log[-3000:])
        sys.exit(f"error: the uninterrupted run failed (exit status {done.returncode}); see {reference / 'launch.log'}")
    print(f"reference: {args.steps} steps on 2 ranks (pipeline 2), {done.seconds:.1f} s "
          f"({done.startup:.1f} s from the ranks' start to the first step)")
    rng = random.Random(args.seed)
    command = train_command(data, faulted, args.steps, args.interval)
    kills = mid_save = 0
    for attempt in range(1, args.kills + 2):
        last = attempt == args.kills + 1
        result = launch(command, faulted / f"launch_{attempt}.log", args.steps, args.interval, faulted / "checkpoints",
                        args.timeout, None if last else rng, MOMENTS[(attempt - 1) % len(MOMENTS)], done.startup)
        resumed = next((line.split("resuming from ")[1].split(",")[0] for line in result.log.splitlines()
                        if "resuming from " in line), "step 0")
        state = result.killed or f"ran to the end (exit status {result.returncode})"
        print(f"launch {attempt}: resumed from {Path(resumed).name}; {state}")
        if result.killed:
            kills += 1
            mid_save += "mid-save" in result.killed
        elif result.returncode != 0:
            print(result.log[-3000:])
            print(f"result: FAIL, launch {attempt} failed on its own (exit status {result.returncode})")
            return 1
        if not result.killed and not last:
            break  # finished before its kill: nothing left to interrupt
    problems = compare(reference, faulted, args.steps)
    verdict = "PASS" if not problems else "FAIL"
    print(f"result: {verdict}: {kills} kills ({mid_save} mid-save); {args.steps} steps' losses, per-source losses, "
          f"grad norms and learning rates and the final weights "
          + ("bit-identical to the uninterrupted run" if not problems else "differ:\n  " + "\n  ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
