"""`extract` and `train` SIGKILLed at random points resume to exactly what an uninterrupted run makes: no pair lost or
duplicated, the same pairs and the same adapter weights, no temp file left."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from specalign.align.extract import ExtractConfig, extract
from specalign.align.tokens import TokenPairs, write_reference_json
from specalign.fsutil import TEMP_NAME
from specalign.models.registry import BUNDLED
from specalign.world.build import WorldConfig, build_world

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow  # a handful of processes, each importing torch


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if TEMP_NAME.fullmatch(p.name)]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL proc once ready() holds (True), or let it end first (False)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.wait()
    return False


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# ---------------------------------------------------------------- extract


@pytest.mark.skipif(not all((p / "config.json").is_file() for p in BUNDLED.values()), reason="no bundled models")
def test_killed_extraction_resumes_to_the_same_pairs(tmp_path):
    world = tmp_path / "w"
    build_world(WorldConfig(out=str(world), train=0, test=3, clips_per_sequence=3, mp4=False), progress=False)
    split = world / "my_egpt_dsec_seq_1s"
    settings = dict(dataset=str(split), questions=2, max_new_tokens=6, batch_size=2, device="cpu")
    extract(ExtractConfig(out=str(tmp_path / "ref"), **settings), progress=False)
    reference = (tmp_path / "ref" / "pairs.jsonl").read_bytes()
    jobs = 3 * 2  # samples x questions, per role

    out = tmp_path / "x"
    args = [sys.executable, "-m", "specalign", "extract", "--quiet", "--out", str(out),
            *[a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]]  # fmt: skip
    rng = np.random.default_rng(14)
    # kill once this many generations (of 2 x 6: draft, then target) are on disk
    for point in sorted(rng.choice(np.arange(1, 2 * jobs), 2, replace=False)):
        proc = subprocess.Popen(args, env=ENV, stderr=subprocess.DEVNULL)
        kill_when(proc, lambda p=point: lines(out / "draft.rank0.jsonl") + lines(out / "target.rank0.jsonl") >= p)
    extract(ExtractConfig(out=str(out), **settings), progress=False)
    assert (out / "pairs.jsonl").read_bytes() == reference, "the same pairs, none lost, none duplicated"
    for role in ("draft", "target"):
        keys = [(r["sample_idx"], r["question_idx"]) for r in map(json.loads, (out / f"{role}.rank0.jsonl").open())]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == jobs, "each generation written once"
    assert not temp_files(out)


# ---------------------------------------------------------------- train


def synthetic(n: int, seed: int) -> TokenPairs:
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(0).permutation(np.arange(1, 40))
    draft = rng.integers(1, 40, size=(n, 10))
    target = np.concatenate([rng.integers(1, 40, size=(n, 1)), perm[draft[:, :-1] - 1]], axis=1)
    return TokenPairs(draft=draft.tolist(), target=target.tolist())


TRAIN = "import json, sys; from specalign.align.train import AdapterTrainConfig, train_adapter; " \
        "train_adapter(AdapterTrainConfig(**json.loads(sys.argv[1])), progress=False)"  # fmt: skip


def weights(task: Path) -> str:
    return hashlib.sha256((task / "best_model" / "model.safetensors").read_bytes()).hexdigest()


def train(cfg: dict) -> subprocess.Popen:
    """A training process (all runs in processes with one thread, so every float adds up in the same order)."""
    return subprocess.Popen([sys.executable, "-c", TRAIN, json.dumps(cfg)], env=ENV, stderr=subprocess.PIPE)


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    write_reference_json(synthetic(192, 1), tmp_path / "train.json")
    write_reference_json(synthetic(48, 2), tmp_path / "test.json")
    settings = dict(train=str(tmp_path / "train.json"), test=str(tmp_path / "test.json"), epochs=6, batch_size=16,
                    lr=3e-3, warmup_steps=4, early_stopping=999, vocab_size=40, embed_dim=32, num_layers=1,
                    num_heads=2, ffn_dim=64, device="cpu", checkpoint_every_s=0.0)  # fmt: skip
    reference = train({**settings, "out": str(tmp_path / "ref")})

    out = tmp_path / "task"
    cfg = {**settings, "out": str(out)}
    rng = np.random.default_rng(14)
    saves = 0
    # kill after this many epochs' state saves, then a moment later (mid-epoch or mid-save)
    for point in sorted(rng.choice(np.arange(1, 5), 2, replace=False)):
        proc = train(cfg)
        seen = {"mtime": None, "n": saves, "delay": rng.uniform(0, 0.05)}

        def ready(point=point, seen=seen):
            found = next(out.glob("adapter_*/last_state.pt"), None)
            if found is not None and found.stat().st_mtime_ns != seen["mtime"]:
                seen["mtime"], seen["n"] = found.stat().st_mtime_ns, seen["n"] + 1
            if seen["n"] >= point:
                time.sleep(seen["delay"])
                return True
            return False

        assert kill_when(proc, ready), "the run ended before the kill point"
        saves = seen["n"]
        cfg = {**settings, "out": str(out), "resume": str(next(out.glob("adapter_*")))}
    proc = train(cfg)
    assert proc.wait() == 0 and reference.wait() == 0, proc.stderr.read()[-2000:]
    task = Path(cfg["resume"])
    assert len(list(out.glob("adapter_*"))) == 1
    res, straight = (json.loads((t / "results.json").read_text()) for t in (task, next((tmp_path / "ref").glob("a*"))))
    assert [h["epoch"] for h in res["history"]] == list(range(1, 7)), "no epoch lost or repeated in the record"
    assert res["history"] == straight["history"], "the same curve"
    assert weights(task) == weights(Path(straight["task_dir"])), "the same weights"
    assert not temp_files(out)
    assert (out / "latest").resolve() == task
