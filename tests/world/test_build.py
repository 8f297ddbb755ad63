"""`specalign world build`: the reference layout, reproducibility, resume, bad input."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from specalign.cli import main
from specalign.data.event_npy import load_event_npy
from specalign.data.layout import INDEX_NAME
from specalign.errors import SpecalignError
from specalign.world.build import WorldConfig, build_world, load_world_config

NPY_FIELDS = {"p", "t", "x", "y", "time_start", "time_end", "duration_ms", "image_timestamp", "image_idx",
              "image_indices_in_clip", "num_events"}  # fmt: skip


def tiny(out, **kw) -> WorldConfig:
    base = dict(out=str(out), duration="500ms", train=6, test=2, width=48, height=32, clips_per_sequence=3)
    base.update(kw)
    return WorldConfig(**base)


def digests(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.suffix in (".npy", ".png") and p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(tiny(out), progress=False)
    return out


def test_layout_is_the_reference_layout(world):
    split = world / "my_egpt_dsec_train_500ms"
    entries = json.loads((split / INDEX_NAME).read_text())
    assert len(entries) == 6
    assert (world / "my_egpt_dsec_seq_500ms" / INDEX_NAME).exists()
    for e in entries:
        assert set(e) == {"id", "split", "event_data", "video_data", "video_frames", "mp4_data", "event_image",
                          "event_image_1f", "conversations"}  # fmt: skip
        assert e["split"] == "my_egpt_dsec_train_500ms"
        seq, clip = e["id"].split("/")
        assert len(clip) == 6 and clip.isdigit()
        ev = load_event_npy(split / "event_npy" / e["event_data"])
        assert set(ev) == NPY_FIELDS
        assert ev["time_end"] - ev["time_start"] == 500_000 and ev["duration_ms"] == 500.0
        assert ev["num_events"] == len(ev["t"]) > 0
        assert ev["t"].min() >= ev["time_start"] and ev["t"].max() < ev["time_end"]
        frames = sorted((split / "video" / e["video_data"]).glob("*.png"))
        assert len(frames) == 10 == len(ev["image_indices_in_clip"])  # 20 Hz over 500 ms
        assert [f.name for f in frames] == e["video_frames"]
        assert [int(f.stem) for f in frames] == ev["image_indices_in_clip"]
        assert len(e["event_image"]) == 5 and all((split / "event_image" / p).exists() for p in e["event_image"])
        assert (split / "event_image_1f" / e["event_image_1f"][0]).exists()
        if e["mp4_data"]:
            assert (split / "mp4" / e["mp4_data"]).stat().st_size > 0
        assert e["conversations"][0]["value"].startswith("<event>\n")
        truth = json.loads((split / "scene" / seq / f"{clip}.json").read_text())
        assert {"scene", "qa"} <= set(truth) and len(truth["qa"]) == 50
    # 50 % overlap: consecutive clips of a sequence start half a window apart
    first = [load_event_npy(split / "event_npy" / e["event_data"]) for e in entries[:2]]
    assert first[1]["time_start"] - first[0]["time_start"] == 250_000
    questions = json.loads((world / "questions.json").read_text())
    assert questions[0]["question"] == "What are the key elements in this scene?"
    assert [q["count"] for q in questions] == sorted((q["count"] for q in questions), reverse=True)


def test_tokenizer_has_the_special_tokens(world):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(world / "tokenizer.json"))
    for s in ("<s>", "</s>", "<unk>", "<pad>", "<image>", "<video>", "<event>"):
        assert tok.token_to_id(s) is not None
    text = "The key elements in this scene include a straight two-lane road."
    assert tok.decode(tok.encode(text).ids) == text


def test_same_seed_same_bytes(world, tmp_path):
    again = tmp_path / "again"
    build_world(tiny(again, workers=2), progress=False)  # other worker count, same data
    a, b = digests(world), digests(again)
    assert len(a) > 100 and a == b
    other = tmp_path / "other"
    build_world(tiny(other, seed=1, train=3, test=0), progress=False)
    c = digests(other)
    shared = set(a) & set(c)
    assert any(a[k] != c[k] for k in shared if k.endswith(".npy"))


def test_interrupted_build_resumes(tmp_path):
    out = tmp_path / "w"
    build_world(tiny(out), progress=False)
    before = digests(out)
    split = out / "my_egpt_dsec_train_500ms"
    # as if killed while writing the second sequence: its marker and a clip are gone, a temp file is left
    marker = sorted((split / ".build").glob("*_a.json"))[1]
    seq = marker.stem
    victim = sorted((split / "event_npy" / seq).glob("*.npy"))[0]
    victim.unlink()
    marker.unlink()
    other_seq = next(m.stem for m in (split / ".build").glob("*_a.json") if m.stem != seq)
    temps = [split / "event_npy" / seq / ".000001.npy.k3j4h5g6.tmp.npy", split / ".index.json.a_b_c_d_.tmp.json",
             split / "video" / other_seq / "000001" / ".000006.png.abcdefgh.tmp.png"]  # fmt: skip
    for t in temps:
        t.write_bytes(b"half")
    untouched = sorted((split / "event_npy" / other_seq).glob("*.npy"))[0]
    mtime = untouched.stat().st_mtime_ns
    build_world(tiny(out), progress=False)
    assert digests(out) == before
    assert untouched.stat().st_mtime_ns == mtime, "finished sequences are not rebuilt"
    assert not any(t.exists() for t in temps), "a resume removes what a killed build was writing"


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "w"
    build_world(tiny(out, train=3, test=0), progress=False)
    with pytest.raises(SpecalignError, match="other settings"):
        build_world(tiny(out, train=3, test=0, seed=5), progress=False)


def test_world_of_an_older_renderer_is_refused(tmp_path):
    # a split drawn before RENDER_VERSION existed (its settings have no render_version) must not be resumed
    # with today's drawing, nor feed fresh scenes that look different from its clips
    out = tmp_path / "w"
    build_world(tiny(out, train=3, test=0), progress=False)
    settings = out / "my_egpt_dsec_train_500ms" / "run_settings.json"
    old = json.loads(settings.read_text())
    old.pop("render_version")
    settings.write_text(json.dumps(old))
    with pytest.raises(SpecalignError, match="older renderer"):
        build_world(tiny(out, train=3, test=0), progress=False)
    world_json = out / "world.json"
    manifest = json.loads(world_json.read_text())
    manifest["builds"]["500ms"]["settings"].pop("render_version")
    world_json.write_text(json.dumps(manifest))
    with pytest.raises(SpecalignError, match="older renderer"):
        load_world_config(out, "500ms")


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["world", "build", "--out", str(tmp_path / "x"), "--duration", "3s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown duration '3s'" in err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["world", "build", "--out", str(blocker / "w"), "--train", "1", "--test", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(blocker) in err
    with pytest.raises(SystemExit):
        main(["world", "build", "--out", str(tmp_path / "y"), "--sensor-size", "big"])


def test_cli_builds_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["world", "build", "--out", str(out), "--train", "2", "--test", "1", "--duration", "500ms",
            "--sensor-size", "32x24", "--clips-per-sequence", "2", "--workers", "1", "--quiet", "--no-mp4"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "train" in text and "2 clips" in text.replace("     ", " ").replace("  ", " ")
    entries = json.loads((out / "my_egpt_dsec_train_500ms" / INDEX_NAME).read_text())
    assert all(e["mp4_data"] is None for e in entries)
    img = np.asarray(__import__("PIL.Image").Image.open(out / "my_egpt_dsec_train_500ms" / "event_image_1f" /
                                                        entries[0]["event_image_1f"][0]))  # fmt: skip
    assert img.shape == (24, 32, 3)


def test_clip_frames_match_a_simulated_drive():
    """The frames-only renderer averages the same renders as the full drive simulation (noise made negligible)."""
    from specalign.data.dataset import pick_frames
    from specalign.world.build import clip_frames, simulate_sequence
    from specalign.world.camera import FrameCameraConfig
    from specalign.world.scene import sample_scene

    cfg = tiny("-", frame=FrameCameraConfig(full_well=1e12, read_noise=0.0))
    tod = set()
    for k in range(8):
        scene = sample_scene(np.random.default_rng([7, k]))
        tod.add(scene.time_of_day)
        _, ts, frames = simulate_sequence(scene, 0.75, cfg, np.random.default_rng(0))  # two 500 ms windows
        for window, first in ((0, 0), (1, 5)):  # 10 frames a window, 50 % overlap
            fast = clip_frames(scene, cfg, np.random.default_rng(0), window=window)
            full = np.stack(frames[first : first + 10])[pick_frames(10, 8)]
            assert fast.shape == (8, 32, 48, 3) and fast.dtype == np.uint8
            assert np.abs(fast.astype(int) - full).max() <= 1, (scene.time_of_day, window)  # rounding only
    assert len(tod) >= 2, "several exposure times covered"


def test_frame_scale_renders_larger_frames_and_the_same_events(world, tmp_path):
    from specalign.data import open_dataset
    from specalign.world.build import load_world_config

    big = tmp_path / "big"
    build_world(tiny(big, frame_scale=2), progress=False)
    a, b = digests(world), digests(big)
    assert a.keys() == b.keys()
    npy = [k for k in a if k.endswith(".npy")]
    assert npy and all(a[k] == b[k] for k in npy), "the event camera does not see the frame scale"
    small, large = open_dataset(world / "my_egpt_dsec_train_500ms"), open_dataset(big / "my_egpt_dsec_train_500ms")
    assert small[0].frames(8).shape == (8, 32, 48, 3) and large[0].frames(8).shape == (8, 64, 96, 3)
    # the large frames are the small ones' scene at twice the resolution: 2x2 block means match closely
    pooled = large[0].frames(8).astype(float).reshape(8, 32, 2, 48, 2, 3).mean(axis=(2, 4))
    assert np.abs(pooled - small[0].frames(8)).mean() < 6
    assert load_world_config(big, "500ms").frame_scale == 2
    assert "frame_scale" not in tiny(world).settings()  # worlds from before frame_scale still resume


def test_clip_frames_follow_the_frame_scale():
    from specalign.world.build import clip_frames, simulate_sequence
    from specalign.world.camera import FrameCameraConfig
    from specalign.world.scene import sample_scene

    cfg = tiny("-", frame_scale=2, frame=FrameCameraConfig(full_well=1e12, read_noise=0.0))
    scene = sample_scene(np.random.default_rng([7, 0]))
    _, _, frames = simulate_sequence(scene, 0.5, cfg, np.random.default_rng(0))
    fast = clip_frames(scene, cfg, np.random.default_rng(0))
    assert fast.shape == (8, 64, 96, 3) and frames[0].shape == (64, 96, 3)
    assert np.abs(fast[0].astype(int) - frames[0]).max() <= 1
