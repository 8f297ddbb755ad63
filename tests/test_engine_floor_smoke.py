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
    # named by how the blocks attend, how the engine ran them (not compiled in a smoke run) and whose decode step
    # they divide by
    assert set(s["verify_vs_decode"]) == {f"{b} sdpa, device tree; graphs step" for b in blocks}
    assert set(s["goals"]) == {"decode_ms", "prefill_ms", "tree_64_vs_decode"}
    assert all(g["starts"] == 2 and g["met"] is False for g in s["goals"].values())  # two starts are not enough
    assert result.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the picture beside the numbers
    assert (tmp_path / "engine_floor_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the profile's


def test_the_tree_goal_is_judged_in_steps_of_the_decode_goals_setting():
    """A slow decode step makes any verify look cheap in steps: the tree goal takes the tree series of the setting
    whose decode median holds the decode goal, not the best ratio of any setting."""
    sys.path.insert(0, str(SCRIPT.parent))
    import engine_floor

    def start(setting: str, step: float, tree: float) -> dict:
        return {"decode_ms": {setting: step}, "prefill_ms": 60.0,
                "verify": {"setting": setting, "block_attention": "split", "fuse": "blocks", "decode_ms": step,
                           "tree_64": {"ms": tree, "vs_decode": round(tree / step, 3)}}}  # fmt: skip

    starts = [start("slow", 4.6, 5.5), start("slow", 4.7, 5.6), start("slow", 4.5, 5.4)]
    starts += [start("fast", 4.1, 5.8), start("fast", 4.2, 5.7), start("fast", 4.15, 5.9)]
    goals = engine_floor.summarize(starts)["goals"]
    assert goals["decode_ms"] == {"goal": 4.2, "median": 4.15, "starts": 3, "met": True}
    assert goals["tree_64_vs_decode"]["median"] == pytest.approx(5.8 / 4.1, abs=1e-3)  # the fast step's trees
    assert goals["tree_64_vs_decode"]["met"] is False  # though the slow step's trees are 1.2 of theirs


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
