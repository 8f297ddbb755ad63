"""TokenAdapter training: learns a synthetic draft->target mapping, writes the task folder, stops on NaN, resumes."""

import json
import random

import pytest
import torch
from PIL import Image

import specalign.align.train as train_mod
from specalign.align import load_adapter
from specalign.align.tokens import TokenPairs, write_reference_json
from specalign.align.train import AdapterTrainConfig, train_adapter
from specalign.errors import SpecalignError

VOCAB = 40


def synthetic(n: int, seed: int, perm: list[int]) -> TokenPairs:
    """target[i+1] = perm[draft[i]]: learnable from the draft prefix, while draft[j] != target[j] almost always."""
    rng = random.Random(seed)
    pairs = TokenPairs()
    for _ in range(n):
        d = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(6, 11))]
        pairs.draft.append(d)
        pairs.target.append([rng.randrange(1, VOCAB)] + [perm[t] for t in d[:-1]])
    return pairs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    rng = random.Random(0)
    perm = list(range(1, VOCAB))
    rng.shuffle(perm)
    perm = [0] + perm
    write_reference_json(synthetic(384, 1, perm), root / "train.json")
    write_reference_json(synthetic(96, 2, perm), root / "test.json")
    return root


def config(files, tmp_path, **kw) -> AdapterTrainConfig:
    base = dict(train=str(files / "train.json"), test=str(files / "test.json"), out=str(tmp_path / "task"),
                epochs=8, batch_size=32, lr=1e-2, warmup_steps=5, early_stopping=999, vocab_size=VOCAB,
                embed_dim=32, num_layers=1, num_heads=2, ffn_dim=64, dropout=0.0, device="cpu",
                checkpoint_every_s=0.0)  # fmt: skip
    return AdapterTrainConfig(**{**base, **kw})


def test_learns_mapping_and_writes_task_folder(files, tmp_path):
    res = train_adapter(config(files, tmp_path))
    best = res["best"]
    assert best["top1"] > 0.9, res["history"]
    assert best["top1"] > best["baseline"] + 0.7 and best["baseline"] < 0.1
    assert best["top5"] >= best["top1"]
    assert len(best["per_position"]) == 10 and best["per_position"][-1] is None  # last draft pos has no label
    task = tmp_path / "task" / res["task_dir"].split("/")[-1]
    assert task.name.startswith("adapter_")
    for name in ("results.json", "RESULTS.md", "last_state.pt", "best_model/model.safetensors",
                 "best_model/config.json", "training_curves.png", "loss_curve.png", "accuracy_curve.png"):  # fmt: skip
        assert (task / name).is_file(), name
    for name in ("training_curves.png", "loss_curve.png", "accuracy_curve.png"):
        with Image.open(task / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    saved = json.loads((task / "results.json").read_text())
    assert len(saved["history"]) == 8 and saved["best_epoch"] == best["epoch"]
    assert {"train_loss", "test_loss", "top1", "top5"} <= set(saved["history"][0])
    assert "| epoch |" in (task / "RESULTS.md").read_text()
    adapter = load_adapter(task / "best_model")
    assert adapter.config.vocab_size == VOCAB and adapter.config.embed_dim == 32


def test_vocab_mismatch_is_one_line_error(files, tmp_path):
    big = TokenPairs(draft=[[1, 2, 70]], target=[[3, 4, 5]])
    write_reference_json(big, tmp_path / "big.json")
    with pytest.raises(SpecalignError) as e:
        train_adapter(config(files, tmp_path, test=str(tmp_path / "big.json")))
    assert "big.json" in str(e.value) and "70" in str(e.value) and "\n" not in str(e.value)


def test_nan_loss_stops_and_keeps_best(files, tmp_path, monkeypatch):
    real = train_mod.adapter_loss
    calls = {"epoch_steps": 0}

    def flaky(logits, draft, target, pad_id=0, label_smoothing=0.1):
        loss = real(logits, draft, target, pad_id, label_smoothing)
        if torch.is_grad_enabled():  # training steps only; 12 batches an epoch -> NaN during epoch 3
            calls["epoch_steps"] += 1
            if calls["epoch_steps"] > 24:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod, "adapter_loss", flaky)
    with pytest.raises(SpecalignError, match="NaN") as e:
        train_adapter(config(files, tmp_path, epochs=5))
    assert "\n" not in str(e.value)
    task = next((tmp_path / "task").glob("adapter_*"))
    saved = json.loads((task / "results.json").read_text())
    assert saved["status"] == "nan" and len(saved["history"]) == 2 and saved["best_epoch"] in (1, 2)
    assert (task / "best_model" / "model.safetensors").is_file()


def test_resume_continues_from_saved_epoch(files, tmp_path, monkeypatch):
    real = train_mod.evaluate
    seen = []

    def crash_in_epoch_3(*args, **kw):  # an interrupted 4-epoch run: last_state.pt holds epoch 2
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "evaluate", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config(files, tmp_path / "a", epochs=4))
    monkeypatch.setattr(train_mod, "evaluate", real)
    task = next((tmp_path / "a" / "task").glob("adapter_*"))
    assert not (task / "results.json").exists()
    res = train_adapter(config(files, tmp_path / "a", epochs=4, resume=str(task)))
    assert res["task_dir"] == str(task)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    # model, optimizer, schedule, data order and RNG restored -> the same numbers as an uninterrupted run
    straight = train_adapter(config(files, tmp_path / "b", epochs=4))
    for a, b in zip(res["history"], straight["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["top1"] == pytest.approx(b["top1"])
    with pytest.raises(SpecalignError, match="last_state.pt"):
        train_adapter(config(files, tmp_path, resume=str(tmp_path)))
    with pytest.raises(SpecalignError, match="other settings .embed_dim: 32 then, 16 now") as e:  # another size
        train_adapter(config(files, tmp_path / "a", epochs=4, embed_dim=16, resume=str(task)))
    assert "\n" not in str(e.value)


def test_early_stopping_on_test_top1(files, tmp_path):
    res = train_adapter(config(files, tmp_path, epochs=20, early_stopping=2))
    assert res["status"] == "early_stopped"
    assert len(res["history"]) == res["best_epoch"] + 2 < 20


DDP_SCRIPT = """
import json, sys
from specalign.align.train import AdapterTrainConfig, train_adapter
cfg = AdapterTrainConfig(**json.loads(sys.argv[1]))
res = train_adapter(cfg)
print("RESULT", json.dumps({"history": res["history"], "task_dir": res["task_dir"]}))
"""


def test_ddp_on_two_cpu_processes_trains_like_one(files, tmp_path):
    """torchrun with 2 processes (gloo): each rank takes half of every global batch, DDP averages the gradients;
    rank 0 alone writes the task folder. The curve follows the single-process run."""
    import dataclasses
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    cfg = config(files, tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script), json.dumps(dataclasses.asdict(cfg))],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2 and results[0] == results[1], "both ranks end with the same history"
    tasks = list((tmp_path / "ddp" / "task").glob("adapter_*"))
    assert (tmp_path / "ddp" / "task" / "latest").resolve() == tasks[0]
    assert len(tasks) == 1 and (tasks[0] / "results.json").is_file() and (tasks[0] / "best_model").is_dir()
    single = train_adapter(config(files, tmp_path / "one"))["history"]
    ddp = results[0]["history"]
    assert ddp[-1]["top1"] > 0.9
    for a, b in zip(single, ddp, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.1)
