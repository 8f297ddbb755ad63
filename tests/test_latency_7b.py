"""benchmarks/latency_7b.py: the pricing of an answer's rounds at 7B shape, and the script on the committed results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from latency_7b import answer_ms  # noqa: E402

C = {"target_vision": 10.0, "draft_vision": 10.0, "target_prefill": 70.0, "target_step": 7.0, "draft_prefill": 20.0,
     "draft_step": 7.5, "verify_vs_step": {1: 1.0, 2: 1.1, 3: 1.1, 4: 1.2, 5: 1.2, 6: 1.2}, "ngram_draft": 0.04,
     "head_prefill": 1.5, "tree_round_draft": 6.0, "tree_round_verify": 10.0}  # fmt: skip


def test_target_alone_pays_a_step_per_token_after_the_first():
    t = answer_ms({"tokens": 11, "accepted": [], "drafted": [], "free": 0}, C, "target")
    assert t == {"vision": 10.0, "prefill": 70.0, "draft": 0.0, "verify": 70.0}


def test_the_hybrid_waits_only_for_what_outlasts_the_targets_prefill():
    hit = {"tokens": 20, "accepted": [4, 8], "drafted": [4, 64], "free": 4, "prefill_hit": True}
    # 5 tokens in the shadow: 10 + 20 + 4 x 7.5 = 60 ms, under the target's 80: hidden on a second GPU
    t = answer_ms(hit, C, "hybrid", pre=5, overlap=True)
    assert t["vision"] == 10.0 and t["prefill"] == 70.0
    assert t["draft"] == pytest.approx(1.5 + 6.0)  # the head's catch-up, then its tree round
    assert t["verify"] == pytest.approx(1.2 * 7.0 + 10.0)  # round 1: a chain of 4; round 2: the tree
    # 11 tokens: 10 + 20 + 10 x 7.5 = 105 ms, 25 of them waited for; serially, all of it is paid
    assert answer_ms(hit, C, "hybrid", pre=11, overlap=True)["draft"] == pytest.approx(25 + 7.5)
    serial = answer_ms(hit, C, "hybrid", pre=11, overlap=False)
    assert (serial["vision"], serial["prefill"], serial["draft"]) == (20.0, 90.0, pytest.approx(75 + 7.5))
    # a missed guess: round 1 is the head's tree (the shadow's work is still waited for)
    miss = {**hit, "free": 0, "prefill_hit": False, "drafted": [64, 64]}
    t = answer_ms(miss, C, "hybrid", pre=5, overlap=True)
    assert t["draft"] == pytest.approx(1.5 + 6.0 + 6.0) and t["verify"] == pytest.approx(20.0)


def test_the_script_prices_the_committed_runs(tmp_path):
    out = tmp_path / "latency.json"
    proc = subprocess.run([sys.executable, str(BENCH / "latency_7b.py"), "--result", str(out)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["source"]: r for r in json.loads(out.read_text())["rows"]}
    alone = next(r for name, r in rows.items() if name.startswith("target alone ("))
    head = next(r for name, r in rows.items() if name.startswith("head, tree"))
    assert alone["speedup_vs_target_alone"] == 1.0 and head["speedup_vs_target_alone"] > 1.5
    for r in rows.values():
        if r["ms"] is not None:
            assert sum(r["ms"].values()) == pytest.approx(r["total_ms"], abs=0.05)
    assert any(name.startswith("hybrid") for name in rows) and out.with_suffix(".png").is_file()
