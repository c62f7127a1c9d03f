"""tools/fault_inject.py in a small form: a 2-rank pipeline-parallel run killed -9 twice (rank 0
while step 4's checkpoint is written, rank 1 after a random step of the relaunch: seed 4 draws
these) and resumed each time ends with losses and weights bit-identical to an uninterrupted run."""
import sys

import pytest

from tool_modules import load_tool


@pytest.mark.skipif(sys.platform != "linux", reason="the tool finds the ranks through /proc")
def test_kill_nine_and_resume_twice_is_bit_identical(tmp_path, capsys):
    tool = load_tool("fault_inject")
    assert tool.main(["--kills", "2", "--steps", "6", "--interval", "2", "--seed", "4", "--out", str(tmp_path),
                      "--timeout", "300"]) == 0
    out = capsys.readouterr().out
    assert "launch 1: resumed from step 0; rank 0 killed" in out and "mid-save (step_0000004.tmp being written)" in out
    assert "launch 2: resumed from step_0000002; rank 1 killed" in out and "training, after step" in out, out
    assert "result: PASS: 2 kills (1 mid-save)" in out, out
