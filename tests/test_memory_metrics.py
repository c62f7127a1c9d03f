"""Peak memory in the metrics: this rank's peak, read against the kernel's own high-water mark."""
import json
import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent("""
    import json, torch
    from megatron_code.training.metrics import peak_memory

    def hwm_gib():  # the kernel's resident high-water mark of this process: the independent reference
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**20

    before = peak_memory(torch.device("cpu"))["memory/peak_rss_gib"]
    reference_before = hwm_gib()
    big = torch.ones(512 * 2**20 // 4)  # 512 MiB, every page written
    after = peak_memory(torch.device("cpu"))["memory/peak_rss_gib"]
    del big
    print(json.dumps({"before": before, "after": after, "reference_before": reference_before,
                      "reference_after": hwm_gib(), "after_free": peak_memory(torch.device("cpu"))["memory/peak_rss_gib"]}))
""")


def test_peak_memory_grows_with_a_big_tensor_and_matches_the_kernel():
    # a fresh process: the test runner's own peak (earlier tests) would hide the growth
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600, check=True)
    gib = json.loads(out.stdout.splitlines()[-1])
    assert 0.45 <= gib["after"] - gib["before"] <= 0.6, gib  # the 0.5 GiB tensor, not more
    assert abs(gib["before"] - gib["reference_before"]) < 0.02 and abs(gib["after"] - gib["reference_after"]) < 0.02, gib
    assert gib["after_free"] == gib["after"], gib  # a peak: freeing the tensor does not lower it
