"""benchmarks/heads_7b.py --smoke: every code path of the 7B feature-drafting benchmark on tiny shapes on the CPU
(head chain step, tree expansion and feeds, tree verify, keep, and the replay of a synthetic traces folder)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one process importing torch and transformers, ~25 s on 2 CPU cores

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "heads_7b.py"


def test_smoke_measures_every_part_and_replays_the_traces(tmp_path):
    result = tmp_path / "heads_7b.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--result", str(result)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(result.read_text())
    assert res["target"]["decode_step_ms"] > 0
    head = res["head"]
    assert head["chain_step_ms"] > 0 and set(head["tree_expansion"]) == {"10", "8"}
    assert set(head["feed"]) == {str(n) for n in range(1, 8)}
    # the head's own weights exclude the target's LM head it reads every step
    assert 0 < head["bytes_per_step"]["own_weights"] < head["bytes_per_step"]["total"]
    assert set(res["verify"]["tree_verify"]) == {"16", "32", "64"}
    assert res["verify"]["keep"]["path"] == 6 and res["verify"]["keep"]["ms"] > 0
    rows = {r["source"]: r for r in res["projection"]}
    # the synthetic folder: ngram and eagle chains, eagle and fused eagle+events trees; draft-VLM and cascade skipped
    assert set(rows) == {"ngram, chain \u03b3=4", "eagle, chain \u03b3=4", "eagle, tree 3,3,6",
                         "eagle+events (fused), tree 2,3,5"}  # fmt: skip
    assert len(res["projection_skipped"]) == 2
    for r in rows.values():
        assert r["answers"] == 3 and len(r["per_answer"]) == 3
        assert r["label"].startswith("projection")
        for key in ("decode_speedup", "e2e_speedup"):
            assert 0 < r[key]["p10"] <= r[key]["median"] <= r[key]["p90"]
    assert rows["ngram, chain \u03b3=4"]["head_parameters"] == 0
    assert rows["eagle+events (fused), tree 2,3,5"]["head_parameters"] > rows["eagle, tree 3,3,6"]["head_parameters"]
    assert rows["eagle+events (fused), tree 2,3,5"]["vision_ms"] > rows["eagle, tree 3,3,6"]["vision_ms"]
    assert "projection" in res["projection_note"]
    assert result.with_suffix(".png").stat().st_size > 10_000


def test_bad_traces_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--traces", str(tmp_path), "--result",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}: no source*/results.json here (the --runs folder "
                                                "of benchmarks/speculate_mini.py)"]  # fmt: skip
    assert not (tmp_path / "r.json").exists()
