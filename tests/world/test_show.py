import numpy as np
import pytest
from PIL import Image

from specalign.data.layout import INDEX_NAME, Window, write_clip
from specalign.errors import SpecalignError
from specalign.fsutil import write_json
from specalign.world.show import contact_sheet, scene_lines

W, H = 80, 60
QUESTION = "What color are the vehicles?"
TRUTH = {
    "scene": {
        "layout": "curve_left",
        "ego": "slow",
        "ego_speed": 4.2,
        "time_of_day": "dusk",
        "vehicles": [
            {"kind": "car", "colour": "red", "state": "oncoming", "side": "left", "x": -3.5, "z0": 20.0, "speed": 9.0},
            {"kind": "bus", "colour": "blue", "state": "parked", "side": "right", "x": 3.0, "z0": 35.5, "speed": 0.0},
        ],
        "pedestrians": [],
        "roadside": [{"kind": "tree", "side": "left", "spacing": 12.0, "phase": 3.0, "colour": None, "height": 0.0}],
        "traffic_light": {"state": "green", "side": "right", "z0": 40.0},
    },
    "qa": [
        {
            "category": "colours",
            "question": QUESTION,
            "target": "The oncoming car on the left is red and the parked bus on the right is blue. " * 3,
            "draft": "In the scene, there is a car coming towards us and a bus parked on the right side.",
        }
    ],
}


def _split(root, with_truth: bool):
    """A two-clip split written through layout.write_clip, like the world builder does."""
    rng = np.random.default_rng(0)
    entries = []
    for k in range(2):
        n = 4000
        events = {
            "x": rng.integers(0, W, n).astype(np.uint16),
            "y": rng.integers(0, H, n).astype(np.uint16),
            "t": np.sort(rng.integers(k * 500_000, k * 500_000 + 1_000_000, n)).astype(np.int64),
            "p": rng.integers(0, 2, n).astype(np.uint8),
        }
        window = Window(k, k * 500_000, k * 500_000 + 1_000_000, list(range(k * 10, k * 10 + 20)))
        ramp = np.linspace(0, 255, W, dtype=np.uint8)[None, :, None]
        frames = [np.broadcast_to(ramp, (H, W, 3)).copy() // (1 + i % 3) for i in range(20)]
        conversations = [{"from": "human", "value": "<event>\n" + QUESTION}, {"from": "gpt", "value": ""}]
        entries.append(
            write_clip(
                root,
                root.name,
                "seq0",
                window,
                1_000_000,
                events,
                frames,
                [f"{i:06d}.png" for i in window.image_indices],
                (W, H),
                conversations,
                mp4=False,
            )
        )
        if with_truth:
            write_json(root / "scene" / "seq0" / f"{window.name}.json", TRUTH)
    write_json(root / INDEX_NAME, entries)
    return root


@pytest.mark.parametrize("with_truth", [True, False])
def test_contact_sheet_is_a_readable_png(tmp_path, with_truth):
    split = _split(tmp_path / "my_egpt_dsec_seq_1s", with_truth)
    out = contact_sheet(split, 1, tmp_path / "sheets" / "sheet.png")
    assert out == tmp_path / "sheets" / "sheet.png"
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (1600, 840)
    assert np.asarray(img.convert("L")).std() > 10  # not blank
    assert [p.name for p in out.parent.iterdir()] == ["sheet.png"]  # no temp file left behind


def test_contact_sheet_with_a_question_not_in_the_ground_truth(tmp_path):
    split = _split(tmp_path / "split", with_truth=True)
    out = contact_sheet(split, 0, tmp_path / "q.png", question="Is there a giraffe?")
    assert Image.open(out).size == (1600, 840)


def test_contact_sheet_bad_sample(tmp_path):
    split = _split(tmp_path / "split", with_truth=False)
    with pytest.raises(SpecalignError, match=f"{INDEX_NAME}: sample 7 out of range"):
        contact_sheet(split, 7, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_scene_lines_one_line_per_object():
    lines = scene_lines(TRUTH["scene"])
    assert "layout: curve_left" in lines[0] and "time_of_day: dusk" in lines[0]
    assert "vehicles (2):" in lines
    assert any(line.startswith("  - car red oncoming left") and "speed=9" in line for line in lines)
    assert "pedestrians: none" in lines
    assert any(line.startswith("traffic_light: green right") for line in lines)
    assert scene_lines({"vehicles": [{"kind": "car"}] * 100})[-1].startswith("... (+")
