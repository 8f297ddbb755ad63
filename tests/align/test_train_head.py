"""Training draft heads: on a real features run of the bundled models, and on a synthetic task it must learn."""

import json

import pytest
import torch
from processes import interrupt_at_call

from specalign.align.features import FeatureRecord
from specalign.align.heads import load_head
from specalign.align.train_head import (
    HeadTrainConfig,
    chain_accepted,
    result_lines,
    run_training,
    train_head,
)
from specalign.errors import SpecalignError
from specalign.models.registry import BUNDLED

pytestmark = pytest.mark.skipif(
    not all((p / "config.json").is_file() for p in BUNDLED.values()), reason="bundled models not present"
)


@pytest.fixture(autouse=True)
def one_thread():
    """Small matmuls on a shared 2-core machine: one thread is 10-20x faster than two spinning against others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """An extraction run with features of both bundled models (target layers too) over 6 clips."""
    from specalign.align.extract import ExtractConfig, extract
    from specalign.world.build import WorldConfig, build_world

    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=0, test=6, clips_per_sequence=3, mp4=False), progress=False)
    run = out / "feat"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(ExtractConfig(dataset=str(out / "my_egpt_dsec_seq_1s"), out=str(run), max_new_tokens=16,
                              device="cpu", hidden_states=True, hidden_layers=True, batch_size=6),
                progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return run


class Store:
    """An in-memory FeatureStore (meta, len, [i] -> FeatureRecord, keys): the synthetic task's data."""

    def __init__(self, records, meta):
        self.records, self.meta = records, meta

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def keys(self):
        return [(r.sample_idx, r.question_idx) for r in self.records]


def synthetic(n: int, seed: int) -> Store:
    """Sequences over 16 of mini-target's ids where token i + 2 = perm[token i]: the head must read the feature
    (a fixed random vector per token, as a target's state carries its token) and its input token together.
    The draft's state at answer row j is a noisy code of answer token j; events are noise."""
    g = torch.Generator().manual_seed(1234)  # the task (vocabulary, rule, codes) is the same for every split
    vocab = torch.randperm(700, generator=g)[:16] + 40
    perm = torch.randperm(16, generator=g)
    code = torch.randn(16, 256, generator=g)
    draft_code = torch.randn(16, 24, generator=g)
    g = torch.Generator().manual_seed(seed)
    records = []
    for s in range(n):
        seq = torch.randint(0, 16, (2,), generator=g).tolist()
        while len(seq) < 20:
            seq.append(int(perm[seq[-2]]))
        seq = torch.tensor(seq)
        k = 4
        records.append(FeatureRecord(
            sample_idx=s, question_idx=0, ids=vocab[seq], prompt_len=k, target=code[seq], layers=None,
            draft=draft_code[seq[k:]] + 0.3 * torch.randn(len(seq) - k, 24, generator=g),
            events=torch.randn(4, 24, generator=g)))  # fmt: skip
    meta = {"target": "mini-target", "draft": "synthetic", "target_hidden_size": 256, "target_vocab_size": 780,
            "draft_hidden_size": 24, "layer_indices": None, "records": n}  # fmt: skip
    return Store(records, meta)


def test_chain_accepted_counts_leading_hits():
    T = 6
    hit = torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    starts = torch.ones(1, T, dtype=torch.bool)
    # the same hits at every step (a feature adapter): from row s, the run of hits beginning at s, capped at 3
    assert chain_accepted([hit] * 3, starts).tolist() == [[2, 1, 0, 3, 2, 1]]
    # a chain whose second draft is always wrong accepts at most 1
    miss = torch.zeros(1, T, dtype=torch.bool)
    assert chain_accepted([hit, miss, hit], starts).tolist() == [[1, 1, 0, 1, 1, 1]]
    assert chain_accepted([hit] * 3, torch.zeros(1, T, dtype=torch.bool)).sum() == 0


@pytest.mark.parametrize("kind,layout", [("eagle", "specalign"), ("feature-adapter", "specalign"),
                                         ("eagle", "eagle-1")])  # fmt: skip
def test_synthetic_task_is_learned(tmp_path, kind, layout):
    """A few hundred steps drive eval top-1 from chance to near 1, and the chains get long (eagle: the head
    must learn to run on its own outputs, as training-time test teaches it; eagle-1: without its norms too)."""
    cfg = HeadTrainConfig(features="synthetic", kind=kind, out=str(tmp_path), epochs=12, batch_size=4,
                          warmup_steps=10, device="cpu", intermediate_size=128, ttt_steps=3,
                          layout=layout)  # fmt: skip
    res = run_training(cfg, synthetic(96, seed=0), synthetic(16, seed=1), progress=False)
    first, best = res["history"][0], res["best"]
    assert len(res["history"]) == 12 and res["train_sequences"] == 96 and res["eval_sequences"] == 16
    assert best["top1"] > 0.9 and best["top1"] > first["top1"] + 0.3, res["history"]
    assert best["tau"] > 4.0, best
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]


def test_trains_on_a_features_run(features, tmp_path):
    cfg = HeadTrainConfig(features=str(features), kind="eagle+events", out=str(tmp_path / "heads"), epochs=2,
                          batch_size=4, device="cpu", fused=True)  # fmt: skip
    res = train_head(cfg, progress=False)
    task = tmp_path / "heads" / res["task_dir"].split("/")[-1]
    assert task.name.startswith("eagle+events_") and (tmp_path / "heads" / "latest").resolve() == task.resolve()
    for name in ("results.json", "RESULTS.md", "training_curves.png", "last_state.pt", "best_model/config.json"):
        assert (task / name).is_file(), name
    assert res["train_sequences"] == 5 and res["eval_sequences"] == 1, "the last 10 % of the samples held out"
    best = res["best"]
    assert 0 <= best["top1"] <= best["top5"] <= 1 and 1 <= best["tau"] <= 1 + best["depth"]
    assert len(best["accept_at_depth"]) == best["depth"] and best["rows"] > 0
    assert json.loads((task / "results.json").read_text())["best_epoch"] == res["best_epoch"]
    lines = result_lines(res)
    assert len(lines) == 2 and "top-1" in lines[0] and "tau" in lines[0]
    # the saved head loads onto the target it was trained for and reads the events
    from specalign.models import load_model

    head = load_head(task / "best_model", target_vlm=load_model("mini-target"))
    assert head.head_config.fused and head.head_config.target["name"] == "mini-target"
    # resuming with other settings is refused on one line; with the same ones, a finished run stays as it is
    other = HeadTrainConfig(**{**cfg.__dict__, "lr": 1e-4, "resume": str(task)})
    with pytest.raises(SpecalignError) as e:
        train_head(other, progress=False)
    assert "\n" not in str(e.value) and "lr" in str(e.value)
    again = train_head(HeadTrainConfig(**{**cfg.__dict__, "resume": str(task)}), progress=False)
    assert again["history"] == res["history"]


def test_bad_inputs(features, tmp_path):
    with pytest.raises(SpecalignError, match="no such folder"):
        train_head(HeadTrainConfig(features=str(tmp_path / "nope"), out=str(tmp_path)), progress=False)
    with pytest.raises(SpecalignError, match="--kind"):
        HeadTrainConfig(features=str(features), kind="medusa")
    with pytest.raises(SpecalignError, match="--ttt-steps"):
        HeadTrainConfig(features=str(features), ttt_steps=0)
    with pytest.raises(SpecalignError, match="--holdout"):
        HeadTrainConfig(features=str(features), holdout=1.0)
    cfg = HeadTrainConfig(features=str(features), out=str(tmp_path), holdout=0.0, device="cpu")
    with pytest.raises(SpecalignError, match="too few to hold out"):
        train_head(cfg, progress=False)


def test_fused_needs_layers(tmp_path):
    store = synthetic(8, seed=0)
    cfg = HeadTrainConfig(features="synthetic", out=str(tmp_path), fused=True, device="cpu")
    with pytest.raises(SpecalignError, match="no low/mid/high-layer features"):
        run_training(cfg, store, progress=False)


def test_resume_after_a_kill_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    import specalign.align.train_head as th

    cfg = HeadTrainConfig(features="synthetic", kind="eagle", out=str(tmp_path / "a"), epochs=3, batch_size=8,
                          device="cpu", intermediate_size=64, ttt_steps=2)  # fmt: skip
    whole = run_training(cfg, synthetic(24, seed=0), synthetic(8, seed=1), progress=False)
    # the process dies after epoch 2's training steps, before its state is saved
    real = interrupt_at_call(monkeypatch, th, "evaluate", 2)
    cfg_b = HeadTrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")})
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg_b, synthetic(24, seed=0), synthetic(8, seed=1), progress=False)
    monkeypatch.setattr(th, "evaluate", real)
    (task,) = (tmp_path / "b").iterdir()
    assert not (task / "results.json").exists()
    resumed = run_training(HeadTrainConfig(**{**cfg_b.__dict__, "resume": str(task)}), synthetic(24, seed=0),
                           synthetic(8, seed=1), progress=False)  # fmt: skip
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(whole["history"], resumed["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6) and a["top1"] == b["top1"]
