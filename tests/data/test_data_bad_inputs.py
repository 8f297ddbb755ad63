"""Bad inputs of `data build-dsec` and the dataset readers: one line naming the file or flag; nothing is lost."""

import hashlib
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from specalign.cli import main
from specalign.data import layout, open_dataset
from specalign.data.dsec import DsecBuildConfig, build_dsec
from specalign.errors import SpecalignError
from specalign.runs import exclusive


def cli_error(capsys, *args) -> str:
    """Run `specalign data build-dsec ARGS`; it must fail with exit 2 and one line on stderr. Returns the line."""
    assert main(["data", "build-dsec", *map(str, args), "--no-mp4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def error(fn, *needles) -> str:
    with pytest.raises(SpecalignError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


def digests(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}  # fmt: skip


@pytest.fixture
def split(make_raw, tmp_path):
    """A derived split of one 2 s sequence (3 clips of 1 s)."""
    make_raw(seconds=2)
    out = tmp_path / "split"
    build_dsec(DsecBuildConfig(tmp_path / "raw", out, mp4=False), progress=False)
    return out


def h5(seq_dir):
    return seq_dir / "events" / "left" / "events.h5"


# ------------------------------------------------------------------------------------------------ event files


def _save(path, obj):
    with open(path, "wb") as f:
        np.save(f, obj, allow_pickle=True)


def _clip(path) -> dict:
    return np.load(path, allow_pickle=True).item()  # the test's own file


class _Payload:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def test_truncated_npy(split):
    path = split / "event_npy" / "seqA" / "000000.npy"
    path.write_bytes(path.read_bytes()[:200])
    ds = open_dataset(split)
    error(lambda: ds[0].events(), path, "corrupt or truncated .npy")
    assert len(ds[1].events()["t"]) > 0, "the other clips still read"


def test_npy_with_a_code_executing_pickle_never_runs_it(split, tmp_path):
    flag = tmp_path / "payload_ran"
    path = split / "event_npy" / "seqA" / "000000.npy"
    _save(path, np.array([_Payload(flag)], dtype=object))
    error(lambda: open_dataset(split)[0].events(), path, "unsafe pickle: refusing to load posix.system")
    for p in (split / "event_image" / "seqA").glob("000000_*.png"):
        p.unlink()  # event images are then computed from the events: the same refusal
    error(lambda: open_dataset(split)[0].event_images(5), path, "unsafe pickle")
    assert not flag.exists()


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda c: c.update(x=c["x"].astype(np.float64)), "event field 'x' has dtype float64, expected integers"),
        (lambda c: c.update(p=c["p"].astype(np.float32) * 0.5), "event field 'p' has dtype float32, expected integers"),
        (lambda c: c.update(t=c["t"].reshape(-1, 1)), "event field 't' has shape"),
        (lambda c: c.update(y=c["y"].tolist()), "event field 'y' is a list, not an array"),
        (lambda c: c.pop("p"), "missing event fields ['p']"),
        (lambda c: c.update(x=c["x"][:-1]), "different lengths"),
    ],
    ids=["float-x", "float-p", "2d-t", "list-y", "no-p", "short-x"],
)
def test_event_arrays_of_the_wrong_kind_are_refused_not_coerced(split, damage, needle):
    path = split / "event_npy" / "seqA" / "000001.npy"
    clip = _clip(path)
    damage(clip)
    _save(path, clip)
    error(lambda: open_dataset(split)[1].events(), path, needle)


def test_npy_that_is_not_an_event_dict(split):
    path = split / "event_npy" / "seqA" / "000002.npy"
    np.save(path, np.zeros((4, 4), np.float32))
    error(lambda: open_dataset(split)[2].events(), path, "expected a dict of event arrays, found ndarray")


# ------------------------------------------------------------------------------------------------ frames, index


def test_truncated_frame_png(split):
    ds = open_dataset(split)
    path = ds[0].frame_paths()[0]
    path.write_bytes(path.read_bytes()[:100])
    error(lambda: ds[0].frames(20), path, "unreadable image")


def test_missing_frames_are_refused(split):
    ds = open_dataset(split)
    frames = ds[1].frame_paths()
    for p in frames[5:7]:
        p.unlink()  # 18 of 20 would read as a shorter clip and give another answer
    error(lambda: ds[1].frames(8), ds[1].video_dir, "2 of the clip's 20 frames are missing", frames[5].name)


def test_missing_frames_are_refused_without_a_frame_list(split):
    index = json.loads((split / layout.INDEX_NAME).read_text())
    for e in index:
        e.pop("video_frames")  # as in the reference study's own index
    (split / layout.INDEX_NAME).write_text(json.dumps(index))
    ds = open_dataset(split)
    (ds[0].video_dir / ".000000.png.abcd1234.tmp.png").write_bytes(ds[0].frame_paths()[0].read_bytes())
    assert len(ds[0].frame_paths()) == 20, "a temp file is no frame"
    ds[0].frame_paths()[3].unlink()
    error(lambda: ds[0].frames(8), ds[0].video_dir, "19 frames, but the clip has 20 (image_indices_in_clip")


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[{"id": "seqA/000000", "split": "s', "not valid JSON"),
        ('{"id": "seqA/000000"}', "index must be a JSON list of clip entries, found dict"),
        ('[{"split": "x"}]', "entry 0 has no 'id' of the form '<seq>/<clip>'"),
        ('[{"id": "seqA/000000", "video_frames": "000000.png"}]', "video_frames must be a list of file names"),
        ('[{"id": "seqA/000000", "video_frames": ["../../etc/passwd"]}]', "video_frames must be a list of file names"),
    ],
    ids=["truncated", "not-a-list", "no-id", "frames-not-a-list", "frames-path"],
)
def test_bad_index(split, text, needle):
    path = split / layout.INDEX_NAME
    path.write_text(text)
    error(lambda: open_dataset(split)[0].frames(8), path, needle)


def test_empty_split(split):
    (split / layout.INDEX_NAME).write_text("[]")
    ds = open_dataset(split)
    assert len(ds) == 0
    error(lambda: ds[0], "sample 0 out of range: the split has 0 clips")
    error(lambda: ds.sensor_size, "empty index: cannot tell the sensor size")


# ------------------------------------------------------------------------------------------------ build-dsec


def test_truncated_events_h5_like_a_cut_download(make_raw, capsys, tmp_path):
    seq, _ = make_raw()
    h5(seq).write_bytes(h5(seq).read_bytes()[: h5(seq).stat().st_size // 2])
    err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", tmp_path / "out")
    assert str(h5(seq)) in err and "not a readable HDF5 file" in err
    assert not (tmp_path / "out").exists(), "nothing written before every sequence is checked"


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda f: f.__delitem__("t_offset"), "missing datasets ['t_offset']"),
        (lambda f: (x := f["events/x"][()], f.__delitem__("events/x"), f.create_dataset("events/x", data=x * 1.0)),
         "events/x has dtype float64, expected integers"),
        (lambda f: (f.__delitem__("events/p"), f.create_group("events/p")), "events/p is not a dataset"),
    ],
    ids=["no-t_offset", "float-x", "p-is-a-group"],
)  # fmt: skip
def test_bad_events_h5(make_raw, capsys, tmp_path, edit, needle):
    seq, _ = make_raw()
    with h5py.File(h5(seq), "r+") as f:
        edit(f)
    err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", tmp_path / "out")
    assert str(h5(seq)) in err and needle in err
    assert not (tmp_path / "out").exists()


def test_damaged_raw_png_keeps_the_finished_sequences(make_raw, capsys, tmp_path):
    make_raw("seqA", seconds=2, seed=1)
    seq_b, _ = make_raw("seqB", seconds=2, seed=2)
    png = seq_b / "images" / "left" / "rectified" / "000003.png"
    good = png.read_bytes()
    png.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", out, "--workers", "1")
    assert str(png) in err and ("damaged PNG" in err or "unreadable image" in err)
    assert (out / ".build" / "seqA.json").is_file(), "the finished sequence is kept"
    kept = {k: v for k, v in digests(out).items() if "seqA" in k}
    png.write_bytes(good)
    summary = build_dsec(DsecBuildConfig(tmp_path / "raw", out, mp4=False), progress=False)
    assert summary["resumed"] == ["seqA"] and summary["built"] == ["seqB"]
    assert {k: v for k, v in digests(out).items() if "seqA" in k} == kept


def test_timestamps_and_images_disagree(make_raw, capsys, tmp_path):
    seq, _ = make_raw(seconds=2)
    (seq / "images" / "timestamps.txt").write_text("")
    err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", tmp_path / "out")
    assert "timestamps.txt" in err and "0 timestamps but 41 PNGs" in err


def test_sequences_shorter_than_the_duration(make_raw, capsys, tmp_path):
    make_raw(seconds=2)
    err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", tmp_path / "out", "--duration", "4s")
    assert "no clips: every sequence is shorter than --duration 4s" in err
    assert not (tmp_path / "out").exists()


def test_events_outside_the_given_sensor_size(make_raw, capsys, tmp_path):
    make_raw(seconds=2)
    err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", tmp_path / "out", "--sensor-size", "32x24")
    assert "events.h5" in err and "events outside the 32x24 sensor" in err
    assert not list((tmp_path / "out").glob("event_npy/*/*.npy"))


def test_bad_values(capsys, tmp_path):
    err = cli_error(capsys, "--raw", tmp_path, "--out", tmp_path / "out", "--workers", "0")
    assert "--workers: must be at least 1, got 0" in err
    err = cli_error(capsys, "--raw", tmp_path, "--out", tmp_path / "out", "--duration", "90s")
    assert "--duration: unknown duration '90s'" in err
    for size in ((0, 48), (64, -1), (64,)):
        error(lambda s=size: DsecBuildConfig(str(tmp_path), str(tmp_path / "o"), sensor_size=s), "--sensor-size")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_out_folder_of_something_else(make_raw, capsys, tmp_path):
    make_raw(seconds=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", out)
    assert f"{out}: is not empty and holds no specalign run of this kind" in err
    assert (out / "thesis.tex").read_text() == "mine"


def test_two_builds_into_one_folder(split, capsys, tmp_path):
    before = digests(split)
    with exclusive(split):
        err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", split)
    assert f"{split}: another specalign process is writing here" in err
    assert digests(split) == before


def test_unwritable_output(make_raw, capsys, tmp_path):
    make_raw(seconds=2)
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = cli_error(capsys, "--raw", tmp_path / "raw", "--out", locked / "out")
    assert str(locked / "out") in err and "Permission denied" in err
    shutil.rmtree(locked, ignore_errors=True)
