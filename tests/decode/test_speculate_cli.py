"""`specalign speculate` end to end on the bundled models: results.json, the report, the plots, bad input."""

import json

import pytest

from specalign.cli import main
from specalign.world.build import WorldConfig, build_world


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=0, test=2, clips_per_sequence=2, mp4=False), progress=False)
    return out / "my_egpt_dsec_seq_1s"


def test_speculate_writes_a_lossless_report(split, tmp_path, capsys):
    out = tmp_path / "spec"
    args = ["speculate", "--dataset", str(split), "--out", str(out), "--questions", "2", "--gamma", "3",
            "--max-new-tokens", "16", "--repeats", "1", "--device", "cpu", "--hide-prefill", "--quiet"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["lossless"] is True and res["totals"]["answers"] == 4
    assert res["totals"]["speedup_vs_hf_generate"] > 0  # HF generate timed by default
    assert res["config"]["fp32_head"] is True  # the default: bf16 logit ties cannot split decode from verify
    for row in res["samples"]:
        assert row["sd_tokens"] == row["target_tokens"]
        assert sum(row["accepted_per_round"]) == row["accepted"] <= row["drafted"] == sum(row["drafted_per_round"])
    assert set(res["totals"]["stage_seconds"]) == {"vision", "prefill", "draft", "adapt", "verify"}
    assert "**token-identical to the target alone: yes**" in (out / "BENCHMARK_RESULTS.md").read_text()
    for png in ("timing_breakdown.png", "acceptance_histogram.png", "speedup.png"):
        assert (out / png).stat().st_size > 5000
    console = capsys.readouterr().out.splitlines()
    assert console[0] == "token-identical to the target alone: yes"
    assert console[2].startswith("speedup vs target alone: median") and "vs HF generate" in console[2]
    assert console[3].startswith("warning: too short to time well (4 answers")


def test_speculate_refuses_bad_input(split, tmp_path, capsys):
    base = ["speculate", "--dataset", str(split), "--out", str(tmp_path / "x"), "--device", "cpu", "--quiet"]
    assert main([*base, "--gamma", "0"]) == 2
    assert capsys.readouterr().err == "error: --gamma: must be at least 1, got 0\n"
    assert main([*base, "--token-adapter", str(tmp_path / "missing")]) == 2
    assert "missing: no such TokenAdapter" in capsys.readouterr().err
    assert main([*base, "--temperature", "1", "--top-p", "0"]) == 2
    assert capsys.readouterr().err == "error: --top-p: must be in (0, 1] (1 keeps every token), got 0.0\n"
    assert not (tmp_path / "x").exists()


def test_fp32_head_is_on_unless_turned_off():
    from specalign.cli import build_parser

    base = ["speculate", "--dataset", "d", "--out", "o"]
    assert build_parser().parse_args(base).fp32_head is True
    assert build_parser().parse_args([*base, "--no-fp32-head"]).fp32_head is False
