"""benchmarks/multi_gpu.py on tiny sizes: each part runs through torchrun with one process and with two, and the
two runs agree (extraction's pairs byte for byte, DDP's curve within 10 % of one process's loss). On the CPU over
gloo (--smoke) everywhere; on two GPUs over NCCL (--tiny) where a host has them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "multi_gpu.py"


def run_and_check(flag: str, result: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), flag, "--result", str(result)], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads(result.read_text())["parts"]
    assert set(parts) == {"extract_7b", "extract_mini", "train"}
    for part in parts.values():
        assert [r["world_size"] for r in part["rows"]] == [1, 2] and part["scaling"] > 0
    one, two = parts["extract_7b"]["rows"]
    assert two["pairs"] == 2 * one["pairs"] and len(two["rank_seconds"]) == 2, "each rank ran its own batches"
    assert parts["extract_mini"]["pairs_identical"] and parts["extract_mini"]["rows"][0]["pairs"] > 0
    single, ddp = (r["curve"] for r in parts["train"]["rows"])
    assert len(single) == len(ddp) == 2
    for a, b in zip(single, ddp, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.1)


@pytest.mark.slow
def test_smoke_runs_every_part_on_one_and_two_cpu_processes(tmp_path):
    run_and_check("--smoke", tmp_path / "multi_gpu.json")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tiny_runs_every_part_on_one_and_two_gpus(tmp_path):
    run_and_check("--tiny", tmp_path / "multi_gpu.json")
