"""The one place that decides what a run computes in: bf16 autocast or fp32, on GPU and on CPU.

Mixed precision in every case: parameters, gradients and optimizer state stay fp32; under bf16
autocast the matmuls and attention run in bf16, norms emit bf16 activations while the residual
stream stays fp32, and losses are fp32 (see megatron_code/kernels).

`train.dtype`:
- `auto`: bf16 on CUDA; on a CPU only where it has bf16 arithmetic in hardware (below), else fp32.
- `bf16`: bf16 autocast. A CPU without bf16 hardware is refused at start-up: PyTorch would emulate
  the bf16 matmuls in software, with the same numbers but far slower than fp32 (25-30x per matmul
  on an AVX2 EPYC); `train.allow_emulated_bf16=true` runs it anyway, to test the bf16 path there.
- `fp32`: no autocast.

bf16 hardware on a CPU: on Linux x86-64 the `avx512_bf16` or `amx_bf16` flags of /proc/cpuinfo
(Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and later); on Linux aarch64 the `bf16`
feature (Armv8.6 BFDOT/BFMMLA: Graviton 3, Neoverse V1/N2 and later). Elsewhere (macOS, Windows)
nothing is read: the CPU counts as without bf16, so `auto` stays fp32.
"""
from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_code.config import ConfigError

CPU_BF16_FLAGS = {"x86_64": ("avx512_bf16", "amx_bf16"), "aarch64": ("bf16",)}
"""The /proc/cpuinfo flags (x86 `flags`, aarch64 `Features`) that mean bf16 arithmetic in hardware."""


def cpu_bf16_feature(cpuinfo: str | None = None, machine: str | None = None) -> str | None:
    """The first bf16 hardware flag this CPU reports (see CPU_BF16_FLAGS), or None. `cpuinfo`
    and `machine` default to /proc/cpuinfo and platform.machine() (tests pass their own)."""
    machine = machine or platform.machine()
    wanted = CPU_BF16_FLAGS.get(machine.lower(), ())
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not wanted or not path.is_file():
            return None
        cpuinfo = path.read_text(errors="replace")
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return next((flag for flag in wanted if flag in present), None)
    return None


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    """What matmuls and attention compute in: torch.bfloat16 (autocast) or torch.float32."""
    device_type: str
    reason: str
    """Why, for the start-up line."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward (and the loss) runs in."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


def pick_precision(choice: str, device: torch.device, allow_emulated_bf16: bool = False) -> Precision:
    """`train.dtype` on `device`; a ConfigError (one line, before any work) for bf16 on a CPU
    without bf16 hardware unless `allow_emulated_bf16`."""
    if choice == "fp32":
        return Precision(torch.float32, device.type, "train.dtype=fp32")
    if device.type != "cpu":
        return Precision(torch.bfloat16, device.type, f"train.dtype={choice}: bf16 autocast on {device.type}")
    feature = cpu_bf16_feature()
    if feature is not None:
        return Precision(torch.bfloat16, "cpu", f"train.dtype={choice}: bf16 autocast, this CPU has {feature}")
    machine = platform.machine()
    flags = " or ".join(CPU_BF16_FLAGS.get(machine.lower(), ())) or "no bf16 flag known for this platform"
    if choice == "auto":
        return Precision(torch.float32, "cpu", f"train.dtype=auto: fp32, this CPU has no bf16 hardware ({flags})")
    if allow_emulated_bf16:
        return Precision(torch.bfloat16, "cpu", "train.dtype=bf16 with train.allow_emulated_bf16: bf16 autocast, "
                                                "emulated in software on this CPU (slow)")
    raise ConfigError(f"train.dtype=bf16 but this CPU ({machine}) has no bf16 hardware ({flags}): PyTorch would "
                      "emulate it, far slower than fp32; use train.dtype=auto or fp32 "
                      "(train.allow_emulated_bf16=true runs it anyway, for tests)")
