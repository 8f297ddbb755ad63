"""The real pair's layouts end to end: an EventGPT-7B-layout draft (Llama's 32,000 tokens + <ev_patch> at 32,000)
and a Video-LLaVA-7B-hf-layout target (the same 32,000 + <image> <video> <pad>, embeddings padded to 32,064), both
tiny and random, through extract -> train -> speculate (plain, and with the TokenAdapter) by the Python API.
Checked: the vocabulary check accepts the pair (shared: 32,000), SD is token-identical to the target alone, no
proposal is ever an id >= 32,000 (the draft here prefers <ev_patch>, which means <image> to the target), and a
draft whose shared ids mean other tokens is refused on one line."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # the tiny checkpoint writers

from tiny_eventgpt import write_tiny_eventgpt  # noqa: E402
from tiny_video_llava import LLAMA_VOCAB, build_test_world, one_line_error, write_tiny_video_llava  # noqa: E402

import specalign.decode.run as speculate_module  # noqa: E402
from specalign.align.extract import ExtractConfig, extract  # noqa: E402
from specalign.align.train import AdapterTrainConfig, train_adapter  # noqa: E402
from specalign.decode.run import SpeculateConfig, run_speculate  # noqa: E402
from specalign.decode.sources import AdaptedDraft, VLMDraft, shared_vocabulary  # noqa: E402
from specalign.errors import SpecalignError  # noqa: E402
from specalign.models import inspect_model, load_model  # noqa: E402

SPLIT = "my_egpt_dsec_train_500ms"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(world folder, draft checkpoint, target checkpoint) in the two real layouts."""
    root = tmp_path_factory.mktemp("real-pair")
    world = build_test_world(root / "world")
    llama = world / "tokenizer.json"  # the world's BPE tokens inside Llama's 32,000
    draft = write_tiny_eventgpt(root / "EventGPT-7B", llama_vocab=llama, prefer_patch_token=True)
    target = write_tiny_video_llava(root / "Video-LLaVA-7B-hf", llama_vocab=llama)
    return world, draft, target


@pytest.fixture
def proposals(monkeypatch):
    """Every proposal speculate's draft sources make (the real sources, recorded on the way out)."""
    seen: list[list[int]] = []

    def recording(cls):
        class Recording(cls):
            def propose(self, accepted, gamma, stats):
                proposal = super().propose(accepted, gamma, stats)
                seen.append(list(proposal.tokens))
                return proposal

        return Recording

    monkeypatch.setattr(speculate_module, "VLMDraft", recording(VLMDraft))
    monkeypatch.setattr(speculate_module, "AdaptedDraft", recording(AdaptedDraft))
    return seen


def test_the_two_layouts_share_llamas_vocabulary(pair, tmp_path):
    _, draft_dir, target_dir = pair
    d, t = inspect_model(str(draft_dir)), inspect_model(str(target_dir))
    assert (d["backend"], d["tokenizer_size"], d["vocab_size"]) == ("eventgpt", LLAMA_VOCAB + 1, LLAMA_VOCAB + 1)
    assert (t["backend"], t["tokenizer_size"], t["vocab_size"]) == ("video-llava", LLAMA_VOCAB + 3, 32064)
    draft, target = load_model(str(draft_dir)), load_model(str(target_dir))
    assert target.tokenizer.convert_tokens_to_ids(["<image>", "<video>", "<pad>"]) == [32000, 32001, 32002]
    assert draft.tokenizer.convert_tokens_to_ids("<ev_patch>") == 32000  # the same id, another token
    assert shared_vocabulary(draft, target) == LLAMA_VOCAB
    plain = load_model(str(write_tiny_eventgpt(tmp_path / "no-patch", llama_vocab=pair[0] / "tokenizer.json",
                                               patch_token=False)))  # fmt: skip
    assert len(plain.tokenizer) == plain.vocab_size == LLAMA_VOCAB  # 32,000 vs 32,003 tokens
    assert shared_vocabulary(plain, target) == LLAMA_VOCAB
    assert shared_vocabulary(target, target) == LLAMA_VOCAB + 3  # one tokenizer: every id, specials too


def test_extract_train_speculate_is_lossless_and_proposes_only_shared_ids(pair, tmp_path, proposals):
    world, draft, target = pair
    split = str(world / SPLIT)
    pairs = tmp_path / "pairs"
    manifest = extract(ExtractConfig(dataset=split, out=str(pairs), draft=str(draft), target=str(target),
                                     max_new_tokens=8, batch_size=4, device="cpu"), progress=False)  # fmt: skip
    assert manifest["pairs"] == 2 and manifest["vocab_size"] == 32064
    rows = [json.loads(line) for line in (pairs / "pairs.jsonl").read_text().splitlines()]
    assert any(LLAMA_VOCAB in r["egpt_tokens"] for r in rows)  # left alone, the draft says <ev_patch> (32000)
    trained = train_adapter(AdapterTrainConfig(train=str(pairs), test=str(pairs), out=str(tmp_path / "task"),
                                               epochs=2, batch_size=2, lr=1e-3, warmup_steps=1, embed_dim=32,
                                               num_layers=1, num_heads=2, ffn_dim=64, dropout=0.0, device="cpu",
                                               checkpoint_every_s=0.0), progress=False)  # fmt: skip
    adapter = Path(trained["task_dir"]) / "best_model"
    assert adapter.is_dir()
    for name, token_adapter in (("plain", None), ("adapter", str(adapter))):
        proposals.clear()
        res = run_speculate(SpeculateConfig(dataset=split, out=str(tmp_path / name), draft=str(draft),
                                            target=str(target), max_samples=1, max_new_tokens=12, gamma=3, repeats=1,
                                            hf_baseline=False, token_adapter=token_adapter, device="cpu"),
                            progress=False)  # fmt: skip
        assert res["lossless"] is True, name
        for row in res["samples"]:
            assert row["sd_tokens"] == row["target_tokens"] and len(row["sd_tokens"]) > 1, name
        drafted = [t for p in proposals for t in p]
        assert drafted and max(drafted) < LLAMA_VOCAB, name  # never <ev_patch>, <image>, <video>, <pad> or padding
        assert res["totals"]["tokens"] == sum(len(r["target_tokens"]) for r in res["samples"])


def test_a_draft_whose_shared_ids_mean_other_tokens_is_refused(pair, tmp_path, monkeypatch):
    import specalign.models

    world, draft, target = pair
    wrong = shutil.copytree(draft, tmp_path / "EventGPT-other-tokenizer")
    data = json.loads((wrong / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = [tok for tok, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # ids 100 and 101 swapped: another tokenizer inside Llama's range
    (wrong / "tokenizer.json").write_text(json.dumps(data))
    # refused from the tokenizers alone, before either model loads
    monkeypatch.setattr(specalign.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SpecalignError) as e:
        run_speculate(SpeculateConfig(dataset=str(world / SPLIT), out=str(tmp_path / "out"), draft=str(wrong),
                                      target=str(target), max_new_tokens=4, repeats=1, hf_baseline=False,
                                      device="cpu"), progress=False)  # fmt: skip
    msg = one_line_error(e, wrong)
    assert "different tokenizers" in msg and "2 of the 32000" in msg and "first: id 100" in msg
    assert not (tmp_path / "out" / "results.json").exists()
