"""train.dtype: bf16 hardware detection on CPUs, the choice per device, the one-line refusal of
bf16 on a CPU without it, and a bf16 training run on CPU (emulated here where needed)."""
import json

import pytest
import torch

from megatron_code.config import ConfigError, load_config
from megatron_code.training import precision
from megatron_code.training.precision import cpu_bf16_feature, pick_precision

# /proc/cpuinfo lines as the kernel writes them (abridged in the middle)
AVX2_EPYC = ("flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
             "sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq "
             "ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm avx2 "
             "bmi1 bmi2 sha_ni clzero xsaveerptr")
ZEN4 = ("flags\t\t: fpu vme de pse tsc msr sse sse2 avx avx2 avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl "
        "avx512_bf16 clzero xsaveerptr avx512vbmi umip pku avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni")
SAPPHIRE_RAPIDS = ("flags\t\t: fpu vme de pse avx avx2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 "
                   "wbnoinvd avx512vbmi umip pku ospke waitpkg avx512_vbmi2 amx_bf16 avx512_fp16 amx_tile amx_int8")
AMX_ONLY = "flags\t\t: fpu vme avx avx2 avx512f amx_bf16 amx_tile amx_int8"
GRAVITON3 = ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
             "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp "
             "svei8mm svebf16 i8mm bf16 dgh rng")
GRAVITON2 = ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
             "asimddp ssbs")


@pytest.mark.parametrize("cpuinfo, machine, found", [
    (AVX2_EPYC, "x86_64", None),
    (ZEN4, "x86_64", "avx512_bf16"),
    (SAPPHIRE_RAPIDS, "x86_64", "avx512_bf16"),
    (AMX_ONLY, "x86_64", "amx_bf16"),
    (GRAVITON3, "aarch64", "bf16"),
    (GRAVITON2, "aarch64", None),
    (GRAVITON2.replace("ssbs", "svebf16"), "aarch64", None),  # whole flags only: svebf16 is not bf16
    ("processor\t: 0\n" + ZEN4 + "\nbugs\t\t: sysret_ss_attrs", "x86_64", "avx512_bf16"),
    (ZEN4, "ppc64le", None),  # no flag known for the platform: not bf16
])
def test_cpu_bf16_feature_reads_the_flags(cpuinfo, machine, found):
    assert cpu_bf16_feature(cpuinfo, machine) == found


def test_this_machines_cpuinfo_agrees_with_its_flags():
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.is_file() or platform.machine() != "x86_64":
        pytest.skip("reads a Linux x86-64 /proc/cpuinfo")
    flags = next(line for line in info.read_text().splitlines() if line.startswith("flags")).split()
    expected = next((f for f in ("avx512_bf16", "amx_bf16") if f in flags), None)
    assert cpu_bf16_feature() == expected


@pytest.mark.parametrize("feature", [None, "avx512_bf16"])
def test_pick_precision(monkeypatch, feature):
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: feature)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    native = torch.bfloat16 if feature else torch.float32
    assert pick_precision("auto", cpu).dtype == native
    assert pick_precision("fp32", cpu).dtype == torch.float32
    assert pick_precision("auto", cuda).dtype == pick_precision("bf16", cuda).dtype == torch.bfloat16
    assert pick_precision("fp32", cuda).dtype == torch.float32
    assert pick_precision("bf16", cpu, allow_emulated_bf16=True).dtype == torch.bfloat16
    if feature:
        assert pick_precision("bf16", cpu).dtype == torch.bfloat16
        assert feature in pick_precision("auto", cpu).reason
    else:
        with pytest.raises(ConfigError) as error:
            pick_precision("bf16", cpu)
        message = str(error.value)
        assert "train.dtype=bf16" in message and "train.allow_emulated_bf16=true" in message and "\n" not in message
    with torch.autocast("cpu", enabled=False):
        with pick_precision("bf16", cpu, allow_emulated_bf16=True).autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with pick_precision("fp32", cpu).autocast():
            assert not torch.is_autocast_enabled("cpu")


def test_bf16_on_a_cpu_without_it_stops_the_trainer_before_any_work(monkeypatch, train_args, tmp_path):
    from megatron_code.training.trainer import Trainer

    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: None)
    with pytest.raises(ConfigError, match="train.dtype=bf16 but this CPU"):
        Trainer(load_config(None, train_args(tmp_path / "run", "--train.dtype=bf16")))
    assert not (tmp_path / "run").exists()


def test_quickstart_refuses_bf16_without_it_in_one_line(monkeypatch, tmp_path, capsys):
    from megatron_code.quickstart import main

    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), "--size", "tiny", "--dtype", "bf16"])
    err = capsys.readouterr().err + (exit_info.value.code if isinstance(exit_info.value.code, str) else "")
    assert "train.dtype=bf16 but this CPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bf16_training_on_cpu_runs_under_autocast(monkeypatch, train_args, tmp_path, capsys):
    """train.dtype=bf16 on CPU trains under bf16 autocast (the setting used to be dropped, giving
    fp32's exact losses): close to fp32's losses, not equal; parameters stay fp32. The metrics
    carry model TFLOP/s, MFU against train.peak_tflops and, with selective recomputation, HFU
    larger by the recomputed attention."""
    from megatron_code.training.metrics import flops_per_token, hardware_flops_per_token
    from megatron_code.training.trainer import Trainer

    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: "avx512_bf16")  # emulated where it is not
    common = ("--train.steps=3", "--train.eval_interval=0", "--checkpoint.save=false")
    fp32 = Trainer(load_config(None, train_args(tmp_path / "fp32", "--train.dtype=fp32", *common)))
    fp32_losses = fp32.train().losses
    bf16 = Trainer(load_config(None, train_args(tmp_path / "bf16", *common, "--train.peak_tflops=0.001",
                                                "--parallel.activation_checkpointing=selective")))
    assert bf16.precision.dtype == torch.bfloat16
    assert "precision: train.dtype=auto: bf16 autocast, this CPU has avx512_bf16" in capsys.readouterr().out
    bf16_losses = bf16.train().losses
    assert bf16_losses != fp32_losses
    assert bf16_losses == pytest.approx(fp32_losses, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())

    config = bf16.config
    model_flops = flops_per_token(config.model, config.data.seq_length)
    hardware_flops = hardware_flops_per_token(config.model, config.data.seq_length, "selective")
    assert hardware_flops > model_flops
    for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["tflops_per_gpu"] == pytest.approx(model_flops * record["tokens_per_s"] / 1e12, rel=1e-6)
        assert record["mfu"] == pytest.approx(record["tflops_per_gpu"] / 0.001, rel=1e-6)
        assert record["hfu"] / record["mfu"] == pytest.approx(hardware_flops / model_flops, rel=1e-9)
