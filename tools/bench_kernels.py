"""Kernel benchmark: our Triton kernels against PyTorch eager and torch.compile of their reference.

For every kernel of `megatron_code.kernels` and a set of realistic shapes (hidden 2048-8192, rows
4K-64K, vocab 32K-128K, sequence 2K-16K) it times forward, backward and forward+backward of three
implementations -- ours (Triton), the PyTorch reference run eagerly, and `torch.compile` of that same
reference -- with `triton.testing.do_bench` medians (L2 flushed before each run), and prints a table:
time, achieved GB/s (memory-bound kernels) or TFLOP/s (attention and fused linear + cross-entropy),
that as a % of the device's peak measured in the same run, and the speed ratios ours vs eager and
ours vs compile (> 1: ours is faster). Each case also checks ours against the eager reference (outputs
and input gradients) and records the peak memory of one forward+backward of each implementation.
Results go to runs/bench/bench_kernels.json (with device, versions, date and git commit; copy it under
benchmarks/results/ to commit it) and runs/bench/bench_kernels.csv, or to --out-dir.

Run it:
    python tools/bench_kernels.py                         # default set, bf16, sized for ~6-8 min on an H100
    python tools/bench_kernels.py --quick                 # one or two shapes per kernel, ~2-3 min
    python tools/bench_kernels.py --kernels rms_norm,flash_attention --dtype fp16 --out-dir DIR
    python tools/bench_kernels.py --dry-run               # CPU (Triton interpreter), tiny fp32 shapes

Kernels (`--kernels`): rms_norm (variants plain / residual: fused residual add), layer_norm, rope,
swiglu, gelu, cross_entropy, fused_linear_cross_entropy, flash_attention (variants causal / docs:
document masking).

Device peaks, measured at start-up with the same timer:
- copy bandwidth: `dst.copy_(src)` of 1 GiB, counted as read + write = 2 GiB moved;
- matmul: an 8192^3 matmul in bf16 (and in the run's dtype when it differs), 2 * 8192^3 FLOPs.
"% peak" is achieved GB/s over the copy bandwidth, or achieved TFLOP/s over the matmul TFLOP/s of
the run's dtype.

Bytes moved (the minimum traffic of a fused kernel; the same count is used for eager and compile,
so their GB/s is an effective bandwidth). M rows, H hidden, e bytes per element of the run's dtype;
fp32 statistics are 4 bytes per row, int64 targets / positions 8 bytes:
- rms_norm      fwd: read x (MHe) + weight (He), write y (MHe) + rstd (4M);
                     fused residual adds: read residual (MHe), write the new residual x + r (MHe).
                bwd: read dy (MHe), x (MHe), rstd (4M), weight (He); write dx (MHe), dweight (He);
                     fused residual adds: read the residual's incoming gradient (MHe); the residual's
                     gradient is dx itself (no second write).
- layer_norm    fwd: read x (MHe), weight + bias (2He); write y (MHe), mean + rstd (8M).
                bwd: read dy, x (2MHe), mean + rstd (8M), weight (He); write dx (MHe), dweight + dbias (2He).
- rope          q (B,T,Hq,D), k (B,T,Hk,D); n = B*T*(Hq+Hk)*D*e.
                fwd: read q, k (n), write rotated q, k (n), read the cos/sin rows used (T*D/2 * 4 * 2)
                     and positions (8*B*T).   bwd: the same with dq, dk (an inverse rotation).
- swiglu        gate_up (M, 2F) -> (M, F).  fwd: read 2MFe, write MFe.
                bwd: read dout (MFe) + gate_up (2MFe), write dgate_up (2MFe).
- gelu          (M, N).  fwd: read MNe, write MNe.   bwd: read dy, x (2MNe), write dx (MNe).
- cross_entropy logits (N, V) -> fp32 loss (N).
                fwd: read logits (NVe) + targets (8N), write loss + lse (8N).
                bwd: read logits (NVe), targets (8N), lse (4N), dloss (4N); write dlogits (NVe).
FLOPs:
- flash_attention: `attention_flops` (matmul FLOPs, causal halves them; backward 2.5x forward); with
  document masking, the sum of that over the documents (the FLOPs the masked attention needs).
- fused_linear_cross_entropy: model FLOPs of the unfused matmuls: forward 2NVH (logits), backward
  4NVH (dhidden, dweight). Ours also recomputes the logits in backward (+2NVH actually executed),
  which is not counted: its TFLOP/s is useful work per second.

Timing modes: `fwd` runs the forward with autograd recording (as in training); `bwd` runs
`backward(retain_graph=True)` on outputs made once; `fwd+bwd` runs both. Incoming gradients are
fixed random tensors. torch.compile uses `dynamic=False`, default mode, a `torch._dynamo.reset()`
per case, so every shape is compiled for that shape (compile time is recorded as compile_s). Its
`bwd` is timed on a second compile made with donated buffers off (a compiled backward that reuses
its saved buffers refuses retain_graph); its fwd, fwd+bwd and peak memory use the default compile.

Robustness: any failure of one implementation on one case (out of memory, a compile error, a kernel
error) is recorded in that case's rows (error column) and the run goes on. `--time-budget` (default
450 s for the default set, 170 s for --quick) skips the cases left when it runs out, recording
them as skipped; cases run round-robin over kernels (every kernel's first shape first), so a cut
drops the largest shapes, never a whole kernel.

`--dry-run` runs anywhere: on CPU it sets TRITON_INTERPRET=1 before importing triton and the kernels,
runs every kernel on tiny shapes in fp32, asserts ours against the reference (outputs and gradients,
rtol = atol = 1e-4), and goes through the whole timing / table / JSON / CSV path with
time.perf_counter medians instead of do_bench and torch.compile with the aot_eager backend.
Exit status 1 when a correctness check fails (or, in --dry-run, anything errors).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

EPS = 1e-5
ROPE_THETA = 10000.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("ours", "eager", "compile")
KERNELS = ("rms_norm", "layer_norm", "rope", "swiglu", "gelu", "cross_entropy",
           "fused_linear_cross_entropy", "flash_attention")
DRY_REPS = 1  # perf_counter repetitions per timing in --dry-run
# --dry-run: fp32 everywhere, elementwise assert_close; otherwise: max |ours - eager| / max |eager|
DRY_TOLERANCE = 1e-4
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
DEFAULT_BUDGET_S = {"default": 450.0, "quick": 170.0, "dry": 0.0}

# kernel -> shape set -> [(variant, dims)]. The default set is sized for ~6-8 minutes on an H100,
# most of it torch.compile of the reference (one compile per case).
SHAPES: dict[str, dict[str, list[tuple[str, dict]]]] = {
    "rms_norm": {
        "dry": [("plain", dict(rows=24, hidden=48)), ("residual", dict(rows=24, hidden=48))],
        "quick": [("plain", dict(rows=16384, hidden=4096)), ("residual", dict(rows=16384, hidden=4096))],
        "default": [("plain", dict(rows=4096, hidden=4096)), ("residual", dict(rows=16384, hidden=4096)),
                    ("plain", dict(rows=16384, hidden=8192)), ("plain", dict(rows=65536, hidden=4096)),
                    ("residual", dict(rows=65536, hidden=8192))],
    },
    "layer_norm": {
        "dry": [("plain", dict(rows=24, hidden=40))],
        "quick": [("plain", dict(rows=16384, hidden=4096))],
        "default": [("plain", dict(rows=16384, hidden=4096)), ("plain", dict(rows=65536, hidden=2048))],
    },
    "rope": {
        "dry": [("plain", dict(B=2, T=12, Hq=4, Hk=2, D=16))],
        "quick": [("plain", dict(B=4, T=4096, Hq=32, Hk=8, D=128))],
        "default": [("plain", dict(B=4, T=4096, Hq=32, Hk=8, D=128)),
                    ("plain", dict(B=8, T=8192, Hq=32, Hk=8, D=128))],
    },
    "swiglu": {
        "dry": [("plain", dict(rows=24, ffn=40))],
        "quick": [("plain", dict(rows=16384, ffn=11008))],
        "default": [("plain", dict(rows=16384, ffn=5632)), ("plain", dict(rows=32768, ffn=14336))],
    },
    "gelu": {
        "dry": [("plain", dict(rows=24, cols=40))],
        "quick": [("plain", dict(rows=16384, cols=16384))],
        "default": [("plain", dict(rows=16384, cols=8192)), ("plain", dict(rows=32768, cols=16384))],
    },
    "cross_entropy": {
        "dry": [("plain", dict(rows=24, vocab=100, ignore_every=5))],
        "quick": [("plain", dict(rows=8192, vocab=128256))],
        "default": [("plain", dict(rows=8192, vocab=32000)), ("plain", dict(rows=8192, vocab=128256)),
                    ("plain", dict(rows=16384, vocab=50304))],
    },
    "fused_linear_cross_entropy": {
        "dry": [("plain", dict(rows=24, hidden=32, vocab=100, ignore_every=5))],
        "quick": [("plain", dict(rows=8192, hidden=4096, vocab=128256))],
        "default": [("plain", dict(rows=8192, hidden=4096, vocab=32000)),
                    ("plain", dict(rows=8192, hidden=4096, vocab=128256))],
    },
    "flash_attention": {
        "dry": [("causal", dict(B=2, Hq=4, Hk=2, T=48, D=16)),
                ("docs", dict(B=1, Hq=2, Hk=1, T=48, D=16, docs=3))],
        "quick": [("causal", dict(B=2, Hq=32, Hk=8, T=8192, D=128))],
        "default": [("causal", dict(B=8, Hq=32, Hk=8, T=2048, D=128)),
                    ("causal", dict(B=2, Hq=32, Hk=8, T=8192, D=128)),
                    ("causal", dict(B=1, Hq=32, Hk=8, T=16384, D=128)),
                    ("causal", dict(B=4, Hq=16, Hk=16, T=4096, D=64)),
                    ("docs", dict(B=1, Hq=32, Hk=8, T=4096, D=128, docs=4))],
    },
}


def _kernels():
    """megatron_code.kernels, imported late: TRITON_INTERPRET must be set before triton loads."""
    import megatron_code.kernels.ops as K
    return K


# ---------------------------------------------------------------------------------------------
# cases


@dataclass
class Bench:
    """One case's inputs and the two implementations, built on the device."""
    args: tuple              # positional inputs shared by ours and the reference
    leaves: tuple            # inputs that receive gradients (compared, reset between runs)
    ours: Callable
    ref: Callable
    unit: str                # "GB/s" or "TFLOP/s"
    work: tuple              # (forward, backward) bytes or FLOPs
    grads: tuple | None = None  # incoming gradients of the outputs, made on the first run


@dataclass(frozen=True)
class Case:
    kernel: str
    variant: str
    dims: dict

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())


def _randn(shape, device, dtype, scale=1.0, shift=0.0, grad=True) -> torch.Tensor:
    t = (torch.randn(shape, device=device) * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def _targets(n, vocab, device, ignore_every=0) -> torch.Tensor:
    t = torch.randint(0, vocab, (n,), device=device)
    if ignore_every:
        t[::ignore_every] = _kernels().IGNORE_INDEX
    return t


def build_rms_norm(variant, d, device, dtype) -> Bench:
    K = _kernels()
    M, H, e = d["rows"], d["hidden"], dtype.itemsize
    x = _randn((M, H), device, dtype)
    w = _randn((H,), device, dtype, scale=0.1, shift=1.0)
    fwd, bwd = 2 * M * H * e + H * e + 4 * M, 3 * M * H * e + 4 * M + 2 * H * e
    args = (x, w)
    if variant == "residual":
        args = (x, w, _randn((M, H), device, dtype))
        fwd, bwd = fwd + 2 * M * H * e, bwd + M * H * e
    return Bench(args, args, lambda x, w, *r: K.rms_norm_triton(x, w, EPS, *r),
                 lambda x, w, *r: K.TORCH_OPS.rms_norm(x, w, EPS, *r), "GB/s", (fwd, bwd))


def build_layer_norm(variant, d, device, dtype) -> Bench:
    K = _kernels()
    M, H, e = d["rows"], d["hidden"], dtype.itemsize
    args = (_randn((M, H), device, dtype), _randn((H,), device, dtype, 0.1, 1.0), _randn((H,), device, dtype, 0.1))
    fwd = 2 * M * H * e + 2 * H * e + 8 * M
    bwd = 3 * M * H * e + 8 * M + 3 * H * e
    return Bench(args, args, lambda x, w, b: K.TRITON_OPS.layer_norm(x, w, b, EPS),
                 lambda x, w, b: K.TORCH_OPS.layer_norm(x, w, b, EPS), "GB/s", (fwd, bwd))


def build_rope(variant, d, device, dtype) -> Bench:
    K = _kernels()
    B, T, Hq, Hk, D = d["B"], d["T"], d["Hq"], d["Hk"], d["D"]
    q, k = _randn((B, T, Hq, D), device, dtype), _randn((B, T, Hk, D), device, dtype)
    cos, sin = K.rope_tables(D, T, ROPE_THETA, device)
    positions = torch.arange(T, device=device).repeat(B, 1)
    n = B * T * (Hq + Hk) * D * dtype.itemsize
    work = 2 * n + T * D * 4 + 8 * B * T
    return Bench((q, k, cos, sin, positions), (q, k), K.TRITON_OPS.apply_rope, K.TORCH_OPS.apply_rope,
                 "GB/s", (work, work))


def build_swiglu(variant, d, device, dtype) -> Bench:
    K = _kernels()
    M, F, e = d["rows"], d["ffn"], dtype.itemsize
    gate_up = _randn((M, 2 * F), device, dtype)
    return Bench((gate_up,), (gate_up,), K.TRITON_OPS.swiglu, K.TORCH_OPS.swiglu, "GB/s",
                 (3 * M * F * e, 5 * M * F * e))


def build_gelu(variant, d, device, dtype) -> Bench:
    K = _kernels()
    M, N, e = d["rows"], d["cols"], dtype.itemsize
    x = _randn((M, N), device, dtype)
    return Bench((x,), (x,), K.TRITON_OPS.gelu, K.TORCH_OPS.gelu, "GB/s", (2 * M * N * e, 3 * M * N * e))


def build_cross_entropy(variant, d, device, dtype) -> Bench:
    K = _kernels()
    N, V, e = d["rows"], d["vocab"], dtype.itemsize
    logits = _randn((N, V), device, dtype, scale=2.0)
    targets = _targets(N, V, device, d.get("ignore_every", 0))
    return Bench((logits, targets), (logits,), K.TRITON_OPS.cross_entropy, K.TORCH_OPS.cross_entropy,
                 "GB/s", (N * V * e + 16 * N, 2 * N * V * e + 16 * N))


def build_fused_linear_cross_entropy(variant, d, device, dtype) -> Bench:
    K = _kernels()
    N, H, V = d["rows"], d["hidden"], d["vocab"]
    hidden = _randn((N, H), device, dtype)
    weight = _randn((V, H), device, dtype, scale=H ** -0.5)
    targets = _targets(N, V, device, d.get("ignore_every", 0))

    def unfused(h, w, t):  # the logits (N, V) are materialized
        return K.TORCH_OPS.cross_entropy(h @ w.t(), t)

    return Bench((hidden, weight, targets), (hidden, weight), K.TRITON_OPS.fused_linear_cross_entropy,
                 unfused, "TFLOP/s", (2.0 * N * V * H, 4.0 * N * V * H))


def _document_ids(B, T, docs, device) -> torch.Tensor:
    """(B, T) int32: `docs` documents per row, boundaries at random positions."""
    ids = torch.zeros(B, T, dtype=torch.int32)
    for b in range(B):
        cuts = torch.randperm(T - 1)[: docs - 1] + 1
        ids[b, cuts] = 1
    return ids.cumsum(1, dtype=torch.int32).to(device)


def build_flash_attention(variant, d, device, dtype) -> Bench:
    K = _kernels()
    from megatron_code.kernels.flash_attention import attention_flops

    B, Hq, Hk, T, D = d["B"], d["Hq"], d["Hk"], d["T"], d["D"]
    q = _randn((B, Hq, T, D), device, dtype)
    k, v = _randn((B, Hk, T, D), device, dtype), _randn((B, Hk, T, D), device, dtype)
    args = (q, k, v)
    fwd, bwd = attention_flops(B, Hq, T, D), attention_flops(B, Hq, T, D, backward=True)
    if variant == "docs":
        doc = _document_ids(B, T, d["docs"], device)
        lengths = [n for row in doc.cpu() for n in torch.unique_consecutive(row, return_counts=True)[1].tolist()]
        fwd = sum(attention_flops(1, Hq, n, D) for n in lengths)
        bwd = sum(attention_flops(1, Hq, n, D, backward=True) for n in lengths)
        args = (q, k, v, doc)
    return Bench(args, (q, k, v), K.flash_attention_triton, K.attention_torch, "TFLOP/s", (fwd, bwd))


BUILDERS = {name: globals()[f"build_{name}"] for name in KERNELS}


def select_cases(kernels: list[str], shape_set: str) -> list[Case]:
    """Round-robin over kernels: every kernel's first shape, then every second shape, ..."""
    lists = [[Case(k, variant, dims) for variant, dims in SHAPES[k][shape_set]] for k in kernels]
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


# ---------------------------------------------------------------------------------------------
# running and timing


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_once(fn: Callable, bench: Bench, device: torch.device) -> tuple[tuple, tuple]:
    """One forward + backward: (outputs, gradients of the leaves), both detached."""
    for t in bench.leaves:
        t.grad = None
    outs = _as_tuple(fn(*bench.args))
    if bench.grads is None:
        gen = torch.Generator(device=device).manual_seed(1)
        bench.grads = tuple(torch.randn(o.shape, generator=gen, device=device).to(o.dtype) for o in outs)
    torch.autograd.backward(outs, bench.grads)
    grads = tuple(t.grad for t in bench.leaves)
    for t in bench.leaves:
        t.grad = None
    return tuple(o.detach() for o in outs), grads


def _no_donated_buffers():
    """torch.compile (AOTAutograd) by default lets a compiled backward reuse ("donate") the buffers
    saved for it, and then refuses backward(retain_graph=True). Compiling the forward and running
    the backward under this context turns that off, so the `bwd` mode can repeat one backward."""
    import torch._functorch.config as functorch_config
    if not hasattr(functorch_config, "donated_buffer"):  # torch < 2.6: no donated buffers
        return contextlib.nullcontext()
    return functorch_config.patch(donated_buffer=False)


def mode_callable(mode: str, fn: Callable, bench: Bench, retained_compile: bool = False) -> Callable:
    """What one timed run of `mode` executes. `bwd` repeats the backward of one forward graph."""
    if mode == "fwd":
        return lambda: fn(*bench.args)
    if mode == "bwd":
        if not retained_compile:
            outs = _as_tuple(fn(*bench.args))
            return lambda: torch.autograd.backward(outs, bench.grads, retain_graph=True)
        with _no_donated_buffers():
            outs = _as_tuple(fn(*bench.args))

        def backward():
            with _no_donated_buffers():
                torch.autograd.backward(outs, bench.grads, retain_graph=True)
        return backward
    return lambda: torch.autograd.backward(_as_tuple(fn(*bench.args)), bench.grads)


def make_timer(dry_run: bool, device: torch.device) -> Callable[[Callable, tuple], float]:
    """timer(fn, leaves) -> median milliseconds; leaves' .grad is reset before every run."""
    if not dry_run:
        from triton.testing import do_bench
        return lambda fn, leaves: float(do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves),
                                                 return_mode="median"))

    def perf_counter_timer(fn, leaves):
        times = []
        for _ in range(DRY_REPS):
            for t in leaves:
                t.grad = None
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return perf_counter_timer


def compare(ours: tuple, ref: tuple, names: list[str], dtype: torch.dtype, strict: bool) -> dict:
    """Ours against the eager reference. strict (--dry-run): elementwise assert_close; otherwise the
    max |ours - ref| / max |ref| over each tensor must stay under TOLERANCE[dtype]."""
    tol = DRY_TOLERANCE if strict else TOLERANCE[dtype]
    worst, problems = 0.0, []
    for name, a, b in zip(names, ours, ref):
        if a is None or b is None or a.shape != b.shape:
            shapes = [None if t is None else tuple(t.shape) for t in (a, b)]
            problems.append(f"{name}: ours {shapes[0]} vs reference {shapes[1]}")
            continue
        a, b = a.float(), b.float()
        if not torch.isfinite(a).all():
            problems.append(f"{name}: non-finite values")
            continue
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if a.numel() else 0.0
        worst = max(worst, err)
        if strict:
            try:
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            except AssertionError as exc:
                problems.append(f"{name}: {' '.join(str(exc).split())[:200]}")
        elif err > tol:
            problems.append(f"{name}: normalized max error {err:.3g} > {tol}")
    return {"passed": not problems, "max_err": worst, "tolerance": tol, "message": "; ".join(problems)}


def bench_case(case: Case, device, dtype, timer, compile_ref, dry_run: bool,
               peaks: dict) -> tuple[list[dict], dict]:
    """Rows (one per mode) and the correctness check of one case; failures are recorded, not raised."""
    errors: dict[str, str] = {}
    peak_mib: dict[str, float | None] = {impl: None for impl in IMPLS}
    times = {mode: {impl: None for impl in IMPLS} for mode in MODES}
    check = {"passed": None, "max_err": None, "tolerance": None, "message": "not run"}
    compile_s = None
    torch.manual_seed(0)
    bench = None
    try:
        bench = BUILDERS[case.kernel](case.variant, case.dims, device, dtype)
    except Exception as exc:  # e.g. out of memory for the inputs
        errors["build"] = _short(exc)
    if bench is not None:
        fns = {"ours": bench.ours, "eager": bench.ref}
        if compile_ref is not None:
            try:
                fns["compile"] = compile_ref(bench.ref)
            except Exception as exc:
                errors["compile"] = _short(exc)
        results = {}
        for impl, fn in list(fns.items()):
            try:
                start = time.perf_counter()
                res = run_once(fn, bench, device)  # warm-up: Triton JIT, torch.compile
                _sync(device)
                if impl == "compile":
                    compile_s = time.perf_counter() - start
                if device.type == "cuda":  # peak memory of a second, warm forward + backward
                    del res
                    _free(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    res = run_once(fn, bench, device)
                    _sync(device)
                    peak_mib[impl] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                if impl in ("ours", "eager"):
                    results[impl] = res
                del res
            except Exception as exc:
                errors[impl] = _short(exc)
                del fns[impl]
                _free(device)
        if "ours" in results and "eager" in results:
            (o_out, o_grad), (r_out, r_grad) = results["ours"], results["eager"]
            names = [f"out{i}" for i in range(len(o_out))] + [f"grad{i}" for i in range(len(o_grad))]
            check = compare(o_out + o_grad, r_out + r_grad, names, dtype, strict=dry_run)
        del results
        _free(device)
        for mode in ("fwd", "fwd+bwd", "bwd"):  # bwd last: compile's bwd needs its own compile
            for impl, fn in list(fns.items()):
                try:
                    if impl == "compile" and mode == "bwd":
                        # a fresh compile whose backward is first compiled for retain_graph=True
                        call = mode_callable(mode, compile_ref(bench.ref), bench, retained_compile=True)
                        call()  # compiles the backward outside the timing
                    else:
                        call = mode_callable(mode, fn, bench)
                    times[mode][impl] = timer(call, bench.leaves)
                    del call
                except Exception as exc:
                    errors[impl] = f"{mode}: {_short(exc)}"
                    del fns[impl]  # its later modes would fail alike
                    _free(device)
        del fns
    rows = [make_row(case, mode, dtype, times[mode], bench, peaks, peak_mib, compile_s, check, errors)
            for mode in MODES]
    del bench
    _free(device)
    record = {"kernel": case.kernel, "variant": case.variant, "shape": case.shape, "dtype": _dtype_name(dtype), **check}
    return rows, record


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _sig(x: float | None, digits: int = 4):
    return None if x is None else float(f"{x:.{digits}g}")


def make_row(case, mode, dtype, times, bench, peaks, peak_mib, compile_s, check, errors) -> dict:
    unit = work = None
    metric = {impl: None for impl in IMPLS}
    pct = {impl: None for impl in IMPLS}
    if bench is not None:
        unit = bench.unit
        work = {"fwd": bench.work[0], "bwd": bench.work[1], "fwd+bwd": bench.work[0] + bench.work[1]}[mode]
        scale = 1e9 if unit == "GB/s" else 1e12
        peak = peaks.get("copy_gbps") if unit == "GB/s" else peaks.get("matmul_tflops", {}).get(_dtype_name(dtype))
        for impl in IMPLS:
            if times[impl]:
                metric[impl] = work / (times[impl] * 1e-3) / scale
                pct[impl] = 100.0 * metric[impl] / peak if peak else None
    ours = times["ours"]
    row = {
        "kernel": case.kernel, "variant": case.variant, "shape": case.shape, "mode": mode,
        "dtype": _dtype_name(dtype), "device": peaks.get("device"),
        "ours_ms": _sig(ours), "eager_ms": _sig(times["eager"]), "compile_ms": _sig(times["compile"]),
        "unit": unit, "work": work,
        "ours_metric": _sig(metric["ours"]), "eager_metric": _sig(metric["eager"]),
        "compile_metric": _sig(metric["compile"]),
        "ours_pct_peak": _sig(pct["ours"], 3), "eager_pct_peak": _sig(pct["eager"], 3),
        "compile_pct_peak": _sig(pct["compile"], 3),
        "speedup_vs_eager": _sig(times["eager"] / ours, 3) if ours and times["eager"] else None,
        "speedup_vs_compile": _sig(times["compile"] / ours, 3) if ours and times["compile"] else None,
        "peak_mib_ours": _sig(peak_mib["ours"]), "peak_mib_eager": _sig(peak_mib["eager"]),
        "peak_mib_compile": _sig(peak_mib["compile"]),
        "compile_s": _sig(compile_s, 3),
        "check": {True: "pass", False: "FAIL", None: "n/a"}[check["passed"]],
        "max_err": _sig(check["max_err"], 3),
        "error": "; ".join(f"{k}: {v}" for k, v in errors.items()),
    }
    return row


def skipped_rows(case: Case, dtype, peaks, reason: str) -> tuple[list[dict], dict]:
    check = {"passed": None, "max_err": None, "tolerance": None, "message": reason}
    rows = [make_row(case, mode, dtype, {i: None for i in IMPLS}, None, peaks, {i: None for i in IMPLS},
                     None, check, {"skipped": reason}) for mode in MODES]
    return rows, {"kernel": case.kernel, "variant": case.variant, "shape": case.shape,
                  "dtype": _dtype_name(dtype), **check}


# ---------------------------------------------------------------------------------------------
# device peaks and metadata


def measure_peaks(device: torch.device, dtype: torch.dtype, timer, dry_run: bool) -> dict:
    """Copy bandwidth (read + write bytes) and matmul TFLOP/s, with the benchmark's own timer."""
    peaks: dict = {"device": _device_name(device), "matmul_tflops": {}}
    n_bytes = 2**24 if dry_run else 2**30
    try:
        src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        ms = timer(lambda: dst.copy_(src), ())
        peaks.update(copy_bytes=2 * n_bytes, copy_ms=_sig(ms), copy_gbps=_sig(2 * n_bytes / (ms * 1e-3) / 1e9))
        del src, dst
    except Exception as exc:
        peaks["copy_error"] = _short(exc)
    n = 256 if dry_run else 8192
    peaks["matmul_n"] = n
    matmul_dtypes = {dtype} if device.type == "cpu" else {torch.bfloat16, dtype}
    for mdtype in sorted(matmul_dtypes, key=str):
        try:
            a = torch.randn(n, n, device=device).to(mdtype)
            b = torch.randn(n, n, device=device).to(mdtype)
            c = torch.empty(n, n, device=device, dtype=mdtype)
            ms = timer(lambda: torch.mm(a, b, out=c), ())
            peaks["matmul_tflops"][_dtype_name(mdtype)] = _sig(2.0 * n**3 / (ms * 1e-3) / 1e12)
            del a, b, c
        except Exception as exc:
            peaks[f"matmul_error_{_dtype_name(mdtype)}"] = _short(exc)
    _free(device)
    return peaks


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(args, device: torch.device, dtype: torch.dtype, shape_set: str, compile_backend) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("status", "--porcelain")
    meta = {
        "tool": "tools/bench_kernels.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "device_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "dtype": _dtype_name(dtype), "shape_set": shape_set, "dry_run": args.dry_run,
        "timer": (f"time.perf_counter median of {DRY_REPS}" if args.dry_run
                  else "triton.testing.do_bench median (warmup 25 ms, rep 100 ms, L2 flushed)"),
        "compile": None if compile_backend is None else {"backend": compile_backend, "mode": args.compile_mode,
                                                          "dynamic": False},
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "argv": sys.argv[1:],
    }
    return meta


# ---------------------------------------------------------------------------------------------
# output

CSV_FIELDS = ["kernel", "variant", "shape", "mode", "dtype", "device", "ours_ms", "eager_ms", "compile_ms",
              "unit", "work", "ours_metric", "eager_metric", "compile_metric", "ours_pct_peak",
              "eager_pct_peak", "compile_pct_peak", "speedup_vs_eager", "speedup_vs_compile",
              "peak_mib_ours", "peak_mib_eager", "peak_mib_compile", "compile_s", "check", "max_err", "error"]


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    head = ["kernel", "variant", "shape", "mode", "ours ms", "eager ms", "compile ms", "ours", "% peak",
            "x eager", "x compile", "MiB ours/eager/compile", "check", "error"]
    lines = []
    for r in rows:
        mem = "" if r["mode"] != "fwd+bwd" or r["peak_mib_ours"] is None else "/".join(
            _fmt(r[f"peak_mib_{i}"], ".0f") for i in IMPLS)
        lines.append([r["kernel"], r["variant"], r["shape"], r["mode"], _fmt(r["ours_ms"], ".4g"),
                      _fmt(r["eager_ms"], ".4g"), _fmt(r["compile_ms"], ".4g"),
                      "-" if r["ours_metric"] is None else f"{r['ours_metric']:.4g} {r['unit']}",
                      _fmt(r["ours_pct_peak"], ".1f"), _fmt(r["speedup_vs_eager"], ".2f"),
                      _fmt(r["speedup_vs_compile"], ".2f"), mem, r["check"], r["error"][:60]])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def write_results(out_dir: Path, meta: dict, peaks: dict, checks: list[dict], rows: list[dict]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "bench_kernels.json", out_dir / "bench_kernels.csv"
    json_path.write_text(json.dumps({"meta": meta, "peaks": peaks, "checks": checks, "rows": rows}, indent=1) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r[k] is None else r[k] for k in CSV_FIELDS})
    return json_path, csv_path


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="all", help=f"comma-separated subset of {','.join(KERNELS)} (default all)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 in --dry-run)")
    p.add_argument("--quick", action="store_true", help="a smaller shape set (~2-3 min on an H100)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny fp32 shapes, correctness asserted, perf_counter timings; runs on CPU")
    p.add_argument("--out-dir", default="runs/bench", help="where bench_kernels.json and bench_kernels.csv go")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager in --dry-run)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for inductor (default: default mode)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which the remaining cases are skipped (recorded); 0 = none "
                        "(default 450, 170 with --quick, none in --dry-run)")
    args = p.parse_args(argv)
    kernels = list(KERNELS) if args.kernels == "all" else [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown or not kernels:
        p.error(f"unknown kernels {unknown}; choose from {', '.join(KERNELS)}")
    args.kernel_list = kernels
    if args.dry_run and args.dtype not in (None, "fp32"):
        p.error("--dry-run runs in fp32 (the Triton interpreter has no bf16 arithmetic)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        if not args.dry_run:
            print("bench_kernels: timing needs a CUDA GPU; use --dry-run to check the kernels and this "
                  "script on CPU", file=sys.stderr)
            return 2
        # must precede the first import of triton (the kernels bind interpreter or compiler then)
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if has_cuda else "cpu")
    dtype = torch.float32 if args.dry_run else DTYPES[args.dtype or "bf16"]
    shape_set = "dry" if args.dry_run else "quick" if args.quick else "default"
    budget = args.time_budget if args.time_budget is not None else DEFAULT_BUDGET_S[shape_set]
    _kernels()
    compile_backend = None
    compile_ref = None
    if not args.no_compile:
        import torch._dynamo as dynamo
        compile_backend = args.compile_backend or ("aot_eager" if args.dry_run else "inductor")
        for name in ("recompile_limit", "cache_size_limit"):  # one compile per case, never eager fallback
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
        mode = args.compile_mode if compile_backend == "inductor" else None

        def compile_ref(fn):
            """torch.compile of `fn`, compiled afresh for the current shapes."""
            dynamo.reset()
            return torch.compile(fn, backend=compile_backend, mode=mode, dynamic=False)

    timer = make_timer(args.dry_run, device)
    start = time.perf_counter()
    meta = metadata(args, device, dtype, shape_set, compile_backend)
    print(f"bench_kernels: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
          f"dtype {meta['dtype']}, shapes {shape_set}, compile {compile_backend or 'off'}", flush=True)
    peaks = measure_peaks(device, dtype, timer, args.dry_run)
    print(f"device peaks: copy {peaks.get('copy_gbps')} GB/s (read + write), matmul {peaks['matmul_n']}^3 "
          f"{peaks['matmul_tflops']} TFLOP/s", flush=True)

    cases = select_cases(args.kernel_list, shape_set)
    results: list[tuple[list[dict], dict]] = []
    skipped = 0
    for i, case in enumerate(cases, 1):
        elapsed = time.perf_counter() - start
        label = f"[{i:2d}/{len(cases)}] {case.kernel} {case.variant} {case.shape}"
        if budget and elapsed > budget:
            results.append(skipped_rows(case, dtype, peaks, f"time budget {budget:g} s reached"))
            skipped += 1
            print(f"{label}: skipped (time budget {budget:g} s reached)", flush=True)
            continue
        print(f"{label} ...", end="", flush=True)
        t0 = time.perf_counter()
        results.append(bench_case(case, device, dtype, timer, compile_ref, args.dry_run, peaks))
        rows, record = results[-1]
        status = {True: "ok", False: "CHECK FAILED", None: "check n/a"}[record["passed"]]
        errs = rows[0]["error"] or rows[-1]["error"]
        print(f" {status}{' (' + errs[:80] + ')' if errs else ''}, {time.perf_counter() - t0:.1f} s "
              f"(total {time.perf_counter() - start:.0f} s)", flush=True)

    order = sorted(range(len(cases)), key=lambda i: (KERNELS.index(cases[i].kernel), i))
    rows = [row for i in order for row in results[i][0]]
    checks = [results[i][1] for i in order]
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    print()
    print(format_table(rows))
    json_path, csv_path = write_results(Path(args.out_dir), meta, peaks, checks, rows)
    print(f"\nwrote {json_path} and {csv_path} ({meta['elapsed_s']} s)")

    failed = [c for c in checks if c["passed"] is False]
    for c in failed:
        print(f"CHECK FAILED: {c['kernel']} {c['variant']} {c['shape']}: {c['message']}", file=sys.stderr)
    if skipped:
        print(f"{skipped} case(s) skipped by the time budget; raise --time-budget (0 = none)", file=sys.stderr)
    errored = [r for r in rows if r["error"]]
    if args.dry_run and errored:
        for r in errored:
            print(f"ERROR: {r['kernel']} {r['variant']} {r['mode']}: {r['error']}", file=sys.stderr)
    return 1 if failed or (args.dry_run and errored) else 0


if __name__ == "__main__":
    sys.exit(main())
