"""The decode engine on the GPU (run on the GPU machine: pytest -m gpu): CUDA-graph steps compute what the
transformers model computes, and greedy SD through them is lossless."""

import pytest
import torch

from specalign.data import open_dataset
from specalign.decode.engine import Engine, decode_one_token, prefill, prompt_embeds
from specalign.decode.sources import VLMDraft
from specalign.decode.speculative import speculative_decode, target_generate
from specalign.models import load_model
from specalign.world.build import WorldConfig, build_world

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=0, test=4, clips_per_sequence=2, mp4=False), progress=False)
    return open_dataset(out / "my_egpt_dsec_seq_1s")


def test_cuda_graph_engine_matches_hf_and_sd_is_lossless(dataset):
    target = load_model("mini-target", device="cuda", dtype="fp32")
    draft = load_model("mini-draft", device="cuda", dtype="fp32")
    t_engine, d_engine = Engine(target, 700), Engine(draft, 400)
    assert t_engine.graphs == {}, "CUDA graphs are on by default on a GPU"
    for i in range(len(dataset)):
        q = "What are the key elements in this scene?"
        prompt = target.prepare(dataset[i], q)
        hf = target.generate([prompt], max_new_tokens=40)[0]
        te = prompt_embeds(target, target.collate([prompt]))[0]
        de = prompt_embeds(draft, draft.collate([draft.prepare(dataset[i], q)]))[0]
        ref, _ = target_generate(t_engine, te, 40, target.eos_token_id)
        assert ref == hf
        for gamma in (1, 4):
            for hide in (False, True):
                out, _ = speculative_decode(t_engine, te, VLMDraft(d_engine, de), gamma, 40, target.eos_token_id,
                                            hide_prefill=hide)  # fmt: skip
                assert out == ref
    assert len(t_engine.graphs) >= 3  # decode + verify widths were captured and replayed


def test_shared_prefix_extraction_matches_hf_on_gpu(dataset):
    from specalign.decode.batch import generate_shared

    vlm = load_model("mini-target", device="cuda", dtype="fp32")
    questions = ["What are the key elements in this scene?", "Describe the road.", "What color are the vehicles?"]
    groups = [[vlm.prepare(dataset[i], q) for q in questions] for i in range(len(dataset))]
    assert generate_shared(vlm, groups, 30) == [vlm.generate(g, max_new_tokens=30) for g in groups]


def test_draft_on_a_second_gpu_is_lossless_and_hides_its_prefill(dataset, tmp_path):
    """--draft-device cuda:1: the draft's engine (and its CUDA graphs) live on the second GPU. It must propose what
    the same draft proposes on the target's GPU (equal outputs alone would hold for any draft, even a broken one),
    SD (with prefill hiding: the draft runs while the target's kernels do) gives the target's greedy tokens, and
    speculate runs that way."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from specalign.decode.run import SpeculateConfig, run_speculate

    target = load_model("mini-target", device="cuda:0", dtype="bf16")
    near, far = (load_model("mini-draft", device=d, dtype="bf16") for d in ("cuda:0", "cuda:1"))
    t_engine = Engine(target, 700, fp32_head=True)
    n_engine, f_engine = Engine(near, 400), Engine(far, 400)
    assert f_engine.k[0].device == torch.device("cuda:1") and t_engine.k[0].device == torch.device("cuda:0")
    for i in range(len(dataset)):
        q = "What vehicles are in the scene?"
        te = prompt_embeds(target, target.collate([target.prepare(dataset[i], q)]))[0]
        ne = prompt_embeds(near, near.collate([near.prepare(dataset[i], q)]))[0]
        fe = prompt_embeds(far, far.collate([far.prepare(dataset[i], q)]))[0]
        ref, _ = target_generate(t_engine, te, 40, target.eos_token_id)
        for hide in (False, True):
            runs = [speculative_decode(t_engine, te, VLMDraft(eng, e), 4, 40, target.eos_token_id, hide_prefill=hide)
                    for eng, e in ((n_engine, ne), (f_engine, fe))]  # fmt: skip
            (out_n, stats_n), (out_f, stats_f) = runs
            assert out_f == out_n == ref
            assert stats_f.accepted_per_round == stats_n.accepted_per_round and stats_f.rounds > 0
    # the far draft's one-token steps ran as a CUDA graph captured on cuda:1 (a draft never verifies: one shape)
    assert set(f_engine.graphs) == {(1, 1)} and f_engine.graphs[(1, 1)].logits.device == torch.device("cuda:1")
    res = run_speculate(SpeculateConfig(dataset=str(dataset.root), out=str(tmp_path / "run"), max_samples=2,
                                        draft_device="cuda:1", target_device="cuda:0", hide_prefill=True,
                                        dtype="bf16", hf_baseline=False), progress=False)  # fmt: skip
    assert res["lossless"] and res["totals"]["answers"] == 2


@pytest.mark.parametrize(("engine", "hide_prefill"), [("split", False), ("gemv", False), ("gemv", True)])
def test_speculate_on_the_faster_engines_is_lossless(dataset, tmp_path, engine, hide_prefill):
    """`speculate --engine split|gemv` on the GPU: split-KV attention, compiled fused verify blocks (and the GEMV
    step), a head's trees verified against the target alone on that same engine; hide_prefill: the draft VLM
    drafts the first round on its own stream while the target prefills (the hybrid draft)."""
    from specalign.decode.run import SpeculateConfig, run_speculate

    res = run_speculate(SpeculateConfig(dataset=str(dataset.root), out=str(tmp_path / "run"), max_samples=2,
                                        draft_head="mini-head", tree="6,6,32", max_new_tokens=40, engine=engine,
                                        hide_prefill=hide_prefill, dtype="fp32", hf_baseline=False, repeats=1),
                        progress=False)  # fmt: skip
    assert res["lossless"] and res["totals"]["answers"] == 2 and res["totals"]["tau"] > 2, res["totals"]


def test_head_chains_and_trees_replay_as_cuda_graphs_losslessly(dataset):
    """A draft head on the engine: its feed, chain and tree-expansion steps and the target's tree verify run as
    CUDA graphs (input widths and masks differ between captures) and give the target's greedy tokens; the tree
    logits equal the eager ones."""
    from specalign.align.features import visual_positions_end
    from specalign.align.heads import DraftHead, HeadConfig, attach_target
    from specalign.decode.heads import HeadDraft, TreeShape
    from specalign.decode.speculative import Proposal, verify_tree

    target = load_model("mini-target", device="cuda", dtype="fp32")
    torch.manual_seed(0)
    cfg = HeadConfig(kind="eagle", hidden_size=256, vocab_size=target.vocab_size, feature_size=256,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=64, intermediate_size=256)  # fmt: skip
    head = DraftHead(cfg).cuda().eval()
    attach_target(head, target)
    t_engine, h_engine = Engine(target, 900, features=(4,)), Engine(head, 400, features=(1,))
    eager = Engine(target, 900, features=(4,))
    eager.graphs = False
    for i in range(2):
        prompt = target.prepare(dataset[i], "Describe the road.")
        te = prompt_embeds(target, target.collate([prompt]))[0]
        start = int(visual_positions_end(target, prompt.input_ids))
        ref, _ = target_generate(t_engine, te, 40, target.eos_token_id)
        for tree in (None, TreeShape(4, 4, 16)):
            source = HeadDraft(h_engine, t_engine, prompt.input_ids.tolist(), start, None, tree)
            out, _ = speculative_decode(t_engine, te, source, 4, 40, target.eos_token_id)
            assert out == ref
        tree = Proposal(list(range(10, 26)), parents=[-1, -1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
        logits = []
        for e in (t_engine, eager):
            prefill(e, te)
            logits.append(verify_tree(e, ref[0], tree))
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    assert any(len(k) > 2 for k in h_engine.graphs) and any(len(k) > 2 for k in t_engine.graphs)


def test_split_kv_decode_on_cuda_graphs_matches_sdpa(dataset):
    """The Triton split-KV kernels inside CUDA-graph decode steps and verify blocks: the reference's numbers, the
    same greedy tokens alone and through SD (and compiled, with compiled and fused verify blocks, the same again),
    and a tree's logits as SDPA's."""
    from specalign.decode.attention import split_kv_reference, triton_split_kv, triton_split_kv_block
    from specalign.decode.speculative import Proposal, verify_tree

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 128, device="cuda", generator=g) for h, t in ((32, 1), (8, 2304), (8, 2304)))
    valid = torch.ones(1, 2304, dtype=torch.bool, device="cuda")
    used = torch.tensor(2080, device="cuda")
    torch.testing.assert_close(triton_split_kv(q, k, v, valid, used), split_kv_reference(q, k, v, valid, used))
    # blocks of 65 (a 64-node tree and its root; a chain) in fp32 and in bf16
    qb = torch.randn(1, 32, 65, 128, device="cuda", generator=g)
    tree = (torch.rand(1, 65, 65, device="cuda", generator=g) > 0.7).tril(-1) | torch.eye(65, dtype=torch.bool,
                                                                                          device="cuda")  # fmt: skip
    for sees in (tree, None):
        want = split_kv_reference(qb, k, v, valid, used, sees)
        torch.testing.assert_close(triton_split_kv_block(qb, k, v, valid, used, sees), want)
        got = triton_split_kv_block(*(t.bfloat16() for t in (qb, k, v)), valid, used, sees)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    target = load_model("mini-target", device="cuda", dtype="fp32")
    prompt = target.prepare(dataset[0], "What are the key elements in this scene?")
    te = prompt_embeds(target, target.collate([prompt]))[0]
    ref, _ = target_generate(Engine(target, 700), te, 40, target.eos_token_id)
    draft = load_model("mini-draft", device="cuda", dtype="fp32")
    de = prompt_embeds(draft, draft.collate([draft.prepare(dataset[0], "What are the key elements in this scene?")]))[0]
    for compile in (False, True):  # compiled: the verify blocks too (compile_blocks), their projections fused
        engine = Engine(target, 700, attention="split", compile=compile, compile_blocks=compile, tune="none",
                        fuse="blocks" if compile else "none")  # fmt: skip
        assert target_generate(engine, te, 40, target.eos_token_id)[0] == ref
        out, _ = speculative_decode(engine, te, VLMDraft(Engine(draft, 400), de), 4, 40, target.eos_token_id)
        assert out == ref
        tree = Proposal(list(range(10, 26)), parents=[-1, -1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
        logits = []
        for e in (engine, Engine(target, 700)):
            prefill(e, te)
            logits.append(verify_tree(e, ref[0], tree))
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_autotuned_decode_step_gives_the_same_tokens(dataset):
    """Engine(tune="autotune") (inductor's max-autotune options) captured as CUDA graphs: the target-alone tokens."""
    target = load_model("mini-target", device="cuda", dtype="fp32")
    te = prompt_embeds(
        target, target.collate([target.prepare(dataset[0], "What are the key elements in this scene?")])
    )[0]
    ref, _ = target_generate(Engine(target, 700), te, 40, target.eos_token_id)
    assert target_generate(Engine(target, 700, compile=True, tune="autotune"), te, 40, target.eos_token_id)[0] == ref


def test_gemv_decode_step_gives_the_same_tokens_and_sd_stays_lossless(dataset):
    """Engine(gemv=True): the one-token step through `decode.gemv`'s kernels on CUDA graphs gives the target-alone
    tokens, alone and through SD; in bf16 its logits are the model step's within bf16 rounding."""
    target = load_model("mini-target", device="cuda", dtype="fp32")
    q = "What are the key elements in this scene?"
    te = prompt_embeds(target, target.collate([target.prepare(dataset[0], q)]))[0]
    ref, _ = target_generate(Engine(target, 700), te, 40, target.eos_token_id)
    draft = load_model("mini-draft", device="cuda", dtype="fp32")
    de = prompt_embeds(draft, draft.collate([draft.prepare(dataset[0], q)]))[0]
    engine = Engine(target, 700, attention="split", gemv=True)
    assert target_generate(engine, te, 40, target.eos_token_id)[0] == ref
    out, _ = speculative_decode(engine, te, VLMDraft(Engine(draft, 400), de), 4, 40, target.eos_token_id)
    assert out == ref
    target = load_model("mini-target", device="cuda", dtype="bf16")
    te = te.bfloat16()
    logits = []
    for gemv in (False, True):
        engine = Engine(target, 700, attention="split", gemv=gemv)
        prefill(engine, te)
        logits.append(torch.stack([decode_one_token(engine, torch.tensor([t], device="cuda")) for t in ref[:8]]))
    torch.testing.assert_close(logits[1], logits[0], atol=0.3, rtol=0.05)  # 4 layers' bf16 rounding: up to 0.13
