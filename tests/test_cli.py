"""Command-line tools stop on a path they cannot write with one line naming it, not a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [
    ["tools/prepare_corpus.py", "--out-dir", "{file}/corpus"],
    ["-m", "megatron_code.data.instructions", "--out", "{file}/sft.jsonl", "--count", "arithmetic=3"],
])
def test_an_unwritable_output_path_is_one_line(tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, *[c.format(file=blocker) for c in command]], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and str(blocker) in done.stderr
