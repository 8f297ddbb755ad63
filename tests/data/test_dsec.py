import json
import shutil

import h5py
import hdf5plugin
import numpy as np
import pytest
from dsec_synth import FIRST_IMAGE, SENSOR, T_OFFSET, synth_sequence
from PIL import Image

from specalign.data import layout
from specalign.data.dsec import DsecBuildConfig, build_dsec, open_raw_sequence, write_raw_sequence
from specalign.errors import SpecalignError

NPY_FIELDS = [
    "p",
    "t",
    "x",
    "y",
    "time_start",
    "time_end",
    "duration_ms",
    "image_timestamp",
    "image_idx",
    "image_indices_in_clip",
    "num_events",
]


def h5_of(seq_dir):
    return seq_dir / "events" / "left" / "events.h5"


def read_npy(path):
    # Test-side reader of files this test wrote itself (the library's safe reader is event_npy.load_event_npy).
    return np.load(path, allow_pickle=True).item()


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ raw files


def test_raw_roundtrip_is_exact(make_raw):
    seq_dir, spec = make_raw()
    ev = spec["events"]
    with h5py.File(h5_of(seq_dir), "r") as f:
        assert f["events/p"].dtype == np.uint8 and f["events/t"].dtype == np.uint32
        assert f["events/x"].dtype == np.uint16 and f["events/y"].dtype == np.uint16
        assert f["ms_to_idx"].dtype == np.uint64
        plist = f["events/t"].id.get_create_plist()
        assert plist.get_nfilters() == 1 and plist.get_filter(0)[0] == hdf5plugin.BLOSC_ID
        assert f["events/t"].chunks is not None
        assert int(f["t_offset"][()]) == T_OFFSET
        np.testing.assert_array_equal(f["events/t"][:], ev["t"] - T_OFFSET)
        for k in "xyp":
            np.testing.assert_array_equal(f[f"events/{k}"][:], ev[k])
        assert (f.attrs["width"], f.attrs["height"]) == SENSOR
    ts = [int(line) for line in (seq_dir / "images" / "timestamps.txt").read_text().split()]
    assert ts == spec["image_ts"].tolist()
    pngs = sorted((seq_dir / "images" / "left" / "rectified").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(len(ts))]
    for p, frame in zip(pngs, spec["frames"], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), frame)

    with open_raw_sequence(seq_dir) as raw:
        assert raw.sensor_size == SENSOR and raw.t_offset == T_OFFSET and raw.num_events == len(ev["t"])
        np.testing.assert_array_equal(raw.image_ts, spec["image_ts"])
        got = raw.events_between(0, 2**62)
        for k in "xytp":
            np.testing.assert_array_equal(got[k], ev[k])
        assert got["t"].dtype == np.int64
    assert raw._h5 is None  # closed by the context manager


def test_ms_to_idx_invariant(make_raw):
    seq_dir, _ = make_raw(n_events=50_000)
    with h5py.File(h5_of(seq_dir), "r") as f:
        t = f["events/t"][:].astype(np.int64)
        table = f["ms_to_idx"][:].astype(np.int64)
    assert len(table) == int(np.ceil(t[-1] / 1000)) + 1
    for ms, idx in enumerate(table):
        if idx < len(t):
            assert t[idx] >= ms * 1000
        if idx > 0:
            assert t[idx - 1] < ms * 1000


def test_events_between_matches_brute_force(make_raw):
    seq_dir, spec = make_raw(gap=(900_000, 2_050_000))
    t = spec["events"]["t"]
    rng = np.random.default_rng(1)
    lo, hi = int(t[0]) - 3_000, int(t[-1]) + 3_000
    windows = [tuple(sorted(rng.integers(lo, hi, 2))) for _ in range(150)]
    windows += [(int(t[i]), int(t[j])) for i, j in rng.integers(0, len(t), (50, 2))]  # edges on events
    windows += [(0, T_OFFSET), (hi, hi + 10**6), (int(t[5]), int(t[5])), (int(t[9]), int(t[3])), (0, 2**62)]
    windows += [(FIRST_IMAGE + k * 500_000, FIRST_IMAGE + k * 500_000 + 1_000_000) for k in range(5)]
    with open_raw_sequence(seq_dir) as raw:
        for t0, t1 in windows:
            got = raw.events_between(t0, t1)
            mask = (t >= t0) & (t < t1)
            for k in "xytp":
                np.testing.assert_array_equal(got[k], spec["events"][k][mask], err_msg=f"{k} in [{t0}, {t1})")


def test_sensor_size_defaults_to_dsec_without_attrs(make_raw):
    seq_dir, _ = make_raw()
    with h5py.File(h5_of(seq_dir), "r+") as f:
        del f.attrs["width"], f.attrs["height"]
    assert open_raw_sequence(seq_dir).sensor_size == (640, 480)
    assert open_raw_sequence(seq_dir, sensor_size=(100, 60)).sensor_size == (100, 60)


# ------------------------------------------------------------------------------------------------ build


def test_build_writes_the_reference_layout(make_raw, tmp_path):
    seq_dir, spec = make_raw()
    out = tmp_path / "derived" / "my_egpt_dsec_seq_1s"
    summary = build_dsec(DsecBuildConfig(tmp_path / "raw", out, duration="1s", mp4=False), progress=False)

    windows = layout.plan_windows(spec["image_ts"], 1_000_000)
    assert len(windows) == 5
    assert summary["clips"] == 5 and summary["built"] == ["seqA"] and summary["split"] == "my_egpt_dsec_seq_1s"
    index = json.loads((out / layout.INDEX_NAME).read_text())
    assert [e["id"] for e in index] == [f"seqA/{i:06d}" for i in range(5)]
    assert {e["split"] for e in index} == {"my_egpt_dsec_seq_1s"}
    assert index[0]["conversations"] == [
        {"from": "human", "value": "<event>\nWhat are the key elements in this scene?"},
        {"from": "gpt", "value": ""},
    ]
    assert sorted(p.name for p in (out / "event_npy" / "seqA").iterdir()) == [f"{i:06d}.npy" for i in range(5)]

    t = spec["events"]["t"]
    starts = []
    for w, entry in zip(windows, index, strict=True):
        rec = read_npy(out / "event_npy" / entry["event_data"])
        assert list(rec) == NPY_FIELDS
        mask = (t >= w.time_start) & (t < w.time_end)
        for k in "xytp":
            np.testing.assert_array_equal(rec[k], spec["events"][k][mask])
        assert rec["num_events"] == mask.sum() and rec["duration_ms"] == 1000.0
        assert (rec["time_start"], rec["time_end"], rec["image_timestamp"]) == (w.time_start, w.time_end, w.time_end)
        assert rec["image_indices_in_clip"] == w.image_indices and rec["image_idx"] == w.image_indices[0]
        starts.append(rec["time_start"])

        frames = sorted((out / "video" / entry["video_data"]).iterdir())
        assert [p.name for p in frames] == [f"{i:06d}.png" for i in w.image_indices]
        for p in frames:
            assert p.read_bytes() == (seq_dir / "images" / "left" / "rectified" / p.name).read_bytes()
        for rel in entry["event_image"]:
            assert Image.open(out / "event_image" / rel).size == SENSOR
        assert Image.open(out / "event_image_1f" / entry["event_image_1f"][0]).size == SENSOR
        assert entry["mp4_data"] is None
    assert np.diff(starts).tolist() == [500_000] * 4  # 50% overlap
    assert json.loads((out / ".build" / "seqA.json").read_text())["entries"] == index


def test_build_skips_an_empty_window(make_raw, tmp_path):
    make_raw(gap=(900_000, 2_050_000))  # window 2 = [1.0 s, 2.0 s) after the first image has no events
    out = tmp_path / "split"
    with pytest.warns(UserWarning, match="seqA/000002: empty window"):
        summary = build_dsec(DsecBuildConfig(tmp_path / "raw", out, mp4=False), progress=False)
    assert summary["skipped_empty"] == ["seqA/000002"] and summary["clips"] == 4
    index = json.loads((out / layout.INDEX_NAME).read_text())
    assert [e["id"] for e in index] == ["seqA/000000", "seqA/000001", "seqA/000003", "seqA/000004"]
    assert not (out / "event_npy" / "seqA" / "000002.npy").exists()
    assert not (out / "video" / "seqA" / "000002").exists()


def test_build_many_sequences_in_parallel_equals_serial(make_raw, tmp_path):
    make_raw("zurich_city_01_a", seed=1, seconds=2)
    make_raw("interlaken_00_c", seed=2, seconds=2)
    make_raw("thun_00_a", seed=3, seconds=2)
    serial = build_dsec(DsecBuildConfig(tmp_path / "raw", tmp_path / "serial" / "s", mp4=False), progress=False)
    para = build_dsec(DsecBuildConfig(tmp_path / "raw", tmp_path / "para" / "s", mp4=False, workers=2), progress=False)
    assert serial["clips"] == para["clips"] == 9
    a = json.loads((tmp_path / "serial" / "s" / layout.INDEX_NAME).read_text())
    b = json.loads((tmp_path / "para" / "s" / layout.INDEX_NAME).read_text())
    assert a == b
    assert [e["id"].split("/")[0] for e in a][::3] == ["interlaken_00_c", "thun_00_a", "zurich_city_01_a"]


def test_build_one_sequence_dir_with_questions_and_mp4(make_raw, tmp_path):
    seq_dir, _ = make_raw(seconds=1)
    out = tmp_path / "one"
    build_dsec(DsecBuildConfig(seq_dir, out, duration="500ms", question="Is the road busy?"), progress=False)
    index = json.loads((out / layout.INDEX_NAME).read_text())
    assert len(index) == 3
    assert index[0]["conversations"][0]["value"] == "<event>\nIs the road busy?"
    assert index[0]["mp4_data"] == "seqA/000000.mp4"
    assert (out / "mp4" / "seqA" / "000000.mp4").stat().st_size > 0


def test_build_resumes(make_raw, tmp_path):
    make_raw("seqA", seed=1)
    make_raw("seqB", seed=2)
    out = tmp_path / "split"
    build_dsec(DsecBuildConfig(tmp_path / "raw", out, mp4=False), progress=False)
    index_before = (out / layout.INDEX_NAME).read_text()
    b_files = [p for p in out.rglob("*") if p.is_file() and "seqB" in p.parts]
    b_mtimes = {p: p.stat().st_mtime_ns for p in b_files}

    clip = out / "event_npy" / "seqA" / "000001.npy"
    clip.unlink()
    shutil.rmtree(out / "video" / "seqA" / "000001")
    for i in range(5):
        (out / "event_image" / "seqA" / f"000001_{i}.png").unlink()
    (out / "event_image_1f" / "seqA" / "000001_0.png").unlink()
    (out / ".build" / "seqA.json").unlink()

    summary = build_dsec(DsecBuildConfig(tmp_path / "raw", out, mp4=False), progress=False)
    assert summary["built"] == ["seqA"] and summary["resumed"] == ["seqB"]
    assert clip.is_file() and (out / "event_image_1f" / "seqA" / "000001_0.png").is_file()
    assert len(list((out / "video" / "seqA" / "000001").glob("*.png"))) == 20
    assert (out / ".build" / "seqA.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in b_files} == b_mtimes
    assert (out / layout.INDEX_NAME).read_text() == index_before
    assert not [p for p in out.rglob("*.tmp*")]


def test_resume_with_other_settings_or_inputs_is_refused(make_raw, tmp_path):
    seq_dir, spec = make_raw()
    out = tmp_path / "split"
    build_dsec(DsecBuildConfig(tmp_path / "raw", out, duration="1s", mp4=False), progress=False)
    index = (out / layout.INDEX_NAME).read_bytes()
    with pytest.raises(SpecalignError) as e:
        build_dsec(DsecBuildConfig(tmp_path / "raw", out, duration="2s", mp4=False), progress=False)
    one_line_error(e, str(out), "duration: '1s' then, '2s' now", "--overwrite")
    # the raw sequence was re-recorded: its clips would mix two recordings
    spec["events"]["p"] = 1 - spec["events"]["p"]
    write_raw_sequence(seq_dir, **spec)
    with pytest.raises(SpecalignError) as e:
        build_dsec(DsecBuildConfig(tmp_path / "raw", out, duration="1s", mp4=False), progress=False)
    one_line_error(e, "sequences.seqA.events_h5")
    make_raw("seqB", seed=3)
    with pytest.raises(SpecalignError) as e:
        build_dsec(DsecBuildConfig(tmp_path / "raw", out, duration="1s", mp4=False), progress=False)
    one_line_error(e, "sequences.seqA.events_h5")
    assert (out / layout.INDEX_NAME).read_bytes() == index, "a refused run changes nothing"
    summary = build_dsec(
        DsecBuildConfig(tmp_path / "raw", out, duration="2s", mp4=False, overwrite=True), progress=False
    )
    assert summary["built"] == ["seqA", "seqB"] and not list((out / "event_npy" / "seqA").glob("000004.npy"))


# ------------------------------------------------------------------------------------------------ bad input


def _missing_h5(seq):
    h5_of(seq).unlink()
    return "events.h5"


def _corrupt_h5(seq):
    h5_of(seq).write_bytes(b"this is not an HDF5 file\x00" * 40)
    return "events.h5"


def _missing_dataset(seq):
    with h5py.File(h5_of(seq), "r+") as f:
        del f["ms_to_idx"]
    return "ms_to_idx"


def _outside_sensor(seq):
    with h5py.File(h5_of(seq), "r+") as f:
        f["events/x"][3000] = SENSOR[0] + 7  # inside the first window
    return "outside the 64x48 sensor"


def _unsorted(seq):
    with h5py.File(h5_of(seq), "r+") as f:
        f["events/t"][3000] = f["events/t"][3000] + 300_000
    return "not sorted"


def _missing_timestamps(seq):
    (seq / "images" / "timestamps.txt").unlink()
    return "timestamps.txt"


def _garbled_timestamps(seq):
    path = seq / "images" / "timestamps.txt"
    lines = path.read_text().splitlines()
    lines[7] = "17:04:33.25"
    path.write_text("\n".join(lines))
    return "line 8"


def _image_count(seq):
    (seq / "images" / "left" / "rectified" / "000060.png").unlink()
    return "61 timestamps but 60 PNGs"


@pytest.mark.parametrize(
    "damage",
    [
        _missing_h5,
        _corrupt_h5,
        _missing_dataset,
        _outside_sensor,
        _unsorted,
        _missing_timestamps,
        _garbled_timestamps,
        _image_count,
    ],
)
def test_bad_raw_sequence_fails_on_one_line(make_raw, tmp_path, damage):
    seq_dir, _ = make_raw()
    problem = damage(seq_dir)
    with pytest.raises(SpecalignError) as e:
        build_dsec(DsecBuildConfig(tmp_path / "raw", tmp_path / "out", mp4=False), progress=False)
    msg = one_line_error(e, problem)
    assert "seqA" in msg and ("events.h5" in msg or "timestamps.txt" in msg)
    assert not (tmp_path / "out" / layout.INDEX_NAME).exists()


def test_unknown_duration(make_raw, tmp_path):
    make_raw()
    with pytest.raises(SpecalignError) as e:
        build_dsec(DsecBuildConfig(tmp_path / "raw", tmp_path / "out", duration="3s"), progress=False)
    one_line_error(e, "3s", "1s")


def test_unwritable_out_dir(make_raw, tmp_path):
    make_raw()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SpecalignError) as e:
        build_dsec(DsecBuildConfig(tmp_path / "raw", blocker / "split"), progress=False)
    one_line_error(e, blocker / "split")


def test_no_sequences(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecalignError) as e:
        build_dsec(DsecBuildConfig(tmp_path / "empty", tmp_path / "out"), progress=False)
    one_line_error(e, tmp_path / "empty", "no DSEC sequences")
    with pytest.raises(SpecalignError) as e:
        build_dsec(DsecBuildConfig(tmp_path / "nowhere", tmp_path / "out"), progress=False)
    one_line_error(e, tmp_path / "nowhere")


def test_writer_rejects_bad_events(tmp_path):
    spec = synth_sequence(seconds=1)
    spec["events"]["t"] = spec["events"]["t"][::-1].copy()
    with pytest.raises(SpecalignError) as e:
        write_raw_sequence(tmp_path / "s", **spec)
    one_line_error(e, "events.h5", "not sorted")
    spec = synth_sequence(seconds=1)
    with pytest.raises(SpecalignError) as e:
        write_raw_sequence(tmp_path / "s", **{**spec, "t_offset": T_OFFSET + 10**9})
    one_line_error(e, "events.h5", "uint32")
    assert not (tmp_path / "s" / "events" / "left" / "events.h5").exists()
