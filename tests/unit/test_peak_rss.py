"""The exact peak RSS the planner benchmark and the converter report: VmHWM, which a reset brings back
down to the current RSS, so the peak of one block is measured without a sampler."""

import json
import subprocess
import sys

import pytest

# in a fresh process: the test process's own heap may already hold freed, resident memory to reuse
PROBE = """
import json
from training.run.phases import peak_rss, reset_peak_rss
MB = 2 ** 20
ok = reset_peak_rss()
before = peak_rss()
block = bytearray(200 * MB)
block[::4096] = b"x" * len(block[::4096])  # every page touched: resident
during = peak_rss()
del block
after_free = peak_rss()
ok2 = reset_peak_rss()
print(json.dumps({"ok": ok and ok2, "before": before, "during": during, "after_free": after_free,
                  "after_reset": peak_rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_the_peak_follows_an_allocation_and_a_reset_forgets_it(repo_root):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=repo_root, timeout=60)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 2 ** 20
    assert r["ok"]
    assert r["during"] - r["before"] >= 150 * mb
    # the high-water mark stays after the memory is freed (within the kernel's per-CPU RSS counters' slack)
    assert r["after_free"] >= r["during"] - 4 * mb
    assert r["after_reset"] < r["during"] - 100 * mb  # ... until a reset
