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


@pytest.mark.parametrize("block", ["chain", "tree", "prefill"])
def test_many_token_forwards_trace_whole_under_dynamic_shapes(block, tmp_path):
    """`compile_blocks` compiles prefill, chains and trees with dynamic shapes: each must trace as one graph (a
    break, e.g. a symbolic bool reaching SDPA, splits every layer into its own compiled frames)."""
    vlm = load_video_llava(write_tiny_video_llava(tmp_path / "v"))
    vlm.model.requires_grad_(False)
    engine = Engine(vlm, 32)
    T = 5
    if block == "prefill":
        fn, args = engine._forward, (torch.randn(1, T, vlm.model.config.text_config.hidden_size), 0)
        kwargs = {"positions": torch.arange(T)[None], "causal": True}
    else:
        engine.run(torch.zeros(1, 3, dtype=torch.long))
        tree = (torch.arange(T)[None] + 3, torch.ones(1, T, 32, dtype=torch.bool)) if block == "tree" else (None, None)
        fn, args, kwargs = engine._step, (torch.zeros(1, T, dtype=torch.long), torch.tensor(3), None, *tree), {}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(assume_static_by_default=False), torch.inference_mode():
        explained = torch._dynamo.explain(fn)(*args, **kwargs)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
