"""Train in a child process the way a user does (`python -m megatron_code.train ...`), and kill it
with SIGKILL once its metrics show a given step: what a crashed or pre-empted node leaves behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMEOUT_S = 300


def _environment() -> dict:
    """This process's environment without the rendezvous variables an in-process run left in it
    (the child picks its own port, as a fresh command does)."""
    return {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}


def train(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "megatron_code.train", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_and_kill(args: list[str], run_dir: Path, at_step: int) -> None:
    """Start training and SIGKILL it as soon as metrics.jsonl has a record of `at_step` or later."""
    metrics = Path(run_dir) / "metrics.jsonl"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_code.train", *args], stdout=log, stderr=log,
                                text=True, env=_environment())
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.is_file() and any(json.loads(line)["step"] >= at_step and "event" not in json.loads(line)
                                             for line in metrics.read_text().splitlines() if line.endswith("}")):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        assert proc.returncode == -signal.SIGKILL, f"the run ended by itself ({proc.returncode}): {log.read()[-3000:]}"


TIMING = ("tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "hfu", "memory/")
"""What metrics.jsonl measures of the machine rather than the run (a field, or a prefix ending in /)."""


def records(run_dir: Path, exclude: tuple[str, ...] = TIMING) -> list[dict]:
    """metrics.jsonl's lines, without the timing and memory fields."""
    return [{k: v for k, v in json.loads(line).items()
             if not any(k == e or (e.endswith("/") and k.startswith(e)) for e in exclude)}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
