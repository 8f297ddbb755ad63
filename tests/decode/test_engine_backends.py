"""The decode engine on tiny random checkpoints written in each backend's real layout (Video-LLaVA, EventGPT,
LLaVA): its greedy tokens are the backend's own `generate`, and greedy SD through it is lossless. float64, so the
near-tied logits of random weights cannot flip between the engine's kernels and transformers'."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # the tiny checkpoint writers

from tiny_eventgpt import write_tiny_eventgpt  # noqa: E402
from tiny_video_llava import build_test_world, write_tiny_llava, write_tiny_video_llava  # noqa: E402

from specalign.data import open_dataset  # noqa: E402
from specalign.decode.engine import ATTENTIONS, Engine, prompt_embeds  # noqa: E402
from specalign.decode.sources import FixedDraft  # noqa: E402
from specalign.decode.speculative import speculative_decode, target_generate  # noqa: E402
from specalign.models.eventgpt import load_eventgpt  # noqa: E402
from specalign.models.llava import load_llava  # noqa: E402
from specalign.models.video_llava import load_video_llava  # noqa: E402

BACKENDS = {
    "video-llava": (write_tiny_video_llava, load_video_llava),
    "eventgpt": (write_tiny_eventgpt, load_eventgpt),
    "llava": (write_tiny_llava, load_llava),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return open_dataset(build_test_world(tmp_path_factory.mktemp("world")) / "my_egpt_dsec_train_500ms")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_engine_and_sd_reproduce_the_backends_generate(backend, dataset, tmp_path):
    write, load = BACKENDS[backend]
    vlm = load(write(tmp_path / backend))
    vlm.model.to(torch.float64)
    for i, q in ((0, "What are the key elements in this scene?"), (1, "Describe the road layout in detail.")):
        prompt = vlm.prepare(dataset[i], q)
        ref = vlm.generate([prompt], max_new_tokens=12)[0]
        emb, _ = prompt_embeds(vlm, vlm.collate([prompt]))
        for attention in ATTENTIONS:  # SDPA over every slot, or split-KV over the used ones
            engine = Engine(vlm, emb.shape[1] + 20, attention=attention)
            out, _ = target_generate(engine, emb, 12, eos=-1)  # no stop at EOS: random weights may say it at once
            assert out[: len(ref)] == ref and len(set(out)) > 1
            wrong = FixedDraft([(t + 1) % vlm.vocab_size for t in out])
            for source in (wrong, FixedDraft(out)):
                assert speculative_decode(engine, emb, source, 3, 12, eos=-1)[0] == out


def test_causal_prefill_is_the_masked_prefill(tmp_path):
    """A prompt without padding attends causally over itself (SDPA's flash kernel on a GPU): the same as the
    mask over the whole cache."""
    vlm = load_video_llava(write_tiny_video_llava(tmp_path / "v"))
    vlm.model.to(torch.float64)
    x = torch.randn(2, 9, vlm.model.config.text_config.hidden_size, dtype=torch.float64)
    hidden = {}
    for causal in (True, False):
        engine = Engine(vlm, 16, batch=2)
        engine.valid[:, :9] = True
        with torch.inference_mode():
            hidden[causal], _ = engine._forward(x, 0, causal=causal)
    torch.testing.assert_close(hidden[True], hidden[False])


@pytest.mark.parametrize("half", ["project", "finish"])
def test_a_layers_halves_trace_whole_under_dynamic_shapes(half, tmp_path):
    """`compile_blocks` compiles a layer's work before and after its attention with dynamic shapes: each must trace
    as one graph (a break, e.g. a symbolic bool reaching an op, splits it into several compiled frames)."""
    vlm = load_video_llava(write_tiny_video_llava(tmp_path / "v"))
    vlm.model.requires_grad_(False)
    engine = Engine(vlm, 32)
    T, layer = 5, engine.lm.layers[0]
    x = torch.randn(1, T, engine.lm.config.hidden_size)
    if half == "project":
        cos, sin = engine.lm.rotary_emb(x, torch.arange(T)[None])
        fn, args = (
            engine._project,
            (layer, None, x, torch.randn_like(x), cos, sin, torch.arange(T) + 3, engine.k[0], engine.v[0]),
        )
    else:
        fn, args = engine._finish, (layer, None, x, torch.randn(1, engine.lm.config.num_attention_heads, T,
                                                                 engine.head_dim))  # fmt: skip
    torch._dynamo.reset()
    with torch._dynamo.config.patch(assume_static_by_default=False), torch.inference_mode():
        explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.slow  # inductor compiles on the CPU
@pytest.mark.parametrize("fuse", ["none", "blocks"])
def test_compiled_blocks_compute_the_eager_logits_and_compile_once_for_every_layer(tmp_path, fuse):
    """Prefill, a chain and a tree through the compiled layer halves: the eager engine's logits, and the halves'
    compiles serve every layer. fuse="blocks": a prompt longer than a block runs the layers' own
    weights, the blocks the joined ones, both through the same halves."""
    from specalign.decode.attention import MAX_ROWS
    from specalign.decode.engine import prefill, verify
    from specalign.decode.speculative import Proposal, verify_tree

    vlm = load_video_llava(write_tiny_video_llava(tmp_path / "v"))
    vlm.model.requires_grad_(False)
    prompt = 20 if fuse == "none" else MAX_ROWS + 20
    embeds = torch.randn(1, prompt, vlm.model.config.text_config.hidden_size, dtype=vlm.dtype)
    tree = Proposal([5, 6, 7, 8, 9], parents=[-1, -1, 0, 1, 1])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = {}
    for compiled in (False, True):
        engine = Engine(vlm, prompt + 44, compile_blocks=compiled, fuse=fuse)
        first = prefill(engine, embeds)
        chain = verify(engine, torch.tensor([[3, 4, 5]]))
        tree_logits = verify_tree(engine, 2, tree)
        longer = verify(engine, torch.tensor([[3, 4, 5, 6, 7, 8, 9]]))
        out[compiled] = (first, chain, tree_logits, longer)
    for eager, compiled in zip(out[False], out[True], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    # not one per layer: the prompt (one length) and each of the three verify lengths compile each half once, and
    # the first layer's project half, with no MLP output pending, once more
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3 * (1 + 3)
