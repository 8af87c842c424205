"""The example trains (loss falls) and extracts a domain sub-model, in a few steps."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


import pytest


@pytest.mark.parametrize("ecss", [False, True], ids=["experts on the device", "ecss: experts on the host"])
def test_train_rre_lm_example_runs(ecss):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "train_rre_lm.py"), "--steps", "40", "--batch", "8"]
                         + (["--ecss"] if ecss else []), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr  # exits 1 when the loss does not fall
    assert "step 40/40" in res.stderr
    sub, full = re.search(r"docs eval loss ([\d.]+) \(full model ([\d.]+)\)", res.stdout).groups()
    assert sub == full
    assert ("ECSS: last step" in res.stdout) == ecss


def test_train_topk_ep_example_rebalances_and_learns():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "train_topk_ep.py"), "--steps", "30",
                          "--rebalance-every", "10"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max/mean tokens per rank" in res.stdout and "2 rebalances" in res.stdout
