"""tools/fault_inject.py in a small form: a 2-rank pipeline-parallel run killed -9 twice (once
mid-save, once mid-training, a random rank each time) and resumed each time ends with losses
and weights bit-identical to an uninterrupted run."""
import sys

import pytest

from conftest import load_tool


@pytest.mark.skipif(sys.platform != "linux", reason="the tool finds the ranks through /proc")
def test_kill_nine_and_resume_twice_is_bit_identical(tmp_path, capsys):
    tool = load_tool("fault_inject")
    assert tool.main(["--kills", "2", "--steps", "6", "--interval", "2", "--seed", "1", "--out", str(tmp_path),
                      "--timeout", "300"]) == 0
    out = capsys.readouterr().out
    assert "result: PASS: 2 kills (1 mid-save)" in out, out
    assert "mid-save (step_" in out and "training, after step" in out, out
