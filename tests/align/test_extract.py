"""Paired extraction with the bundled models: resumable, no lost or duplicated pair, both modes agree."""

import json

import pytest
import torch

from specalign.align.extract import ExtractConfig, extract, summary_line
from specalign.cli import main
from specalign.errors import SpecalignError
from specalign.models.registry import BUNDLED
from specalign.world.build import WorldConfig, build_world

pytestmark = pytest.mark.skipif(
    not all((p / "config.json").is_file() for p in BUNDLED.values()), reason="bundled models not present"
)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=0, test=2, clips_per_sequence=2, mp4=False), progress=False)
    return out / "my_egpt_dsec_seq_1s"


def pairs(folder):
    return [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]


def test_extract_resumes_after_a_kill(split, tmp_path):
    cfg = ExtractConfig(dataset=str(split), out=str(tmp_path / "x"), questions=2, max_new_tokens=12, batch_size=3,
                        device="cpu")  # fmt: skip
    m = extract(cfg, progress=False)
    assert m["pairs"] == 4 and m["peak_memory_gb"] > 0
    full = pairs(tmp_path / "x")
    assert [(p["sample_idx"], p["question_idx"]) for p in full] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(p["egpt_tokens"] and p["vl_tokens"] for p in full)
    assert full[0]["query"] == "What are the key elements in this scene?"
    # killed while writing the target's second batch: one finished line, then a torn one
    shard = tmp_path / "x" / "target.rank0.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text(lines[0] + "\n" + lines[1][:20])
    (tmp_path / "x" / "pairs.jsonl").unlink()
    extract(cfg, progress=False)
    assert pairs(tmp_path / "x") == full, "same pairs, none lost, none duplicated"
    assert len(shard.read_text().splitlines()) == 4


def test_parallel_mode_matches_sequential(split, tmp_path, capsys):
    args = ["extract", "--dataset", str(split), "--questions", "1", "--max-new-tokens", "8", "--device", "cpu",
            "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "s")]) == 0
    assert main([*args, "--out", str(tmp_path / "p"), "--mode", "parallel"]) == 0
    assert pairs(tmp_path / "s") == pairs(tmp_path / "p")
    assert "2 pairs" in capsys.readouterr().out


def test_bad_questions_file(split, tmp_path, capsys):
    bad = tmp_path / "q.json"
    bad.write_text('{"question": "not a list"}')
    assert main(["extract", "--dataset", str(split), "--out", str(tmp_path / "o"), "--questions-file", str(bad),
                 "--device", "cpu", "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err


def store_tensors(out):
    """{(role, key): tensor} of a run's FeatureStore (what two runs compare)."""
    from specalign.align.features import FeatureStore, load_all

    got = {}
    for r in load_all(FeatureStore(out)):
        for name in ("ids", "target", "layers", "draft", "events"):
            got[(name, r.sample_idx, r.question_idx)] = getattr(r, name)
    return got


def assert_same_features(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None:
            assert b[k] is None, k
        else:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=str(k))


def index_lines(out):
    return [json.loads(line) for line in (out / "features" / "index.jsonl").read_text().splitlines()]


def test_hidden_states_run_its_settings_and_a_resume(split, tmp_path, capsys):
    from specalign.align.features import FeatureStore

    cfg = ExtractConfig(dataset=str(split), out=str(tmp_path / "h"), questions=2, max_new_tokens=10, batch_size=2,
                        device="cpu", hidden_states=True)  # fmt: skip
    m = extract(cfg, progress=False)
    assert m["features"] == 4 and set(m["feature_seconds_rank0"]) == {"target", "draft"}
    assert summary_line(m, tmp_path / "h").endswith(f"features of 4 answers in {tmp_path / 'h' / 'features'}")
    store = FeatureStore(tmp_path / "h")
    assert len(store) == 4 and store.meta["layer_indices"] is None and store[0].layers is None
    assert [(p["sample_idx"], p["question_idx"]) for p in pairs(tmp_path / "h")] == store.keys()
    reference = store_tensors(tmp_path / "h")
    # killed in the draft's feature pass, between a batch's file and its index lines, the last line torn
    features = tmp_path / "h" / "features"
    (tmp_path / "h" / "manifest.json").unlink()
    lines = (features / "index.jsonl").read_text().splitlines()
    assert [r["role"] for r in map(json.loads, lines)] == ["target"] * 4 + ["draft"] * 4, "target first"
    (features / "index.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])
    extract(cfg, progress=False)
    index = index_lines(tmp_path / "h")
    keys = [(r["role"], r["sample_idx"], r["question_idx"]) for r in index]
    assert len(keys) == len(set(keys)) == 8, "every answer indexed once per role"
    named = {r["file"] for r in index}
    assert named == {f.name for f in features.glob("*.safetensors")}, "no file without a line, no line without a file"
    assert_same_features(store_tensors(tmp_path / "h"), reference)
    # the same folder asked for with other feature settings is another run: refused on one line
    for change, then_now in (({"hidden_layers": True}, "hidden_layers: false then, true now"),
                             ({"hidden_states": False}, "hidden_states: true then, false now")):  # fmt: skip
        with pytest.raises(SpecalignError, match=then_now) as e:
            extract(ExtractConfig(**{**cfg.__dict__, **change}), progress=False)
        assert "\n" not in str(e.value)
    assert len(FeatureStore(tmp_path / "h")) == 4, "the refused runs changed nothing"
    plain = extract(ExtractConfig(**{**cfg.__dict__, "hidden_states": False, "overwrite": True}), progress=False)
    assert plain["pairs"] == 4 and "features" not in plain
    with pytest.raises(SpecalignError, match="no features in this run"):
        FeatureStore(tmp_path / "h")
    # --hidden-layers alone is refused on one line, before anything runs
    assert main(["extract", "--dataset", str(split), "--out", str(tmp_path / "l"), "--hidden-layers", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--hidden-layers: needs --hidden-states" in err and not (tmp_path / "l").exists()


def test_killed_feature_extraction_resumes_with_no_duplicate_and_no_dangling_line(split, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from specalign.fsutil import TEMP_NAME

    settings = dict(dataset=str(split), questions=2, max_new_tokens=8, batch_size=2, device="cpu",
                    hidden_states=True, hidden_layers=True)  # fmt: skip
    extract(ExtractConfig(out=str(tmp_path / "ref"), **settings), progress=False)
    out = tmp_path / "x"
    args = [sys.executable, "-m", "specalign", "extract", "--quiet", "--out", str(out), "--hidden-states",
            "--hidden-layers", *[a for k, v in settings.items() if not k.startswith("hidden")
                                 for a in (f"--{k.replace('_', '-')}", str(v))]]  # fmt: skip
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    index = out / "features" / "index.jsonl"
    deadline = time.time() + 120
    # killed once the target's first feature batch is indexed: in its second, or in the draft's generation or
    # features (a torn line and a file without its lines: test_hidden_states_run_its_settings_and_a_resume)
    while proc.poll() is None and time.time() < deadline:
        if index.exists() and index.read_bytes().count(b"\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill point"
    extract(ExtractConfig(out=str(out), **settings), progress=False)
    lines = index_lines(out)
    keys = [(r["role"], r["sample_idx"], r["question_idx"]) for r in lines]
    assert len(keys) == len(set(keys)) == 8, "every answer indexed once per role"
    assert {r["file"] for r in lines} == {f.name for f in (out / "features").glob("*.safetensors")}
    assert not [p for p in out.rglob(".*") if TEMP_NAME.fullmatch(p.name)]
    assert_same_features(store_tensors(out), store_tensors(tmp_path / "ref"))
    assert (out / "pairs.jsonl").read_bytes() == (tmp_path / "ref" / "pairs.jsonl").read_bytes()


def test_two_ranks_under_torchrun_give_the_same_pairs_and_features(split, tmp_path):
    import os
    import subprocess
    import sys

    args = ["extract", "--dataset", str(split), "--questions", "2", "--max-new-tokens", "8", "--device", "cpu",
            "--hidden-states", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29518", "-m", "specalign", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "two" / "draft.rank1.jsonl").is_file(), "rank 1 wrote its own shard"
    assert (tmp_path / "two" / "features" / "index.rank1.jsonl").is_file(), "and its own features index"
    main([*args, "--out", str(tmp_path / "one")])
    assert pairs(tmp_path / "two") == pairs(tmp_path / "one")
    assert_same_features(store_tensors(tmp_path / "two"), store_tensors(tmp_path / "one"))


def test_static_engine_and_hf_generate_extract_the_same_pairs(split, tmp_path):
    """The default engine (one prefill of each sample's visual prefix, shared by its questions) against
    transformers' generate, with 3 questions per sample in batches that split and pad the groups."""
    base = dict(dataset=str(split), questions=3, max_new_tokens=16, batch_size=4, device="cpu")
    extract(ExtractConfig(out=str(tmp_path / "static"), **base), progress=False)
    extract(ExtractConfig(out=str(tmp_path / "hf"), engine="hf", **base), progress=False)
    assert pairs(tmp_path / "static") == pairs(tmp_path / "hf")
    with pytest.raises(SpecalignError, match="--engine"):
        extract(ExtractConfig(out=str(tmp_path / "x"), engine="vllm", **base), progress=False)


def test_resuming_with_retrained_weights_is_refused(split, tmp_path):
    """Pairs of a model retrained since the extraction started would be silently stale: refuse to reuse them."""
    import os
    import shutil

    draft = tmp_path / "my-draft"
    shutil.copytree(BUNDLED["mini-draft"], draft)
    cfg = ExtractConfig(dataset=str(split), out=str(tmp_path / "x"), questions=1, max_new_tokens=4, batch_size=2,
                        draft=str(draft), device="cpu")  # fmt: skip
    extract(cfg, progress=False)
    assert extract(cfg, progress=False)["pairs"] == 2, "same weights: the finished run is reused"
    weights = draft / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten a second later
    with pytest.raises(SpecalignError, match="holds a run with other settings .weights.draft.model.safetensors"):
        extract(cfg, progress=False)
    with pytest.raises(SpecalignError, match="draft: '.*my-draft' then, 'mini-draft' now"):
        extract(ExtractConfig(**{**cfg.__dict__, "draft": "mini-draft"}), progress=False)
