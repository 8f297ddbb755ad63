"""The 1q workflow end to end on a tiny world with the bundled models; a re-run resumes (skips) every stage, a re-run
with other settings is refused, and --overwrite starts over; --until splits a run by stage."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from specalign.align.workflow import WorkflowConfig, run_workflow
from specalign.errors import SpecalignError
from specalign.models.registry import BUNDLED
from specalign.world.build import WorldConfig, build_world

pytestmark = pytest.mark.skipif(
    not all((p / "config.json").is_file() for p in BUNDLED.values()), reason="bundled models not present"
)


def test_workflow_1q_runs_and_resumes(tmp_path):
    build_world(WorldConfig(out=str(tmp_path / "w"), train=6, test=2, clips_per_sequence=2, mp4=False), progress=False)
    cfg = WorkflowConfig(name="1q", train=str(tmp_path / "w/my_egpt_dsec_train_1s"),
                         test=str(tmp_path / "w/my_egpt_dsec_seq_1s"), out=str(tmp_path / "runs"), epochs=2,
                         embed_dim=32, num_layers=1, num_heads=2, lr=1e-3, max_new_tokens=16, device="cpu")  # fmt: skip
    run = tmp_path / "runs" / "1q"
    # --until: a run split by stage; the same command without it continues where the last one stopped
    part = run_workflow(replace(cfg, until="extract"), progress=False)
    assert part["until"] == "extract" and part["task"] is None
    assert (run / "extract_test/pairs.jsonl").is_file() and not (run / "task").exists()
    assert not (run / "summary.json").exists()
    part = run_workflow(replace(cfg, until="train"), progress=False)
    assert (Path(part["task"]) / "best_model").is_dir() and not (run / "eval.json").exists()
    s = run_workflow(cfg, progress=False)
    assert s["task"] == part["task"], "the finished training is reused"
    assert s["train_pairs"] == 6 and s["test_pairs"] == 2
    for f in ("workflow.log", "eval.json", "summary.json", "extract_train/pairs.jsonl", "extract_test/pairs.jsonl"):
        assert (run / f).is_file(), f
    again = run_workflow(cfg, progress=False)
    assert again["task"] == s["task"] and again["top1"] == s["top1"], "a re-run resumes, it does not retrain"
    assert "already finished" in (run / "workflow.log").read_text()
    assert json.loads((run / "eval.json").read_text())["count"] == 2

    # another split or other flags: refused on one line naming the first difference; nothing is changed
    with pytest.raises(SpecalignError, match="epochs: 2 then, 3 now"):
        run_workflow(replace(cfg, epochs=3), progress=False)
    with pytest.raises(SpecalignError, match=r"test\.path: .*seq_1s' then, .*train_1s' now"):
        run_workflow(replace(cfg, test=cfg.train), progress=False)
    assert json.loads((run / "summary.json").read_text()) == again
    fresh = run_workflow(replace(cfg, max_samples=2, epochs=1, overwrite=True), progress=False)
    assert fresh["train_pairs"] == 2 and fresh["task"] != s["task"]
    assert len(list((run / "task").glob("1q_*"))) == 1, "the old run was cleared"
