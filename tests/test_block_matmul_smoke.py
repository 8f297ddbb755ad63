"""benchmarks/block_matmul.py --smoke: the matmul benchmark's tiny CPU run writes a row per row count."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "block_matmul.py"


def test_smoke_run_writes_every_row_count(tmp_path):
    result = tmp_path / "block_matmul.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--rows", "1,4", "--result", str(result)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(result.read_text())["rows"]
    assert set(rows) == {"1", "4"}
    assert all(r["cublas"]["us"] > 0 and "gb_per_s" in r["cublas"] for r in rows.values())
