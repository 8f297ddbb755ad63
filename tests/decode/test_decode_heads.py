"""Draft heads in the decoder: the head on the engine computes what its training forward computes (prefill over
pairs, one more pair, a tree node), and greedy SD with a head is token-identical to the target alone, as a chain
or a tree, plain, fused or with event tokens, and through the feature-adapter cascade."""

import pytest
import torch
from random_models import random_vlm

from specalign.align.features import visual_positions_end
from specalign.align.heads import DraftHead, FeatureAdapter, HeadConfig, attach_parts, attach_target
from specalign.data import open_dataset
from specalign.decode.engine import Engine, _fill, language_model, prompt_embeds
from specalign.decode.heads import CascadeDraft, HeadDraft, HybridDraft, TreeShape, head_feature_layers
from specalign.decode.sources import FixedDraft, VLMDraft
from specalign.decode.speculative import Stats, speculative_decode, target_generate
from specalign.errors import SpecalignError


@pytest.fixture(scope="module")
def pair(small_world):
    return random_vlm("target", small_world, 5), random_vlm("draft", small_world, 6)


@pytest.fixture(scope="module")
def dataset(small_world):
    return open_dataset(small_world / "my_egpt_dsec_seq_1s")


def make_head(target, kind="eagle", fused=False, events_size=None, draft_size=None, seed=0, layout="specalign"):
    torch.manual_seed(seed)
    D = target.model.lm_head.in_features
    cfg = HeadConfig(kind=kind, hidden_size=D, vocab_size=target.vocab_size, feature_size=3 * D if fused else D,
                     fused=fused, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                     events_size=events_size, draft_size=draft_size, layout=layout)  # fmt: skip
    head = (FeatureAdapter if kind == "feature-adapter" else DraftHead)(cfg).to(torch.float64).eval()
    attach_target(head, target)
    if kind == "eagle+events":
        with torch.no_grad():
            head.events_gate.fill_(0.5)  # open: the events change the head's outputs
    return head


@pytest.mark.parametrize("layout", ["specalign", "eagle-1"])
def test_head_on_the_engine_computes_its_training_forward(pair, layout):
    target, _ = pair
    head = make_head(target, layout=layout)
    engine = Engine(head, 64, features=(1,))
    T = 9
    feats = torch.randn(1, T + 1, 64, dtype=torch.float64)
    tokens = torch.randint(0, target.vocab_size, (1, T + 1))
    with torch.no_grad():
        ref = head(feats, tokens)  # [1, T + 1, D]
        _fill(engine, head.inputs(feats[:, :T], tokens[:, :T]), torch.ones(1, T, dtype=torch.bool), 0)
    torch.testing.assert_close(engine.features, ref[:, :T])
    engine.run(tokens[:, T:], inputs=feats[:, T:])  # one more pair, through the cache
    torch.testing.assert_close(engine.features, ref[:, T:])
    # a tree node at depth 1 is that pair again, seen through an explicit attend mask at its own position
    engine.rollback(T)
    attend = torch.zeros(1, 1, engine.max_len, dtype=torch.bool)
    attend[0, 0, : T + 1] = True
    engine.run(tokens[:, T:], inputs=feats[:, T:], positions=torch.tensor([[T]]), attend=attend)
    torch.testing.assert_close(engine.features, ref[:, T:])


def head_source(target, head, t_engine, h_engine, sample, tree=None, context=None):
    prompt = target.prepare(sample, "Describe the road.")
    te = prompt_embeds(target, target.collate([prompt]))[0]
    ids = prompt.input_ids
    start = int(visual_positions_end(target, ids))
    return te, lambda: HeadDraft(h_engine, t_engine, ids.tolist(), start, context, tree)


@pytest.mark.parametrize("variant", ["chain", "tree", "fused-tree", "events-tree", "eagle-1-tree"])
def test_greedy_sd_with_a_head_is_token_identical(pair, dataset, variant):
    target, draft = pair
    kind = "eagle+events" if variant.startswith("events") else "eagle"
    head = make_head(target, kind, fused=variant.startswith("fused"), events_size=32 if kind != "eagle" else None,
                     layout="eagle-1" if variant.startswith("eagle-1") else "specalign")  # fmt: skip
    n_layers = len(language_model(target)[0].layers)
    t_engine = Engine(target, 500, features=head_feature_layers(head, n_layers))
    h_engine = Engine(head, 300, features=(1,))
    tree = TreeShape(3, 4, 10) if variant != "chain" else None
    context = torch.randn(1, 7, 32, dtype=torch.float64) if kind == "eagle+events" else None
    eos = target.eos_token_id
    for i in range(len(dataset)):
        te, source = head_source(target, head, t_engine, h_engine, dataset[i], tree, context)
        ref, _ = target_generate(t_engine, te, 30, eos)
        out, stats = speculative_decode(t_engine, te, source(), 4, 30, eos)
        assert out == ref
        if tree is not None:
            assert set(stats.nodes_per_round) <= {tree.nodes} | set(range(tree.topk + 1)), stats.nodes_per_round
            assert max(stats.drafted_per_round) <= 4


def test_a_head_that_repeats_the_last_token_stays_lossless(pair, dataset):
    """fc passes the feature through and the layer adds nothing, so the head reads the target's LM head on the
    target's own feature: it proposes the token it was just given (a wrong guess unless the target repeats itself),
    at every node of a tree."""
    target, _ = pair
    head = make_head(target)
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, :64] = torch.eye(64)
        head.fc.bias.zero_()
        for p in (head.layers[0].self_attn.o_proj.weight, head.layers[0].mlp.down_proj.weight):
            p.zero_()
        head.norm.weight.copy_(language_model(target)[0].norm.weight)
    t_engine = Engine(target, 500, features=(2,))
    h_engine = Engine(head, 300, features=(1,))
    te, source = head_source(target, head, t_engine, h_engine, dataset[0], TreeShape(4, 3, 12))
    ref, _ = target_generate(t_engine, te, 30, target.eos_token_id)
    out, stats = speculative_decode(t_engine, te, source(), 3, 30, target.eos_token_id)
    assert out == ref
    repeats = sum(a == b for a, b in zip(ref, ref[1:], strict=False))
    assert stats.accepted <= repeats, "only a repeated token can be guessed by repeating"


def test_cascade_through_a_feature_adapter_is_token_identical(pair, dataset):
    target, draft = pair
    adapter = make_head(target, "feature-adapter", draft_size=64)
    d_layers = (len(language_model(draft)[0].layers),)
    t_engine, d_engine = Engine(target, 500), Engine(draft, 400, features=d_layers)
    eos = target.eos_token_id
    for i in range(len(dataset)):
        q = "Describe the road."
        te = prompt_embeds(target, target.collate([target.prepare(dataset[i], q)]))[0]
        de = prompt_embeds(draft, draft.collate([draft.prepare(dataset[i], q)]))[0]
        ref, _ = target_generate(t_engine, te, 30, eos)
        source = CascadeDraft(d_engine, de, adapter)
        out, stats = speculative_decode(t_engine, te, source, 4, 30, eos)
        assert out == ref and stats.drafted > 0
        # its proposals are the adapter's: the target's LM head over the adapted draft feature
        source.start(Stats())
        with torch.inference_mode():
            want = adapter.lm_head(adapter(d_engine.features[:, -1])).argmax(-1)
        assert int(source.logits.argmax(-1)) == int(want)


def test_bad_tree_envelopes_are_refused():
    with pytest.raises(SpecalignError, match="TOPK,DEPTH,NODES"):
        TreeShape.parse("10,6")
    with pytest.raises(SpecalignError, match="at most 2 candidates"):
        TreeShape.parse("2,1,40")
    with pytest.raises(SpecalignError, match="one verify may hold"):
        TreeShape.parse("10,30,1000")


def test_a_head_needs_a_target_engine_with_features(pair):
    target, _ = pair
    head = make_head(target)
    with pytest.raises(SpecalignError, match="keeps no features"):
        HeadDraft(Engine(head, 64, features=(1,)), Engine(target, 64), [1, 2, 3], 0)
    attach_parts(head, None, None)
    with pytest.raises(SpecalignError, match="no target attached"):
        head.inputs(torch.zeros(1, 1, 64, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("hide", [False, True])
def test_hybrid_first_round_from_the_event_draft_then_the_head(pair, dataset, hide):
    """The hybrid: round 1 comes from the first source (drafted during the target's prefill with hide), later
    rounds from the head, which catches up on the prompt and round 1's verified features. An always-right first
    source shows both: round 1 accepts all gamma tokens (for free when hidden), and the output stays the
    target's, with a real draft VLM first as well."""
    target, draft = pair
    head = make_head(target)
    t_engine, h_engine = Engine(target, 500, features=(2,)), Engine(head, 300, features=(1,))
    d_engine = Engine(draft, 400)
    eos = target.eos_token_id
    for i in range(len(dataset)):
        te, source = head_source(target, head, t_engine, h_engine, dataset[i], TreeShape(3, 4, 10))
        de = prompt_embeds(draft, draft.collate([draft.prepare(dataset[i], "Describe the road.")]))[0]
        ref, _ = target_generate(t_engine, te, 30, eos)
        right = HybridDraft(FixedDraft(ref), source())
        out, stats = speculative_decode(t_engine, te, right, 4, 30, eos, hide_prefill=hide)
        assert out == ref and stats.accepted_per_round[0] == min(4, len(ref) - 1)
        assert stats.free_tokens == (stats.accepted_per_round[0] if hide else 0) and stats.prefill_hit == hide
        out, _ = speculative_decode(t_engine, te, HybridDraft(VLMDraft(d_engine, de), source()), 4, 30, eos,
                                    hide_prefill=hide)  # fmt: skip
        assert out == ref
        if hide:  # a shorter draft in the prefill's shadow: round 1 verifies what it drafted beyond the first
            out, stats = speculative_decode(t_engine, te, HybridDraft(FixedDraft(ref), source()), 4, 30, eos,
                                            hide_prefill=True, prefill_draft=3)  # fmt: skip
            assert out == ref and stats.drafted_per_round[0] == min(2, len(ref) - 1) == stats.free_tokens


def test_hybrid_hands_round_one_to_the_head_when_the_event_draft_missed(pair, dataset):
    """A first-token guess the target does not share: round 1 is the head's tree, not a second draft-VLM round."""
    target, _ = pair
    head = make_head(target)
    t_engine, h_engine = Engine(target, 500, features=(2,)), Engine(head, 300, features=(1,))
    eos = target.eos_token_id
    te, source = head_source(target, head, t_engine, h_engine, dataset[0], TreeShape(3, 4, 10))
    ref, _ = target_generate(t_engine, te, 30, eos)
    wrong = [(ref[0] + 1) % target.vocab_size] + ref[1:]  # right after the first token, never asked again
    first = FixedDraft(wrong)
    out, stats = speculative_decode(t_engine, te, HybridDraft(first, source()), 4, 30, eos, hide_prefill=True)
    assert out == ref and stats.free_tokens == 0 and not stats.prefill_hit
    assert stats.nodes_per_round[0] == 10  # the head's tree of 10 nodes, not the first source's chain of 4
