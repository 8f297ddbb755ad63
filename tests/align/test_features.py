"""Teacher-forced features of `extract --hidden-states` on the bundled models: each stored feature is the state its
token was predicted from, draft rows line up with the target's, the events are the draft's spliced visual tokens,
and the reader refuses a broken folder on one line."""

import json
import shutil

import pytest
import torch

from specalign.align.extract import ExtractConfig, extract
from specalign.align.features import (
    FeatureStore,
    decoder,
    fused_layers,
    load_all,
    placeholder_ids,
    tokenizer_fingerprint,
    visual_positions_end,
)
from specalign.errors import SpecalignError
from specalign.models.base import Prompt
from specalign.models.registry import BUNDLED
from specalign.world.build import WorldConfig, build_world

pytestmark = pytest.mark.skipif(
    not all((p / "config.json").is_file() for p in BUNDLED.values()), reason="bundled models not present"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    world = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(world), train=0, test=2, clips_per_sequence=2, mp4=False), progress=False)
    split = world / "my_egpt_dsec_seq_1s"
    out = tmp_path_factory.mktemp("features") / "run"
    extract(ExtractConfig(dataset=str(split), out=str(out), questions=2, max_new_tokens=12, batch_size=3,
                          device="cpu", hidden_states=True, hidden_layers=True), progress=False)  # fmt: skip
    return split, out


@pytest.fixture(scope="module")
def models():
    from specalign.models import load_model

    return load_model("mini-target"), load_model("mini-draft")


def pairs(out):
    return {(p["sample_idx"], p["question_idx"]): p for p in map(json.loads, (out / "pairs.jsonl").open())}


def prompt(vlm, split, s, q, questions):
    from specalign.data import open_dataset

    visual = vlm.visual_inputs(open_dataset(split)[s])
    text = vlm.prompt_text(questions[q])
    return Prompt(vlm.expand_prompt(text, visual), visual, text)


def test_target_features_are_what_each_token_was_predicted_from(run, models):
    split, out = run
    target, _ = models
    store = FeatureStore(out)
    recs = load_all(store)
    questions = json.loads((out / "manifest.json").read_text())["questions"]
    D, n_layers = store.meta["target_hidden_size"], store.meta["target_n_layers"]
    assert store.keys() == [(0, 0), (0, 1), (1, 0), (1, 1)] and len(recs) == len(store) == 4
    assert store.meta["layer_indices"] == list(fused_layers(n_layers)) == [0, 2, 3]
    assert store.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(target.tokenizer)
    dec = decoder(target)
    for r, p in zip(recs, pairs(out).values(), strict=True):
        k, a = r.prompt_len, p["vl_tokens"]
        m = len(r.ids)
        assert r.ids[k:].tolist() == a and m == k + len(a)
        assert r.target.shape == (m, D) and r.layers.shape == (m, 3 * D) and r.target.dtype == target.dtype
        # greedy: the LM head on the feature of every answer row's predecessor gives back the token (float ties aside)
        logits = target.model.lm_head(r.target[k - 1 : -1])
        gap = logits.max(-1).values - logits.gather(1, r.ids[k:, None])[:, 0]
        assert (gap <= 1e-4).all(), gap
        # an independent forward of the whole prompt: the text positions after the visual tokens, as HF returns them
        full = prompt(target, split, r.sample_idx, r.question_idx, questions)
        assert r.ids[:k].tolist() == full.input_ids[-k:].tolist()
        with torch.inference_mode():
            hf = target.model(input_ids=torch.cat([full.input_ids, r.ids[k:]])[None], output_hidden_states=True,
                              **full.visual).hidden_states  # fmt: skip
        torch.testing.assert_close(r.target, hf[-1][0, -m:], atol=1e-4, rtol=1e-4)
        low, mid, high = r.layers.split(D, dim=-1)
        torch.testing.assert_close(low, hf[1][0, -m:], atol=1e-4, rtol=1e-4)  # decoder layer 0's output
        torch.testing.assert_close(mid, hf[3][0, -m:], atol=1e-4, rtol=1e-4)  # layer 2
        # HF puts the normed state in place of the top layer's output: ours is the layer's own, which normed gives it
        assert not torch.allclose(high, r.target)
        torch.testing.assert_close(dec.norm(high), r.target, atol=1e-4, rtol=1e-4)


def test_draft_rows_predict_the_same_tokens_as_the_target_rows(run, models):
    split, out = run
    _, draft = models
    questions = json.loads((out / "manifest.json").read_text())["questions"]
    store = FeatureStore(out)
    assert store.meta["draft_hidden_size"] == decoder(draft).norm.weight.shape[0]
    for r in load_all(store):
        a = r.ids[r.prompt_len :]
        assert r.draft.shape == (len(a), store.meta["draft_hidden_size"])
        # the draft alone, step by step through its KV cache: its logits before each answer token
        state, step = draft.prefill(draft.collate([prompt(draft, split, r.sample_idx, r.question_idx, questions)]))
        steps = [step.logits[0, -1]]
        for t in a[:-1].tolist():
            steps.append(draft.forward(torch.tensor([[t]]), state).logits[0, -1])
        with torch.inference_mode():
            torch.testing.assert_close(draft.model.lm_head(r.draft), torch.stack(steps), atol=1e-4, rtol=1e-4)


def test_events_are_the_draft_event_tokens_as_spliced_in(run, models):
    split, out = run
    _, draft = models
    store = FeatureStore(out)
    questions = json.loads((out / "manifest.json").read_text())["questions"]
    for r in load_all(store):
        visual = prompt(draft, split, r.sample_idx, 0, questions).visual["event_pixel_values"]
        frames = visual.shape[1]
        assert r.events.shape == (draft.model.num_event_tokens(frames), store.meta["draft_hidden_size"])
        with torch.inference_mode():
            torch.testing.assert_close(r.events, draft.model.encode_events(visual)[0], atol=1e-5, rtol=1e-5)


def test_visual_positions_end_for_both_backends(run, models):
    split, _ = run
    for vlm in models:
        p = prompt(vlm, split, 0, 0, ["Describe the scene."])
        end = int(visual_positions_end(vlm, p.input_ids))
        slots = torch.isin(p.input_ids, torch.tensor(placeholder_ids(vlm)))
        assert slots[end - 1] and not slots[end:].any() and slots.sum() > 1
        batch = vlm.collate([p, Prompt(p.input_ids[end:], p.visual, "")])  # a row without placeholders
        assert visual_positions_end(vlm, batch.input_ids).tolist() == [end, 0]


def test_tokenizer_fingerprint_tells_tokenizers_apart(models):
    import copy

    target, draft = models
    assert tokenizer_fingerprint(target.tokenizer) == tokenizer_fingerprint(copy.deepcopy(target.tokenizer))
    other = copy.deepcopy(target.tokenizer)
    other.add_tokens(["<brand-new>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(target.tokenizer)


def one_line_error(match, fn):
    with pytest.raises(SpecalignError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_broken_folders_are_refused_on_one_line(run, tmp_path):
    _, out = run
    one_line_error("no such folder", lambda: FeatureStore(tmp_path / "nowhere"))
    (tmp_path / "plain").mkdir()
    one_line_error("no features in this run", lambda: FeatureStore(tmp_path / "plain"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert len(FeatureStore(copy / "features")) == 4, "the features folder itself opens too"
    victim = sorted((copy / "features").glob("draft.*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    err = one_line_error("truncated or corrupt features file", lambda: FeatureStore(copy))
    assert err.startswith(str(victim))
    victim.unlink()
    one_line_error(f"{victim}: missing", lambda: FeatureStore(copy))
    (copy / "features" / "meta.json").unlink()
    one_line_error("did not finish", lambda: FeatureStore(copy))


def test_target_only_ids_go_into_the_draft_as_its_unknown_token(run, models):
    from specalign.align.features import draft_features

    split, out = run
    _, draft = models
    p = prompt(draft, split, 0, 0, ["Describe the scene."])
    a = pairs(out)[(0, 0)]["vl_tokens"]
    limit = sorted(a[:-1])[len(a) // 2]  # about half the answer lies above: as if only the draft lacked those ids
    unk = draft.tokenizer.unk_token_id
    assert unk < limit
    mapped = [t if t < limit else unk for t in a[:-1]] + a[-1:]
    got = draft_features(draft, [p], [a], limit)[0]["draft"]
    torch.testing.assert_close(got, draft_features(draft, [p], [mapped], draft.vocab_size)[0]["draft"])
    assert not torch.allclose(got, draft_features(draft, [p], [a], draft.vocab_size)[0]["draft"])


def test_a_sample_alone_and_a_sample_sharing_its_prefix_give_the_same_features(run, models):
    """The run asked 2 questions per sample (their visual prefix runs once); each row alone runs in full."""
    from specalign.align.features import draft_features, target_features

    split, out = run
    target, draft = models
    questions = json.loads((out / "manifest.json").read_text())["questions"]
    recs = load_all(FeatureStore(out))
    answers = [r.ids[r.prompt_len :].tolist() for r in recs]
    for vlm in models:  # rows of several samples in one batch: the visual input differs, nothing is shared
        prompts = [prompt(vlm, split, r.sample_idx, r.question_idx, questions) for r in recs[::2]]
        if vlm is target:
            alone = target_features(target, prompts, answers[::2], fused_layers(4))
            for r, f in zip(recs[::2], alone, strict=True):
                assert torch.equal(f["ids"], r.ids) and f["prompt_len"] == r.prompt_len
                torch.testing.assert_close(f["target"], r.target, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(f["layers"], r.layers, atol=1e-4, rtol=1e-4)
        else:
            alone = draft_features(draft, prompts, answers[::2], draft.vocab_size)
            for r, f in zip(recs[::2], alone, strict=True):
                torch.testing.assert_close(f["draft"], r.draft, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(f["events"], r.events, atol=1e-5, rtol=1e-5)
