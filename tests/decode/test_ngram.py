"""The text-only n-gram draft: the table, back-off, prompt lookup, its file, bad files on one line, and speculate with
it on the bundled minis (token-identical to the target alone, some proposals accepted)."""

import json

import pytest
import torch

from specalign.decode.ngram import NgramBuildConfig, NgramDraft, NgramTable, build_ngram, prompt_lookup
from specalign.decode.speculative import Stats
from specalign.errors import SpecalignError


def test_table_predicts_the_most_frequent_continuation_ties_to_the_smallest_id():
    t = NgramTable.build([[1, 2, 3], [1, 2, 3], [1, 2, 4], [5, 2, 9], [5, 2, 8]], n=3)
    assert t.predict([1, 2]) == (3, 2)  # seen twice after (1, 2); 4 once
    assert t.predict([5, 2]) == (8, 2)  # 8 and 9 once each: the smaller id
    assert t.predict([2]) == (3, 1)  # after (2,): 3 twice, 4, 8, 9 once
    assert t.next[1][(1, 2)] == (3, 2) and t.contexts == len(t.next[0]) + len(t.next[1])
    assert t.sequences == 5 and t.max_token_id() == 8  # 9 never wins a context: not stored


def test_back_off_to_shorter_contexts_and_stop_on_unknown():
    t = NgramTable.build([[10, 11, 12, 13]], n=4)
    assert t.predict([7, 8, 11, 12]) == (13, 2)  # (8, 11, 12) unknown, (11, 12) known
    assert t.predict([99, 12]) == (13, 1)
    assert t.predict([99]) is None and t.predict([]) is None
    d = NgramDraft(t, [], vocab_size=100)
    assert d.propose([10], 5, Stats()).tokens == [11, 12, 13]  # then nothing follows 13: the chain stops
    assert d.propose([99], 5, Stats()).tokens == []  # an empty proposal: a plain target step


def test_prompt_lookup_finds_a_repeated_span_and_wins_only_with_a_longer_match():
    seq = [5, 6, 7, 8, 1, 5, 6, 7]
    assert prompt_lookup(seq, 3) == (8, 3)  # (5, 6, 7) occurred before, followed by 8
    assert prompt_lookup([1, 2, 3], 3) is None
    assert prompt_lookup([4, 2, 4, 3, 4], 3) == (2, 1)  # the first occurrence, as in transformers
    table = NgramTable.build([[6, 7, 9]], n=4)  # the table knows (6, 7) -> 9: a 2-token context
    d = NgramDraft(table, prompt=[5, 6, 7, 8, 1, -200, 300], vocab_size=100)  # placeholder, id 300: dropped
    assert d.prompt == [5, 6, 7, 8, 1]
    # prompt + answer [5, 6, 7] ends in (5, 6, 7), seen in the prompt: 3 tokens beat the table's 2
    assert d.next_token([5, 6, 7, 8, 1, 5, 6, 7]) == (8, "lookup")
    assert d.next_token([0, 6, 7]) == (9, "table")  # lookup matches nothing: the table
    assert d.propose([5, 6, 7], 3, Stats()).tokens == [8, 1, 5]
    eos = NgramDraft(table, [], vocab_size=100, eos=9)
    assert eos.propose([6, 7], 4, Stats()).tokens == [9]  # nothing is drafted past the end of the answer


def test_save_load_round_trip(tmp_path):
    t = NgramTable.build([[1, 2, 3, 2, 3, 4], [3, 2, 3, 5]], n=3, source={"path": "x", "sha256": "0" * 64})
    path = t.save(tmp_path / "sub" / "ngram.json")
    back = NgramTable.load(path)
    assert (back.n, back.next, back.sequences, back.source) == (t.n, t.next, t.sequences, t.source)
    assert [p.name for p in path.parent.iterdir()] == ["ngram.json"]  # no temp file left


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "specalign.ngram_table", "n": 3, "contexts": [[]', "not valid JSON (truncated?)"),
        ('{"results": []}', "not an n-gram table"),
        ('{"format": "specalign.ngram_table", "n": 1, "contexts": []}', "n must be an integer of at least 2, found 1"),
        ('{"format": "specalign.ngram_table", "n": 4, "contexts": [[], []]}', "expected 3 context lengths for n = 4"),
        ('{"format": "specalign.ngram_table", "n": 2, "contexts": [[[1, 2]]]}', "contexts[0][0]: expected 1 context"),
        ('{"format": "specalign.ngram_table", "n": 2, "contexts": [[[1, -2, 1]]]}', "found [1, -2, 1]"),
    ],
)
def test_bad_table_files_are_refused_on_one_line(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(SpecalignError) as e:
        NgramTable.load(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_missing_table_and_bad_build_options_are_refused(tmp_path):
    with pytest.raises(SpecalignError, match="n-gram table not found"):
        NgramTable.load(tmp_path / "none.json")
    with pytest.raises(SpecalignError, match=r"^--n: must be at least 2, got 1$"):
        NgramBuildConfig(pairs="p", out="o.json", n=1)
    with pytest.raises(SpecalignError, match="is a folder"):
        build_ngram(NgramBuildConfig(pairs="p", out=str(tmp_path)))
    with pytest.raises(SpecalignError, match="token pairs not found"):
        build_ngram(NgramBuildConfig(pairs=str(tmp_path / "none"), out=str(tmp_path / "t.json")))


def test_build_from_a_reference_file_keeps_its_identity(tmp_path):
    ref = tmp_path / "ref.json"
    entries = [{"egpt_tokens": [9, 9], "vl_tokens": [1, 2, 3, 2]}, {"egpt_tokens": [9], "vl_tokens": [1, 2, 4]}]
    ref.write_text(json.dumps({"results": entries}))
    summary = build_ngram(NgramBuildConfig(pairs=str(ref), out=str(tmp_path / "t.json"), n=3))
    assert summary["sequences"] == 2 and summary["tokens"] == 7 and summary["path"] == str(tmp_path / "t.json")
    table = NgramTable.load(tmp_path / "t.json")
    assert table.predict([1, 2]) == (3, 2) and table.source["path"] == str(ref.resolve())  # the target's tokens
    assert len(table.source["sha256"]) == 64
    ref.write_text(json.dumps({"results": [{"egpt_tokens": [1], "vl_tokens": []}]}))
    with pytest.raises(SpecalignError, match="no target answers"):
        build_ngram(NgramBuildConfig(pairs=str(ref), out=str(tmp_path / "u.json")))
    assert not (tmp_path / "u.json").exists()


# ---------------------------------------------------------------- speculate with the minis


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from specalign.world.build import WorldConfig, build_world

    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=0, test=3, clips_per_sequence=2, mp4=False), progress=False)
    return out / "my_egpt_dsec_seq_1s"


@pytest.fixture(scope="module")
def table_file(split, tmp_path_factory):
    """A table of the target's own greedy answers on the split (question 1)."""
    from specalign.align.extract import load_questions
    from specalign.data import open_dataset
    from specalign.decode.engine import Engine, prompt_embeds
    from specalign.decode.speculative import target_generate
    from specalign.models import load_model

    dataset = open_dataset(split)
    target = load_model("mini-target", device="cpu")
    question = load_questions(dataset, 1, None)[0]
    answers = []
    for i in range(len(dataset)):
        embeds, _ = prompt_embeds(target, target.collate([target.prepare(dataset[i], question)]))
        engine = Engine(target, embeds.shape[1] + 40)
        answers.append(target_generate(engine, embeds, 24, target.eos_token_id)[0])
    return NgramTable.build(answers, n=8).save(tmp_path_factory.mktemp("ngram") / "ngram.json")


def config(split, out, **kw):
    from specalign.decode.run import SpeculateConfig

    small = {"dataset": str(split), "max_new_tokens": 24, "repeats": 1, "hf_baseline": False, "device": "cpu"}
    return SpeculateConfig(out=str(out), **{**small, **kw})


def test_speculate_with_the_table_is_token_identical_and_accepts(split, table_file, tmp_path):
    from specalign.decode.run import run_speculate

    res = run_speculate(config(split, tmp_path / "run", ngram=str(table_file), gamma=4), progress=False)
    assert res["verdict"]["line"] == "token-identical to the target alone: yes"
    assert all(r["sd_tokens"] == r["target_tokens"] for r in res["samples"])
    t = res["totals"]
    assert t["alpha"] > 0 and t["tau"] > 1
    print(f"ngram on {t['answers']} answers, gamma 4: alpha {t['alpha']:.3f} tau {t['tau']:.2f}")
    assert res["paths"]["ngram"] == str(table_file.resolve())
    settings = json.loads((tmp_path / "run" / "run_settings.json").read_text())
    assert json.dumps(settings).count(str(table_file.resolve())) >= 1 and "sha256" in json.dumps(settings)
    assert "n-gram table" in (tmp_path / "run" / "BENCHMARK_RESULTS.md").read_text()
    # sampling: the draft is one-hot, the acceptance rule stays valid; the run completes with the same source
    res = run_speculate(config(split, tmp_path / "sampled", ngram=str(table_file), temperature=1.0, check_draws=0,
                               max_samples=1), progress=False)  # fmt: skip
    assert res["totals"]["answers"] == 1


def test_speculate_refuses_a_bad_table_before_any_model_loads(split, tmp_path):
    from specalign.decode.run import run_speculate

    bad = tmp_path / "bad.json"
    bad.write_text("{")
    foreign = NgramTable.build([[1, 2, 40000]], n=2).save(tmp_path / "foreign.json")
    for table, message in ((bad, "not valid JSON"), (foreign, "holds token id 40000, outside the target's vocab")):
        with pytest.raises(SpecalignError, match=message):
            run_speculate(config(split, tmp_path / "out", ngram=str(table)), progress=False)
        assert not (tmp_path / "out").exists()
    with pytest.raises(SpecalignError, match=r"^--ngram: cannot be combined with --token-adapter"):
        config(split, tmp_path / "out", ngram=str(bad), token_adapter="x")
    with pytest.raises(SpecalignError, match=r"^--ngram: adaptive gamma"):
        config(split, tmp_path / "out", ngram=str(bad), min_confidence=0.3)


def test_draft_time_is_clocked():
    stats = Stats()
    NgramDraft(NgramTable.build([[1, 2, 3]], n=2), [], 10).propose([1], 2, stats)
    assert stats.seconds["draft"] > 0
    assert torch.device("cpu") == NgramDraft.device


def test_an_empty_one_hot_proposal_is_a_plain_sampled_step():
    from specalign.decode.speculative import Proposal, accept_sampling
    from specalign.models.base import Sampling

    logits = torch.tensor([[0.0, 5.0, 0.0]])  # [g + 1 = 1, V]
    n, token = accept_sampling(Proposal([]), logits, Sampling(1.0), torch.Generator().manual_seed(0))
    assert n == 0 and 0 <= token < 3
