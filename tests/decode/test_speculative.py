"""Speculative decoding is lossless: greedy SD emits exactly the target's greedy tokens, for every draft source and
gamma, on the bundled mini models and on random tiny models; sampling SD follows the target's distribution."""

import pytest
import torch

from specalign.align.token_adapter import TokenAdapter, TokenAdapterConfig
from specalign.data import open_dataset
from specalign.decode.engine import Engine, decode_one_token, language_model, prefill, prompt_embeds, verify
from specalign.decode.sources import AdaptedDraft, FixedDraft, VLMDraft, shared_vocabulary
from specalign.decode.speculative import (
    Proposal,
    accept_sampling,
    divergence,
    speculative_decode,
    target_generate,
)
from specalign.errors import SpecalignError
from specalign.models import load_model
from specalign.models.base import Sampling
from specalign.models.registry import MiniSizes, new_model
from specalign.world.build import WorldConfig, build_world

QUESTIONS = ["What are the key elements in this scene?", "What color are the vehicles?", "Describe the road."]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=2, test=4, clips_per_sequence=2, mp4=False), progress=False)
    return out


@pytest.fixture(scope="module")
def dataset(world):
    return open_dataset(world / "my_egpt_dsec_seq_1s")


@pytest.fixture(scope="module")
def minis():
    return load_model("mini-target"), load_model("mini-draft")


@pytest.fixture(scope="module")
def random_pair(world):
    """Random-weight target (Video-LLaVA) and draft (EventGPT) sharing the world's tokenizer, in float64 so that
    near-tied logits of random weights cannot flip between a one-token and a k-token forward."""
    tiny = MiniSizes(image_size=28, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2, lm_hidden=64,
                     lm_layers=2, lm_heads=4, lm_intermediate=128)  # fmt: skip
    target = new_model("target", world / "tokenizer.json", tiny, seed=1)
    draft = new_model("draft", world / "tokenizer.json", tiny, seed=2)
    for vlm in (target, draft):
        vlm.model.to(torch.float64).eval()
        with torch.no_grad():  # sharper logits, so random models still end answers now and then
            vlm.model.lm_head.weight.mul_(30)
    return target, draft


def embeds(vlm, sample, question):
    return prompt_embeds(vlm, vlm.collate([vlm.prepare(sample, question)]))[0]


def test_engine_matches_hf_generate_batched(minis, dataset):
    for vlm in minis:
        prompts = [vlm.prepare(dataset[1], q) for q in QUESTIONS]  # questions of different lengths: left padding
        ref = vlm.generate(prompts, max_new_tokens=30)
        emb, pad = prompt_embeds(vlm, vlm.collate(prompts))
        engine = Engine(vlm, max_len=emb.shape[1] + 32, batch=len(prompts))
        logits = prefill(engine, emb, pad)
        out = [[] for _ in prompts]
        for _ in range(30):
            token = logits.argmax(-1)
            for row, t in zip(out, token.tolist(), strict=True):
                row.append(t)
            logits = decode_one_token(engine, token)
        for r, expected in zip(out, ref, strict=True):
            assert r[: len(expected)] == expected


def sources(draft_vlm, draft_engine, draft_embeds, target_tokens, vocab):
    adapter = TokenAdapter(TokenAdapterConfig(vocab_size=vocab, embed_dim=32, num_layers=1, num_heads=2,
                                              ffn_dim=64))  # fmt: skip
    wrong = [(t + 1) % vocab for t in target_tokens]
    return {
        "draft-vlm": VLMDraft(draft_engine, draft_embeds),
        "adaptive": VLMDraft(draft_engine, draft_embeds, min_confidence=0.5),
        "adapter": AdaptedDraft(VLMDraft(draft_engine, draft_embeds), adapter.eval()),
        "adapter-resync": AdaptedDraft(VLMDraft(draft_engine, draft_embeds), adapter, resync=True),
        "always-right": FixedDraft(target_tokens),
        "always-wrong": FixedDraft(wrong),
    }


@pytest.mark.parametrize("pair", ["minis", "random_pair"])
def test_greedy_sd_is_token_identical_to_target(pair, dataset, request):
    target, draft = request.getfixturevalue(pair)
    assert shared_vocabulary(draft, target) == len(target.tokenizer) == target.vocab_size  # one tokenizer: all ids
    t_engine, d_engine = Engine(target, 700), Engine(draft, 400)
    alphas = {}
    for i in range(len(dataset)):
        for q in QUESTIONS[: 2 if pair == "minis" else 1]:
            te, de = embeds(target, dataset[i], q), embeds(draft, dataset[i], q)
            ref, _ = target_generate(t_engine, te, 40, target.eos_token_id)
            for name, src in sources(draft, d_engine, de, ref, target.vocab_size).items():
                for gamma in (1, 3, 6):
                    for hide in (False, True) if name in ("draft-vlm", "always-right") else (False,):
                        out, stats = speculative_decode(t_engine, te, src, gamma, 40, target.eos_token_id,
                                                        hide_prefill=hide)  # fmt: skip
                        assert out == ref, f"{name}, gamma {gamma}, hidden prefill {hide}, sample {i}: {out} != {ref}"
                        alphas.setdefault(name, []).append(stats.alpha)
                        assert stats.tau == pytest.approx(1 + stats.accepted / max(stats.rounds, 1))
                        if hide and name == "always-right":
                            assert stats.free_tokens == min(gamma, len(ref) - 1)
    assert min(alphas["always-right"]) == 1.0 and max(alphas["always-wrong"]) == 0.0
    if pair == "minis":  # the trained draft really helps: far above a wrong draft
        assert sum(alphas["draft-vlm"]) / len(alphas["draft-vlm"]) > 0.1


def test_leviathan_rule_samples_the_target_distribution():
    """Whatever q proposes, the emitted token is distributed as p (Leviathan et al., Theorem 1)."""
    g = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.05, 0.05, 0.6, 0.2, 0.1]])
    sampling = Sampling(temperature=1.0)
    p = torch.softmax(p_logits[0], -1)
    n = 20000
    counts = torch.zeros(5)
    accepted = 0
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        k, nxt = accept_sampling(Proposal([x], q), p_logits, sampling, g)
        counts[x if k == 1 else nxt] += 1
        accepted += k
    freq = counts / n
    assert torch.allclose(freq, p, atol=0.012), (freq, p)
    # the acceptance rate is sum(min(p, q)) (Leviathan et al., Lemma 3.3)
    assert accepted / n == pytest.approx(float(torch.minimum(p, q[0]).sum()), abs=0.015)


def test_sampling_sd_runs_and_matches_target_distribution_on_first_tokens(random_pair, dataset):
    target, draft = random_pair
    t_engine, d_engine = Engine(target, 700), Engine(draft, 400)
    te, de = embeds(target, dataset[0], QUESTIONS[0]), embeds(draft, dataset[0], QUESTIONS[0])
    sampling = Sampling(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    sd, alone = {}, {}
    for _ in range(300):
        src = VLMDraft(d_engine, de, sampling, g)
        out, _ = speculative_decode(t_engine, te, src, 3, 2, target.eos_token_id, sampling, g)
        ref, _ = target_generate(t_engine, te, 2, target.eos_token_id, sampling, g)
        sd[out[1] if len(out) > 1 else -1] = sd.get(out[1] if len(out) > 1 else -1, 0) + 1
        alone[ref[1] if len(ref) > 1 else -1] = alone.get(ref[1] if len(ref) > 1 else -1, 0) + 1
    # the second token comes from verification (the first from prefill); its distribution must match
    top = max(alone, key=alone.get)
    assert abs(sd.get(top, 0) - alone[top]) / 300 < 0.12


def test_bad_input_is_refused(minis, random_pair, dataset):
    target, draft = minis
    t_engine = Engine(target, 700)
    te = embeds(target, dataset[0], QUESTIONS[0])
    with pytest.raises(SpecalignError, match="gamma"):
        speculative_decode(t_engine, te, FixedDraft([]), 0, 10, target.eos_token_id)
    with pytest.raises(SpecalignError, match="does not fit"):
        prefill(Engine(target, 16), te)
    with pytest.raises(SpecalignError, match="unknown tune 'max'"):
        Engine(target, 16, compile=True, tune="max")
    short = Engine(target, te.shape[1] + 4)
    with pytest.raises(SpecalignError, match="exceed"):
        target_generate(short, te, 20, -1)
    # the random pair's tokenizer is the test world's, not the bundled models': refused on one line
    with pytest.raises(SpecalignError, match="different tokenizers") as e:
        shared_vocabulary(random_pair[1], target)
    assert "\n" not in str(e.value) and "first: id " in str(e.value)
    # a proposal outside the target's vocabulary is refused before it reaches the embeddings
    with pytest.raises(SpecalignError, match="outside the target's vocabulary"):
        speculative_decode(t_engine, te, FixedDraft([target.vocab_size + 5] * 60), 3, 10, target.eos_token_id)


def recorded(source):
    """The source, with every proposal it makes also appended to `source.proposed`."""
    source.proposed = []
    propose = source.propose

    def spy(accepted, gamma, stats):
        proposal = propose(accepted, gamma, stats)
        source.proposed.append(list(proposal.tokens))
        return proposal

    source.propose = spy
    return source


def test_a_draft_never_proposes_ids_outside_the_shared_vocabulary(random_pair, dataset):
    """Ids >= shared_vocab (the draft's own extra tokens, the target's specials) are never proposed, even where the
    draft's argmax is one of them; the target, which may emit such ids itself, still decides every token."""
    target, draft = random_pair
    shared = draft.vocab_size - 60  # as if the last 60 ids were the draft's own added tokens
    t_engine, d_engine = Engine(target, 700), Engine(draft, 400)
    head = d_engine.head
    boost = torch.zeros(draft.vocab_size, dtype=torch.float64)
    boost[shared:] = 1e4  # the draft's argmax is always an extra id
    d_engine.head = lambda h: head(h) + boost
    greedy, sampling = Sampling(), Sampling(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    try:
        te, de = embeds(target, dataset[0], QUESTIONS[0]), embeds(draft, dataset[0], QUESTIONS[0])
        ref, _ = target_generate(t_engine, te, 40, -1)
        draft.shared_vocab = None
        unmasked = recorded(VLMDraft(d_engine, de))
        speculative_decode(t_engine, te, unmasked, 3, 40, -1)
        assert min(t for p in unmasked.proposed for t in p) >= shared  # the boost works: unmasked, only extras
        draft.shared_vocab = shared
        for mode in (greedy, sampling):
            src = recorded(VLMDraft(d_engine, de, mode, g))
            out, stats = speculative_decode(t_engine, te, src, 3, 40, -1, mode, g)
            assert stats.drafted > 0 and max(t for p in src.proposed for t in p) < shared
            if mode is greedy:
                assert out == ref
        adapter = TokenAdapter(TokenAdapterConfig(vocab_size=draft.vocab_size, embed_dim=32, num_layers=1,
                                                  num_heads=2, ffn_dim=64)).eval()  # fmt: skip
        with torch.no_grad():
            adapter.head.bias[shared:] = 1e4  # the adapter's argmax too is an id the target does not share
        for resync in (False, True):  # hidden prefill: the adapter's default predraft (start, nothing drafted)
            src = recorded(AdaptedDraft(VLMDraft(d_engine, de), adapter, resync=resync))
            out, _ = speculative_decode(t_engine, te, src, 3, 40, -1, hide_prefill=resync)
            assert out == ref and max(t for p in src.proposed for t in p) < shared
    finally:
        draft.shared_vocab = None
    assert any(
        t >= shared for t in ref
    )  # the target emitted ids the draft does not share; they were fed to it as <unk>


def test_compiled_decode_step_gives_the_same_tokens(minis, dataset):
    """Engine(compile=True) runs the one-token step through torch.compile (inductor on the CPU here)."""
    target = minis[0]
    te = embeds(target, dataset[0], QUESTIONS[0])
    ref, _ = target_generate(Engine(target, 700), te, 24, target.eos_token_id)
    out, _ = target_generate(Engine(target, 700, compile=True), te, 24, target.eos_token_id)
    assert out == ref


def test_fused_projections_give_the_same_tokens(minis, dataset):
    """Engine(fuse="all"): q/k/v and gate/up as one matmul each compute the same answer."""
    target = minis[0]
    te = embeds(target, dataset[0], QUESTIONS[0])
    ref, _ = target_generate(Engine(target, 700), te, 24, target.eos_token_id)
    fused = Engine(target, 700, fuse="all")
    out, _ = target_generate(fused, te, 24, target.eos_token_id)
    assert out == ref
    a, b = Engine(target, 700), fused
    la, lb = prefill(a, te), prefill(b, te)
    torch.testing.assert_close(lb, la, atol=1e-3, rtol=1e-3)


def test_fusing_blocks_only_changes_no_answer_and_leaves_the_model_alone(minis, dataset):
    """Engine(fuse="blocks"): a verify block reads the joined weights, a one-token step the layers' own, which
    stay the tensors they were."""
    target = minis[0]
    te = embeds(target, dataset[0], QUESTIONS[0])
    q_proj = language_model(target)[0].layers[0].self_attn.q_proj
    before = q_proj.weight.data_ptr()
    plain, blocks = Engine(target, 700), Engine(target, 700, fuse="blocks")
    assert q_proj.weight.data_ptr() == before
    chain = torch.tensor([[5, 6, 7, 8]])
    for e in (plain, blocks):
        prefill(e, te)
    torch.testing.assert_close(verify(blocks, chain), verify(plain, chain), atol=1e-3, rtol=1e-3)
    ref, _ = target_generate(plain, te, 12, target.eos_token_id)
    assert target_generate(blocks, te, 12, target.eos_token_id)[0] == ref
    with pytest.raises(SpecalignError, match="unknown fuse 'yes'"):
        Engine(target, 700, fuse="yes")


def test_divergence_points_at_the_first_difference_and_the_targets_margin(minis, dataset):
    target = minis[0]
    engine = Engine(target, 700)
    te = embeds(target, dataset[0], QUESTIONS[0])
    ref, _ = target_generate(engine, te, 20, target.eos_token_id)
    assert len(ref) > 6
    assert divergence(engine, te, ref, list(ref)) is None
    wrong = ref[:5] + [(ref[5] + 1) % 100] + ref[6:]
    d = divergence(engine, te, ref, wrong)
    assert (d["position"], d["target_token"], d["sd_token"]) == (5, ref[5], wrong[5])
    assert d["margin_alone"] > 0 and d["margin_verify"] > 0  # the target's own token is its argmax on both paths
    assert abs(d["margin_alone"] - d["margin_verify"]) < 1e-3  # fp32 on the CPU: the two paths agree
    assert divergence(engine, te, ref, ref[:3])["sd_token"] is None  # a prefix: nothing to compare


def test_target_generate_stops_at_eos_like_hf_generate(minis, dataset):
    """target_generate queues each next step before reading the token: it must still stop right at EOS."""
    target = minis[0]
    engine, eos = Engine(target, 700), target.eos_token_id
    for i in range(2):
        prompt = target.prepare(dataset[i], QUESTIONS[2])
        hf = target.generate([prompt], max_new_tokens=60)[0]
        out, _ = target_generate(engine, embeds(target, dataset[i], QUESTIONS[2]), 60, eos)
        assert out[-1] == eos and eos not in out[:-1]  # the mini target ends its answers well before 60 tokens
        assert [t for t in out if t != eos] == [t for t in hf if t != eos]
        assert target_generate(engine, embeds(target, dataset[i], QUESTIONS[2]), 5, eos)[0] == out[:5]


def test_fp32_head_gives_fp32_logits_and_sd_stays_lossless(dataset):
    """bf16 logits tie now and then; an fp32 head keeps the precision the bf16 hidden state has."""
    target = load_model("mini-target", dtype="bf16")
    draft = load_model("mini-draft", dtype="bf16")
    t_engine, d_engine = Engine(target, 700, fp32_head=True), Engine(draft, 400)
    te, de = embeds(target, dataset[0], QUESTIONS[0]), embeds(draft, dataset[0], QUESTIONS[0])
    logits = prefill(t_engine, te)
    assert logits.dtype == torch.float32 and (logits != logits.bfloat16().float()).any()
    bf16 = prefill(Engine(target, 700), te)
    assert torch.allclose(logits, bf16, atol=0.25) and (bf16 == bf16.bfloat16().float()).all()
    ref, _ = target_generate(t_engine, te, 30, target.eos_token_id)
    for gamma in (1, 4):
        out, _ = speculative_decode(t_engine, te, VLMDraft(d_engine, de), gamma, 30, target.eos_token_id)
        assert out == ref
