import json

import numpy as np
import pytest
from dsec_synth import SENSOR
from PIL import Image

from specalign.data import layout
from specalign.data.dataset import open_dataset, pick_frames
from specalign.data.dsec import DsecBuildConfig, build_dsec
from specalign.data.event_image import event_images
from specalign.errors import SpecalignError
from specalign.fsutil import write_json


@pytest.fixture
def built(make_raw, tmp_path):
    """A derived split of one 3 s sequence: 5 clips of 1 s. Returns (split dir, raw seq dir, synthetic inputs)."""
    seq_dir, spec = make_raw()
    out = tmp_path / "world" / "my_egpt_dsec_seq_1s"
    build_dsec(DsecBuildConfig(tmp_path / "raw", out, mp4=False), progress=False)
    return out, seq_dir, spec


def test_open_dataset(built):
    out, _, _ = built
    ds = open_dataset(out)
    assert len(ds) == 5 and ds.split_name == "my_egpt_dsec_seq_1s" and ds.root == out.resolve()
    assert ds.world_root is None and ds.questions() == []
    assert ds.sensor_size == SENSOR  # from the first clip's event image
    samples = list(ds)
    assert [s.id for s in samples] == [f"seqA/{i:06d}" for i in range(5)]
    s = ds[-1]
    assert (s.seq, s.clip, s.split) == ("seqA", "000004", "my_egpt_dsec_seq_1s")
    assert ds[np.int64(2)].clip == "000002"


def test_frames_pick_evenly_spaced_frames(built):
    out, seq_dir, spec = built
    s = open_dataset(out)[1]
    window = layout.plan_windows(spec["image_ts"], 1_000_000)[1]
    assert [p.name for p in s.frame_paths()] == [f"{i:06d}.png" for i in window.image_indices]
    m = len(window.image_indices)
    for n in (8, 3, 1):
        picked = np.linspace(0, m - 1, n).round().astype(int)
        np.testing.assert_array_equal(pick_frames(m, n), picked)
        frames = s.frames(n)
        assert frames.shape == (n, SENSOR[1], SENSOR[0], 3) and frames.dtype == np.uint8
        expected = np.stack([spec["frames"][window.image_indices[k]] for k in picked])
        np.testing.assert_array_equal(frames, expected)


def test_event_images_stored_and_computed(built):
    out, _, spec = built
    s = open_dataset(out)[0]
    five, one = s.event_images(5), s.event_images(1)
    assert five.shape == (5, SENSOR[1], SENSOR[0], 3) and one.shape == (1, SENSOR[1], SENSOR[0], 3)
    assert five.dtype == np.uint8
    ev = s.events()
    mask = (spec["events"]["t"] >= ev["time_start"]) & (spec["events"]["t"] < ev["time_end"])
    np.testing.assert_array_equal(ev["t"], spec["events"]["t"][mask])
    np.testing.assert_array_equal(five, np.stack(event_images(ev, 5, SENSOR)))

    for p in (out / "event_image" / "seqA").glob("000000_*.png"):
        p.unlink()
    (out / "event_image_1f" / "seqA" / "000000_0.png").unlink()
    np.testing.assert_array_equal(s.event_images(5), five)  # computed from the events now
    np.testing.assert_array_equal(s.event_images(1), one)


def test_event_image_entry_may_be_a_string(built):
    out, _, _ = built
    index = json.loads((out / layout.INDEX_NAME).read_text())
    index[0]["event_image_1f"] = index[0]["event_image_1f"][0]
    write_json(out / layout.INDEX_NAME, index)
    assert open_dataset(out)[0].event_images(1).shape == (1, SENSOR[1], SENSOR[0], 3)


def test_question_answer_and_ground_truth(built):
    out, _, _ = built
    index = json.loads((out / layout.INDEX_NAME).read_text())
    index[1]["conversations"] = [
        {"from": "human", "value": "<event>\nIs the road busy?"},
        {"from": "gpt", "value": "In the scene, there is one car."},
    ]
    write_json(out / layout.INDEX_NAME, index)
    ds = open_dataset(out)
    assert ds[0].question == "What are the key elements in this scene?" and ds[0].answer == ""
    assert ds[1].question == "Is the road busy?" and ds[1].answer == "In the scene, there is one car."

    assert ds[1].ground_truth() is None
    truth = {"scene": {"layout": "straight", "vehicles": []}, "qa": []}
    write_json(out / "scene" / "seqA" / "000001.json", truth)
    assert ds[1].ground_truth() == truth


def test_world_root_questions_and_sensor_size(built):
    out, _, _ = built
    write_json(out.parent / "questions.json", [{"question": "Describe the scene.", "count": 12}, "Is it night?"])
    write_json(out.parent / "world.json", {"sensor_size": [320, 240]})
    ds = open_dataset(out)
    assert ds.world_root == out.parent.resolve()
    assert ds.questions() == [
        {"question": "Describe the scene.", "count": 12},
        {"question": "Is it night?", "count": 0},
    ]
    assert ds.sensor_size == (320, 240) and ds[0].sensor_size == (320, 240)
    write_json(out.parent / "questions.json", {"questions": 3})
    _error(lambda: open_dataset(out).questions(), "questions.json", "list of {question, count}")
    write_json(out.parent / "world.json", {"sensor_size": "640x480"})
    _error(lambda: open_dataset(out).sensor_size, "world.json", "sensor_size")


def test_sensor_size_from_events_when_no_images(built):
    out, _, spec = built
    for p in (out / "event_image_1f" / "seqA").glob("*.png"):
        p.unlink()
    for p in (out / "event_image" / "seqA").glob("*.png"):
        p.unlink()
    ds = open_dataset(out)
    ev = ds[0].events()
    assert ds.sensor_size == (int(ev["x"].max()) + 1, int(ev["y"].max()) + 1)


def _error(fn, *needles):
    with pytest.raises(SpecalignError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg


def test_bad_datasets(built, tmp_path):
    out, _, _ = built
    ds = open_dataset(out)
    _error(lambda: ds[5], layout.INDEX_NAME, "out of range")
    _error(lambda: ds[0].event_images(3), "seqA/000000", "5 or 1")
    for p in (out / "video" / "seqA" / "000002").iterdir():
        p.unlink()
    _error(lambda: ds[2].frames(8), "000002", "20 of the clip's 20 frames are missing")
    before = ds[3].frames(30)
    Image.new("RGB", (4, 4)).save(out / "video" / "seqA" / "000003" / "zzz.png")  # a stray file is no frame
    np.testing.assert_array_equal(ds[3].frames(30), before)
    Image.new("RGB", (4, 4)).save(out / "video" / "seqA" / "000003" / "000030.png")
    _error(lambda: ds[3].frames(30), "000003", "different sizes")
    (out / "video" / "seqA" / "000004" / "000045.png").write_bytes(b"not a png")
    _error(lambda: ds[4].frames(30), "000045.png", "unreadable image")
    (out / "scene" / "seqA").mkdir(parents=True)
    (out / "scene" / "seqA" / "000000.json").write_text("[1, 2")
    _error(lambda: ds[0].ground_truth(), "000000.json", "not valid JSON")

    _error(lambda: open_dataset(tmp_path / "nowhere"), "nowhere", "not found")
    (tmp_path / "empty").mkdir()
    _error(lambda: open_dataset(tmp_path / "empty"), layout.INDEX_NAME, "not found")
    (out / layout.INDEX_NAME).write_text('{"id": 1}')
    _error(lambda: open_dataset(out), layout.INDEX_NAME, "JSON list")
    (out / layout.INDEX_NAME).write_text('[{"id": "seqA/000000"}, {"event_data": "x.npy"}]')
    _error(lambda: open_dataset(out), layout.INDEX_NAME, "entry 1")
    (out / layout.INDEX_NAME).write_text("[{")
    _error(lambda: open_dataset(out), layout.INDEX_NAME, "not valid JSON")
