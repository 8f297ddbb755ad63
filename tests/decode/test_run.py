"""`run_speculate` on the bundled mini models: every bad input refused on one line before any model loads and with
nothing written, a results folder that cannot mix runs, honest verdicts, resolved paths, the sampling test."""

import json
import os
import random

import pytest
import torch

from specalign.align.heads import save_head
from specalign.decode.run import SpeculateConfig, chi_square, report_lines, run_speculate, total_variation
from specalign.errors import SpecalignError
from specalign.world.build import WorldConfig, build_world


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=0, test=2, clips_per_sequence=2, mp4=False), progress=False)
    return out / "my_egpt_dsec_seq_1s"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of two task folders; its `latest` link names the older one (the link wins over mtimes)."""
    from specalign.align.token_adapter import TokenAdapter, TokenAdapterConfig, save_adapter

    root = tmp_path_factory.mktemp("task")
    torch.manual_seed(0)
    cfg = TokenAdapterConfig(vocab_size=780, embed_dim=16, num_layers=1, num_heads=2, ffn_dim=32, max_positions=64)
    for name in ("t_old", "t_new"):
        save_adapter(TokenAdapter(cfg), root / name / "best_model")
        (root / name / "results.json").write_text(json.dumps({"status": "completed"}))
    os.symlink("t_old", root / "latest")
    return root


def config(split, out, **kw) -> SpeculateConfig:
    small = {"dataset": str(split), "max_new_tokens": 8, "repeats": 1, "hf_baseline": False, "device": "cpu",
             "max_samples": 2}  # fmt: skip
    return SpeculateConfig(out=str(out), **{**small, **kw})


@pytest.fixture(scope="module")
def greedy(split, tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "greedy"
    cfg = config(split, out, token_adapter=str(tasks), repeats=2, gamma=3)
    return out, run_speculate(cfg, progress=False)


def test_greedy_verdict_resolved_paths_and_repeated_timings(greedy, split, tasks):
    out, res = greedy
    assert res["verdict"]["line"] == "token-identical to the target alone: yes"
    assert res["lossless"] is True and all(r["sd_tokens"] == r["target_tokens"] for r in res["samples"])
    lines = report_lines(res)
    assert lines[0] == "token-identical to the target alone: yes"
    # the folder of task folders resolves through its `latest` link to an absolute best_model/
    assert res["paths"]["token_adapter"] == str((tasks / "t_old" / "best_model").resolve())
    assert res["config"]["token_adapter"] == str(tasks)
    assert res["paths"]["dataset"] == str(split.resolve())
    assert os.path.isabs(res["paths"]["target"]) and res["paths"]["target"].endswith("mini-target")
    for row in res["samples"]:  # 2 timings a side, the median (lower of two) kept
        s = row["seconds"]
        assert len(s["sd_runs"]) == len(s["target_alone_runs"]) == 2
        assert s["sd_total"] == min(s["sd_runs"]) and s["target_alone"] == min(s["target_alone_runs"])
    sp = res["totals"]["speedup_vs_target_alone"]
    assert sp["min"] <= sp["p10"] <= sp["median"] <= sp["p90"] <= sp["max"]
    assert sp["too_short"] and any(line.startswith("warning: too short to time well") for line in lines)
    assert "speedup vs target alone: median" in lines[2] and "overall" in lines[2]
    md = (out / "BENCHMARK_RESULTS.md").read_text()
    assert "**token-identical to the target alone: yes**" in md and str(tasks / "t_old") in md
    assert "lossless" not in md


def test_greedy_verdict_counts_differing_answers():
    from specalign.decode.run import verdict

    cfg = SpeculateConfig(dataset="d", out="o", device="cpu")
    v = verdict(cfg, [{"same": True}, {"same": False}, {"same": True}], None)
    assert v["line"] == "token-identical to the target alone: no (1 of 3 answers differ)"
    assert v["token_identical"] is False and v["answers_differing"] == 1


def test_other_settings_refused_then_overwrite_runs_sampling(greedy, split):
    """A re-run into a folder holding another run stops before any model loads and keeps the old results;
    --overwrite starts over. The sampling run's verdict never claims or denies token identity."""
    out, _ = greedy
    before = (out / "results.json").read_bytes()
    with pytest.raises(SpecalignError, match=r"holds a run with other settings \(gamma: 3 then, 4 now\)"):
        run_speculate(config(split, out, gamma=4), progress=False)
    assert (out / "results.json").read_bytes() == before
    cfg = config(split, out, temperature=0.8, gamma=2, max_samples=1, check_draws=4, overwrite=True)
    res = run_speculate(cfg, progress=False)
    assert res["config"]["temperature"] == 0.8 and json.loads((out / "results.json").read_text())["lossless"] is None
    line = res["verdict"]["line"]
    assert line.startswith("sampling: distribution-preserving rule (Leviathan et al.); token identity not expected")
    check = res["verdict"]["distribution_check"]
    assert check["run"] and check["draws"] == 4 and len(check["positions"]) == 2  # tokens 2..gamma+1
    text = "\n".join(report_lines(res)) + (out / "BENCHMARK_RESULTS.md").read_text()
    assert "lossless" not in text and "token-identical" not in text


def test_distribution_test_tells_one_distribution_from_two():
    """Same distribution: p below the run's 1 % threshold about 1 time in 100; different ones: always."""
    from specalign.decode.run import CHECK_ALPHA

    p, q = [0.5, 0.3, 0.15, 0.05], [0.3, 0.3, 0.3, 0.1]
    same = different = 0
    for seed in range(40):
        rng = random.Random(seed)
        a, b, c = (rng.choices(range(4), w, k=400) for w in (p, p, q))
        same += chi_square(a, b)[2] < CHECK_ALPHA
        different += chi_square(a, c)[2] < CHECK_ALPHA
        assert total_variation(a, b) < total_variation(a, c) + 0.05
    assert same <= 2 and different == 40
    assert chi_square([1] * 50, [1] * 50) == (0.0, 0, 1.0)  # one token on both sides: nothing to test


VALUES = [  # (config fields, the one-line message)
    ({"max_new_tokens": 0}, "--max-new-tokens: must be at least 1, got 0"),
    ({"temperature": -1.0}, "--temperature: must be 0 (greedy) or more, got -1.0"),
    ({"temperature": 1.0, "top_p": 0.0}, "--top-p: must be in (0, 1] (1 keeps every token), got 0.0"),
    ({"top_p": 1.5}, "--top-p: must be in (0, 1] (1 keeps every token), got 1.5"),
    ({"gamma": 0}, "--gamma: must be at least 1, got 0"),
    ({"min_confidence": 1.0}, "--min-confidence: must be in [0, 1) (0 turns adaptive gamma off), got 1.0"),
    ({"min_confidence": -0.5}, "--min-confidence: must be in [0, 1) (0 turns adaptive gamma off), got -0.5"),
    ({"repeats": 0}, "--repeats: must be at least 1, got 0"),
    ({"max_samples": 0}, "--max-samples: must be at least 1, got 0"),
    ({"questions": 0}, "--questions: must be at least 1, got 0"),
    ({"check_draws": -1}, "--check-draws: must be at least 0, got -1"),
    ({"prefill_draft": 1, "hide_prefill": True}, "--prefill-draft: must be at least 2, got 1"),
    ({"prefill_draft": 4}, "--prefill-draft: sets what the draft drafts under --hide-prefill; add it"),
    ({"seed": -1}, "--seed: must be an integer in [0, 2^32), got -1"),
    ({"engine": "fast"}, "--engine: unknown 'fast': choose graphs, split, gemv"),
    ({"dtype": "fp8"}, "--dtype: unknown precision 'fp8'"),
    ({"device": "gpu"}, "--device: 'gpu' is not a device; use cuda, cuda:N or cpu"),
    ({"token_adapter": " "}, "--token-adapter: empty path"),
    ({"draft_head": " "}, "--draft-head: empty path"),
    ({"draft_head": "h", "ngram": "t.json"}, "--draft-head: cannot be combined with --ngram"),
    ({"tree": "10,6,60"}, "--tree: needs --draft-head"),
    ({"tree": "10,6"}, "--tree: expected TOPK,DEPTH,NODES"),
    ({"tree": "2,2,40", "draft_head": "h"}, "--tree 2,2,40: top-k 2 and depth 2 make at most 6 candidates"),
    ({"tree": "4,4,16", "draft_head": "h", "temperature": 1.0}, "--tree: draft trees are greedy only"),
]


@pytest.mark.parametrize(("fields", "message"), VALUES, ids=[next(iter(f)) for f, _ in VALUES])
def test_bad_values_refused_by_the_config(fields, message, tmp_path):
    with pytest.raises(SpecalignError) as e:
        SpeculateConfig(dataset="d", out=str(tmp_path / "o"), **{"device": "cpu", **fields})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_refused_without_a_gpu():
    with pytest.raises(SpecalignError, match=r"^--device: cuda: no CUDA GPU is available here \(use cpu\)$"):
        SpeculateConfig(dataset="d", out="o", device="cuda")


def head(kind: str, hidden: int):
    """An untrained head for the mini target (hidden 256, vocab 780), or of another width."""
    from specalign.align.heads import HeadConfig, build_head

    torch.manual_seed(0)
    cfg = HeadConfig(kind=kind, hidden_size=hidden, vocab_size=780, feature_size=hidden, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=hidden // 4, intermediate_size=64,
                     draft_size=192 if kind == "feature-adapter" else None, target={"name": "mini-target"})  # fmt: skip
    return build_head(cfg)


def _inputs(split, tmp_path):
    """(case, config fields, the message's pattern) for bad inputs found before any model loads."""
    empty = tmp_path / "empty_split"
    empty.mkdir()
    (empty / "EventGPT_Instruction_Subset.json").write_text("[]")
    one = tmp_path / "one_question.json"
    one.write_text(json.dumps([{"question": "What is here?", "count": 1}]))
    no_tasks = tmp_path / "no_tasks"
    no_tasks.mkdir()
    corrupt = tmp_path / "corrupt" / "best_model"
    corrupt.mkdir(parents=True)
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    (corrupt / "config.json").write_text("{}")
    wide, truncated, cascade = (
        save_head(tmp_path / n, h)
        for n, h in (
            ("wide", head("eagle", 64)),
            ("truncated", head("eagle", 256)),
            ("cascade", head("feature-adapter", 256)),
        )
    )
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [
        ("missing split", {"dataset": str(tmp_path / "nowhere")}, r"nowhere: dataset folder not found"),
        ("empty split", {"dataset": str(empty)}, r"empty_split: the split has no samples"),
        ("fewer questions than asked", {"questions": 3, "questions_file": str(one)},
         r"--questions 3: .*one_question.json holds only 1 question"),
        ("missing adapter", {"token_adapter": str(tmp_path / "none")}, r"none: no such TokenAdapter"),
        ("folder without tasks", {"token_adapter": str(no_tasks)}, r"no_tasks: no task folder with a best_model/"),
        ("corrupt adapter", {"token_adapter": str(corrupt.parent)}, r"model.safetensors: not a readable safetensors"),
        ("missing head", {"draft_head": str(tmp_path / "no_head")}, r"no_head: no such draft head"),
        ("head for another target", {"draft_head": str(wide)}, r"a head trained for target .* \(hidden 64, vocab 780\) "
         r"cannot draft for target .* \(hidden 256, vocab 780\)"),
        ("truncated head", {"draft_head": str(truncated)}, r"model.safetensors: weights unreadable or truncated"),
        ("tree on a feature adapter", {"draft_head": str(cascade), "tree": "2,2,4"},
         r"a feature-adapter drafts through the draft VLM, one token at a time: no --tree"),
    ]  # fmt: skip


def test_bad_inputs_refused_before_any_model_loads(split, tmp_path, monkeypatch):
    import specalign.models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(specalign.models, "load_model", no_loading)
    for case, fields, pattern in _inputs(split, tmp_path):
        out = tmp_path / f"out_{case.replace(' ', '_')}"
        with pytest.raises(SpecalignError, match=pattern) as e:
            run_speculate(config(split, out, **fields), progress=False)
        assert "\n" not in str(e.value), case
        assert not out.exists(), f"{case}: something was written"


def test_unknown_model_refused_and_nothing_written(split, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SpecalignError, match="nope: no such model"):
        run_speculate(config(split, out, draft=str(tmp_path / "nope")), progress=False)
    assert not out.exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_fails_before_decoding(split, tmp_path, monkeypatch):
    import specalign.models

    monkeypatch.setattr(specalign.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SpecalignError, match=r"locked/out: cannot create directory \(Permission denied\)$"):
            run_speculate(config(split, locked / "out"), progress=False)
    finally:
        locked.chmod(0o755)
    assert not (locked / "out").exists()


def test_out_that_is_a_file_or_holds_other_files_is_refused(split, tmp_path, monkeypatch):
    import specalign.models

    monkeypatch.setattr(specalign.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    file = tmp_path / "a_file"
    file.write_text("mine")
    with pytest.raises(SpecalignError, match=r"a_file: cannot create directory"):
        run_speculate(config(split, file), progress=False)
    assert file.read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SpecalignError, match=r"other: is not empty and holds no specalign run of this kind"):
        run_speculate(config(split, other), progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]  # not even a lock file left


@pytest.mark.parametrize("tree", [None, "3,3,8"])
def test_an_untrained_head_drafts_losslessly(split, tmp_path, tree):
    """The whole path of --draft-head: resolve, check, load onto the target, a chain or a tree."""
    folder = save_head(tmp_path / "task" / "best_model", head("eagle", 256))
    res = run_speculate(config(split, tmp_path / "out", draft_head=str(folder.parent), tree=tree, gamma=3),
                        progress=False)  # fmt: skip
    assert res["verdict"]["token_identical"] and res["draft"] is None, "an eagle head needs no draft VLM"
    assert res["paths"]["draft_head"] == str(folder.resolve())
    rounds = [n for r in res["samples"] for n in r["nodes_per_round"]]
    assert rounds and (max(rounds) <= 8 if tree else set(rounds) <= {1, 2, 3})


def test_the_bundled_head_drafts_most_of_the_answer(split, tmp_path):
    """`--draft-head mini-head`: the trained head shipped in assets/ reads the mini target's features well enough
    that a tree round accepts several tokens on average (an untrained head accepts almost none)."""
    res = run_speculate(config(split, tmp_path / "out", draft_head="mini-head", tree="6,6,32", max_new_tokens=40),
                        progress=False)  # fmt: skip
    assert res["verdict"]["token_identical"]
    assert res["totals"]["tau"] > 3.5, res["totals"]


def test_the_gemv_engine_drafts_losslessly_and_is_recorded(split, tmp_path):
    """--engine gemv: the target's engine takes the setting (off a GPU its kernels' model path and the split-KV
    reference, blocks uncompiled), a head's tree stays lossless, and the result names the engine."""
    res = run_speculate(config(split, tmp_path / "out", draft_head="mini-head", tree="3,3,8", engine="gemv"),
                        progress=False)  # fmt: skip
    assert res["verdict"]["token_identical"] and res["config"]["engine"] == "gemv"


def test_hide_prefill_with_a_head_is_the_hybrid(split, tmp_path):
    """--hide-prefill with an eagle head: the draft VLM is loaded for the first round, drafted during the target's
    prefill; the head drafts every round after; the report names the schedule."""
    out = tmp_path / "out"
    res = run_speculate(config(split, out, draft_head="mini-head", hide_prefill=True, gamma=4), progress=False)
    assert res["verdict"]["token_identical"] and res["draft"] is not None
    assert "hybrid: the draft VLM drafts the first round" in (out / "BENCHMARK_RESULTS.md").read_text()
