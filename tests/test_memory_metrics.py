"""Peak memory in the metrics: this rank's own peak, grown by exactly what it allocates."""
import json
import subprocess
import sys
import textwrap

import torch

_PROBE = textwrap.dedent("""
    import json, torch
    from megatron_code.training.metrics import peak_memory

    def peak():
        return peak_memory(torch.device("cpu"))["memory/peak_rss_gib"]

    before = peak()
    big = torch.ones(512 * 2**20 // 4)  # 512 MiB, every page written
    after = peak()
    del big
    print(json.dumps({"before": before, "after": after, "after_free": peak()}))
""")


def test_peak_memory_grows_with_a_big_tensor_and_is_the_ranks_own():
    # the parent holds 768 MiB when it starts the probe: a launcher bigger than its rank
    # (ru_maxrss would report the parent's resident size from before the exec)
    parent = torch.ones(768 * 2**20 // 4)
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600, check=True)
    del parent
    gib = json.loads(out.stdout.splitlines()[-1])
    assert gib["before"] < 0.5, gib  # torch imported: about 0.2 GiB, not the parent's 0.75+
    assert 0.45 <= gib["after"] - gib["before"] <= 0.6, gib  # the 0.5 GiB tensor, not more
    # a peak: freeing the tensor does not lower it (the kernel's per-thread page counts may lag
    # by a few hundred KiB)
    assert gib["after_free"] >= gib["after"] - 0.01, gib
