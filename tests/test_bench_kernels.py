"""tools/bench_kernels.py: the --dry-run end to end (every kernel against its reference on tiny fp32
shapes, then the timing, table, JSON and CSV path), plus its shape sets and case ordering."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "bench_kernels.py"
KERNELS = {"rms_norm", "layer_norm", "rope", "swiglu", "gelu", "cross_entropy",
           "fused_linear_cross_entropy", "flash_attention"}
MODES = {"fwd", "bwd", "fwd+bwd"}


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # imports torch only; the kernels load inside main()
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run from a folder standing in for the repository root, with the default --out-dir."""
    root = tmp_path_factory.mktemp("root")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(TOOL), "--dry-run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, root / "runs" / "bench"


def test_results_go_under_runs_not_where_it_was_started(dry_run):
    proc, out = dry_run
    assert sorted(p.name for p in out.parent.parent.iterdir()) == ["runs"]  # nothing beside it in the "root"
    assert sorted(p.name for p in out.iterdir()) == ["bench_kernels.csv", "bench_kernels.json"]
    assert f"wrote {out.relative_to(out.parent.parent)}/bench_kernels.json" in proc.stdout


def test_dry_run_exits_zero_and_prints_the_table(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x eager" in proc.stdout and "bench_kernels.json" in proc.stdout


def test_json_has_a_passing_row_per_kernel_and_mode(dry_run):
    proc, out = dry_run
    data = json.loads((out / "bench_kernels.json").read_text())
    meta = data["meta"]
    for key in ("device", "torch", "triton", "cuda", "date", "git_commit"):
        assert key in meta
    assert meta["dry_run"] and meta["dtype"] == "fp32"
    assert data["peaks"]["copy_gbps"] > 0 and data["peaks"]["matmul_tflops"]["fp32"] > 0

    rows = data["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    for kernel in KERNELS:
        assert {r["mode"] for r in rows if r["kernel"] == kernel} == MODES
    for r in rows:
        where = f"{r['kernel']} {r['variant']} {r['mode']}"
        assert r["error"] == "", where
        assert r["check"] == "pass", where
        for impl in ("ours", "eager", "compile"):  # every implementation was timed
            assert r[f"{impl}_ms"] > 0, (where, impl)
        assert r["ours_metric"] > 0 and r["unit"] in ("GB/s", "TFLOP/s"), where
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_compile"] > 0, where

    checks = data["checks"]
    assert {c["kernel"] for c in checks} == KERNELS
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    assert all(c["max_err"] <= c["tolerance"] for c in checks)


def test_csv_matches_the_json(dry_run):
    _, out = dry_run
    rows = list(csv.DictReader((out / "bench_kernels.csv").open()))
    data = json.loads((out / "bench_kernels.json").read_text())
    assert len(rows) == len(data["rows"])
    assert {r["kernel"] for r in rows} == KERNELS
    assert all(r["check"] == "pass" and r["error"] == "" for r in rows)
    assert all(float(r["ours_ms"]) > 0 for r in rows)


def test_shape_sets_cover_every_kernel_and_the_spec_ranges():
    tool = load_tool()
    assert set(tool.KERNELS) == KERNELS == set(tool.SHAPES)
    for kernel, sets in tool.SHAPES.items():
        assert sets["dry"] and sets["quick"] and sets["default"], kernel
    default = [dims for sets in tool.SHAPES.values() for _, dims in sets["default"]]
    assert {d["hidden"] for d in default if "hidden" in d} >= {2048, 4096, 8192}
    assert min(d["rows"] for d in default if "rows" in d) == 4096
    assert max(d["rows"] for d in default if "rows" in d) == 65536
    assert {d["T"] for d in default if "D" in d and "Hq" in d and "docs" not in d} >= {2048, 16384}
    vocabs = {d["vocab"] for d in default if "vocab" in d}
    assert min(vocabs) == 32000 and max(vocabs) == 128256


def test_cases_run_round_robin_over_kernels():
    tool = load_tool()
    cases = tool.select_cases(["rms_norm", "gelu"], "default")
    assert [c.kernel for c in cases[:2]] == ["rms_norm", "gelu"]  # every kernel's first shape first
    assert len(cases) == len(tool.SHAPES["rms_norm"]["default"]) + len(tool.SHAPES["gelu"]["default"])


def test_dry_run_refuses_bf16():
    proc = subprocess.run([sys.executable, str(TOOL), "--dry-run", "--dtype", "bf16"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "fp32" in proc.stderr
