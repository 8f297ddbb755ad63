"""Paired extraction with the bundled models: resumable, no lost or duplicated pair, both modes agree."""

import json

import pytest

from specalign.align.extract import ExtractConfig, extract
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


def test_hidden_states_are_the_features_each_token_was_predicted_from(split, tmp_path):
    from specalign.align.extract import load_hidden_states
    from specalign.models import load_model

    cfg = ExtractConfig(dataset=str(split), out=str(tmp_path / "h"), questions=2, max_new_tokens=10, batch_size=3,
                        device="cpu", hidden_states=True)  # fmt: skip
    extract(cfg, progress=False)
    recs = pairs(tmp_path / "h")
    for role, key, name in (("draft", "egpt_tokens", "mini-draft"), ("target", "vl_tokens", "mini-target")):
        hidden = load_hidden_states(tmp_path / "h", role)
        head = load_model(name).model.lm_head
        for p in recs:
            h = hidden[(p["sample_idx"], p["question_idx"])]
            assert h.shape == (len(p[key]), head.in_features)
            # greedy: the LM head on the stored feature gives back the stored token
            assert head(h.float()).argmax(-1).tolist() == p[key]
    # the same folder asked for again with other settings is another run: refused on one line, or started over
    with pytest.raises(SpecalignError, match="hidden_states: true then, false now"):
        extract(ExtractConfig(**{**cfg.__dict__, "hidden_states": False}), progress=False)
    assert len(load_hidden_states(tmp_path / "h", "draft")) == 4, "the refused run changed nothing"
    plain = extract(ExtractConfig(**{**cfg.__dict__, "hidden_states": False, "overwrite": True}), progress=False)
    assert plain["settings"]["hidden_states"] is False and plain["pairs"] == 4
    with pytest.raises(SpecalignError, match="hidden states"):
        load_hidden_states(tmp_path / "h", "draft")


def test_two_ranks_under_torchrun_give_the_same_pairs(split, tmp_path):
    import os
    import subprocess
    import sys

    args = ["extract", "--dataset", str(split), "--questions", "2", "--max-new-tokens", "8", "--device", "cpu",
            "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29518", "-m", "specalign", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "two" / "draft.rank1.jsonl").is_file(), "rank 1 wrote its own shard"
    main([*args, "--out", str(tmp_path / "one")])
    assert pairs(tmp_path / "two") == pairs(tmp_path / "one")


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
