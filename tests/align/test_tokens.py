"""Token pairs: the reference JSON format, our store, and one-line errors for broken files."""

import json

import pytest
import torch

from specalign.align.tokens import (
    TokenPairs,
    pad_batch,
    read_pairs,
    read_reference_json,
    write_pairs,
    write_reference_json,
)
from specalign.errors import SpecalignError


def sample_pairs() -> TokenPairs:
    return TokenPairs(draft=[[5, 6, 7], [8]], target=[[9, 10], [11, 12, 13, 14]], sample_id=["a", "b"],
                      question_idx=[0, 1], query=["what?", "why?"], draft_text=["x y z", "w"],
                      target_text=["p q", "r s t u"], sample_idx=[0, 1])  # fmt: skip


def test_reference_json_roundtrip(tmp_path):
    path = write_reference_json(sample_pairs(), tmp_path / "tokens.json")
    blob = json.loads(path.read_text())
    assert set(blob["results"][0]) == {"sample_idx", "question_idx", "sample_id", "query", "egpt_tokens",
                                       "egpt_text", "vl_tokens", "vl_text"}  # fmt: skip
    back = read_reference_json(path)
    assert back == sample_pairs()
    assert back.vocab_size is None and back.max_token_id() == 14


def test_store_and_directory_of_json_files(tmp_path):
    pairs = sample_pairs()
    pairs.vocab_size = 40
    write_pairs(pairs, tmp_path / "store")
    assert read_pairs(tmp_path / "store") == pairs
    write_reference_json(sample_pairs(), tmp_path / "many" / "a.json")
    write_reference_json(sample_pairs(), tmp_path / "many" / "b.json")
    both = read_pairs(tmp_path / "many")
    assert len(both) == 4 and both.draft[2] == [5, 6, 7]
    assert read_pairs(tmp_path / "many" / "a.json") == sample_pairs()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"),
        ('{"results": [{"egpt_tokens": [1, 2], "vl_tok', "not valid JSON"),
        ('{"results": [{"egpt_tokens": [1, 2]}]}', "results[0]: missing key 'vl_tokens'"),
        ('{"results": [{"egpt_tokens": [1, "x"], "vl_tokens": []}]}', "results[0].egpt_tokens[1]"),
        ("[1, 2]", "'results'"),
    ],
)
def test_bad_token_files_give_one_line_errors(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SpecalignError) as e:
        read_pairs(path)
    msg = str(e.value)
    assert str(path) in msg and problem in msg and "\n" not in msg


def test_bad_store_line(tmp_path):
    write_pairs(sample_pairs(), tmp_path / "s")
    (tmp_path / "s" / "pairs.jsonl").write_text('{"egpt_tokens": [1], "vl_tokens": [2]}\n{"egpt_tok\n')
    with pytest.raises(SpecalignError, match="pairs.jsonl: line 2"):
        read_pairs(tmp_path / "s")
    with pytest.raises(SpecalignError, match="not found"):
        read_pairs(tmp_path / "missing")


def test_pad_batch_right_pads_and_truncates():
    assert pad_batch([[1, 2, 3], [4]]).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_batch([[1, 2, 3], [4]], length=2).tolist() == [[1, 2], [4, 0]]
    assert pad_batch([[1]], length=3).dtype == torch.long


def test_a_folder_of_reference_files_skips_hidden_temp_files(tmp_path):
    import json

    from specalign.align.tokens import read_pairs

    entry = {"sample_idx": 0, "question_idx": 0, "sample_id": "s/000000", "query": "q",
             "egpt_tokens": [5, 6, 2], "egpt_text": "a", "vl_tokens": [5, 7, 2], "vl_text": "b"}  # fmt: skip
    (tmp_path / "part0.json").write_text(json.dumps({"results": [entry]}))
    # what a killed atomic write leaves behind: a complete file under a hidden temp name
    (tmp_path / ".part1.json.abcd1234.tmp.json").write_text(json.dumps({"results": [entry, entry]}))
    assert len(read_pairs(tmp_path)) == 1
