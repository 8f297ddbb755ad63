"""`world build` killed at random points (the parent alone, or with its workers) resumes to the very same files."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from processes import alive, kill_after

from specalign.data import open_dataset
from specalign.data.dsec import open_raw_sequence
from specalign.fsutil import TEMP_NAME, png_bytes
from specalign.world.build import WorldConfig, build_world

SETTINGS = dict(duration="500ms", train=4, test=2, width=32, height=24, clips_per_sequence=2, raw_dsec=True)
BUILD = "import json, sys; from specalign.world.build import WorldConfig, build_world; " \
        "build_world(WorldConfig(**json.loads(sys.argv[1])), progress=False)"  # fmt: skip


def files(root: Path) -> dict:
    """sha256 of every file but the lock and world.json's timing (which says when and how fast it ran)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".lock":
            data = p.read_bytes()
            if p.name == "world.json":
                manifest = json.loads(data)
                for build in manifest["builds"].values():
                    build["summary"].pop("seconds")
                    build["summary"].pop("out")
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def start(out: Path, workers: int) -> subprocess.Popen:
    args = json.dumps({**SETTINGS, "out": str(out), "workers": workers, "mp4": True})
    return subprocess.Popen([sys.executable, "-c", BUILD, args], start_new_session=True, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    build_world(WorldConfig(out=str(out), workers=1, mp4=True, **SETTINGS), progress=False)
    return files(out)


@pytest.mark.parametrize("group", [False, True], ids=["parent", "parent+workers"])
def test_killed_builds_resume_to_the_same_files(reference, tmp_path, group):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc")
    out = tmp_path / "w"
    rng = np.random.default_rng(14 + group)
    points = sorted(rng.uniform(0.05, 0.95, 2) * len(reference))  # kill once this many files are there
    for k, n_files in enumerate(points):
        workers = kill_after(start(out, workers=2), out, int(n_files), group)
        if k == 0:  # the first run has every drive to build: it is killed while its pool works
            assert len(workers) >= 2
        deadline = time.time() + 5
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers), "a killed build's workers go with it"
    build_world(WorldConfig(out=str(out), workers=2, mp4=True, **SETTINGS), progress=False)
    got = files(out)
    assert got.keys() == reference.keys(), "nothing lost, nothing extra"
    assert got == reference
    assert not [p for p in out.rglob(".*") if TEMP_NAME.fullmatch(p.name)], "no temp file left"
    for split in ("my_egpt_dsec_train_500ms", "my_egpt_dsec_seq_500ms"):
        ids = [s.id for s in open_dataset(out / split)]
        assert len(ids) == len(set(ids)) == {"my_egpt_dsec_train_500ms": 4, "my_egpt_dsec_seq_500ms": 2}[split]


def test_readers_never_take_a_temp_file_for_data(tmp_path):
    out = tmp_path / "w"
    build_world(WorldConfig(out=str(out), workers=1, mp4=False, **{**SETTINGS, "train": 2, "test": 0}), progress=False)
    sample = open_dataset(out / "my_egpt_dsec_train_500ms")[0]
    frames = sample.frames(8)
    raw_dir = out / "raw_dsec" / "train" / sample.seq
    raw = open_raw_sequence(raw_dir)
    # complete images left by a killed writer, named as the atomic writer names them, sorting first
    stray = np.zeros_like(frames[0])
    (sample.video_dir / ".000000.png.abcd1234.tmp.png").write_bytes(png_bytes(stray))
    (raw_dir / "images" / "left" / "rectified" / ".000000.png.abcd1234.tmp.png").write_bytes(png_bytes(stray))
    np.testing.assert_array_equal(open_dataset(out / "my_egpt_dsec_train_500ms")[0].frames(8), frames)
    assert open_raw_sequence(raw_dir).image_paths == raw.image_paths
    # a clip that lost frames is refused, not read as a shorter clip
    sample.frame_paths()[3].unlink()
    with pytest.raises(Exception, match="1 of the clip's 10 frames are missing"):
        sample.frames(8)
