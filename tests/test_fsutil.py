"""fsutil.write_json: flat_numbers puts arrays of numbers on one line and changes nothing a reader sees."""

import json

from specalign.fsutil import read_json, write_json


def test_write_json_flat_numbers_round_trips(tmp_path):
    obj = {"traces": [{"accepted": [0, 3, -1, 2.5e-3], "tokens": 50}], "names": ["a", "b"], "empty": [], "x": 1.0}
    write_json(tmp_path / "a.json", obj, flat_numbers=True)
    text = (tmp_path / "a.json").read_text()
    assert '"accepted": [0, 3, -1, 0.0025]' in text
    assert '"a",\n' in text, "lists of strings keep their lines"
    assert read_json(tmp_path / "a.json") == obj == json.loads(text)
