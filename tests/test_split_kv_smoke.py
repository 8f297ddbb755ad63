"""benchmarks/split_kv.py --smoke: the attention benchmark's tiny run in Triton's interpreter on the CPU writes
every row, one-token and verify blocks, and the kernels' results there are SDPA's."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "split_kv.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_smoke_run_writes_every_row(tmp_path):
    result = tmp_path / "split_kv.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--result", str(result)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (ctx,) = json.loads(result.read_text())["contexts"].values()
    for name in ("sdpa_masked", "sdpa_used", "split_best", "split_default"):
        assert ctx[name]["us"] > 0
    assert ctx["split_default"]["max_abs_err"] < 1e-4
    # blocks: a chain, and trees of 16, 32 and 64 nodes with the root
    assert set(ctx["blocks"]) == {"2", "17", "33", "65"}
    for block in ctx["blocks"].values():
        assert block["sdpa_masked"]["us"] > 0 and block["split_default"]["max_abs_err"] < 1e-4
