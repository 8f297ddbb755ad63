"""benchmarks/engine_floor.py --smoke: two runs (two "starts") on tiny shapes on the CPU append to one result file,
and its summary holds the median and range over both, against the three goals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two processes importing torch and transformers, ~25 s on 2 CPU cores

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_floor.py"


def test_two_starts_are_summarised_against_the_goals(tmp_path):
    result = tmp_path / "engine_floor.json"
    for extra in (["--profile-verify"], []):
        # one setting: with two, timing picks each start's fastest, and the verify series would differ by start
        cmd = [sys.executable, str(SCRIPT), "--smoke", "--settings", "graphs", "--tokens", "4", "--result",
               str(result), *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(result.read_text())
    assert len(res["starts"]) == 2
    profile = res["starts"][0]["verify_profile"]
    assert set(profile) == {"decode", "chain_2", "chain_16", "tree_64"}
    assert all(p["ms_per_step"] > 0 for p in profile.values())
    s = res["summary"]
    assert set(s["decode_ms"]) == {"graphs"}
    for row in s["decode_ms"].values():
        assert row["starts"] == 2 and row["min"] <= row["median"] <= row["max"]
    blocks = ("chain_2", "chain_4", "chain_8", "chain_16", "tree_16", "tree_32", "tree_64")
    assert set(s["verify_vs_decode"]) == {f"{b} sdpa" for b in blocks}  # named by how the blocks attend
    assert set(s["goals"]) == {"decode_ms", "prefill_ms", "tree_64_vs_decode"}
    assert all(g["starts"] == 2 and g["met"] is False for g in s["goals"].values())  # two starts are not enough
    assert result.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the picture beside the numbers


def test_resume_keeps_a_partial_start_and_refuses_a_complete_one(tmp_path):
    result = tmp_path / "engine_floor.json"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--tokens", "4", "--result", str(result)]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300).returncode == 0
    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "nothing to resume" in proc.stderr
    res = json.loads(result.read_text())  # make it a start stopped before its verify
    start = res["starts"][0]
    del start["verify"]
    start["prefill_ms"], start["note"] = 123.0, "partial: stopped before verify"
    result.write_text(json.dumps(res))
    proc = subprocess.run([*cmd, "--resume", "--settings", "graphs"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "other settings" in proc.stderr
    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (start,) = json.loads(result.read_text())["starts"]
    assert start["prefill_ms"] == 123.0 and "verify" in start and "note" not in start  # kept, filled in, complete
