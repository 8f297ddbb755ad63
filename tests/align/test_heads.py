"""Draft heads: a real Llama layer, training-time test = what a chain drafter computes, files and target checks."""

import json

import pytest
import torch
from torch import nn

from specalign.align.heads import (
    DraftHead,
    FeatureAdapter,
    HeadConfig,
    attach_parts,
    build_head,
    check_head,
    load_head,
    save_head,
    target_text_config,
    ttt_mask,
)
from specalign.errors import SpecalignError
from specalign.models.registry import BUNDLED

D, V = 32, 50
needs_bundled = pytest.mark.skipif(not (BUNDLED["mini-target"] / "config.json").is_file(),
                                   reason="bundled models not present")  # fmt: skip


def tiny(kind="eagle", fused=False, dtype=torch.float32, seed=0, **kw) -> DraftHead | FeatureAdapter:
    """A head with 4 query heads sharing 2 key/value heads (grouped-query attention, as Llama-3 has) and a random
    target embedding / LM head."""
    torch.manual_seed(seed)
    cfg = HeadConfig(kind=kind, hidden_size=D, vocab_size=V, feature_size=3 * D if fused else D, fused=fused,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                     rope_theta=100.0, events_size=12 if kind == "eagle+events" else None,
                     draft_size=24 if kind == "feature-adapter" else None,
                     target={"name": "tiny", "hidden_size": D, "vocab_size": V}, **kw)  # fmt: skip
    head = build_head(cfg).to(dtype)
    attach_parts(head, nn.Embedding(V, D).to(dtype), nn.Linear(D, V, bias=False).to(dtype))
    return head


def inputs(B=2, T=9, F=D, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, F, generator=g, dtype=dtype), torch.randint(0, V, (B, T), generator=g)


def test_shapes_and_attribute_names():
    head = tiny("eagle+events")
    f, t = inputs()
    ev = torch.randn(2, 7, 12)
    assert head.inputs(f, t, ev).shape == (2, 9, D)
    assert head(f, t, ev).shape == (2, 9, D)
    outs = head.unroll(f, t, ev, steps=3)
    assert len(outs) == 3 and all(o.shape == (2, 9, D) for o in outs)
    assert head.logits(outs[0]).shape == (2, 9, V) and head.logits(outs[0]).dtype == torch.float32
    # what the decode engine reads: a one-layer Llama
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    assert isinstance(head.layers[0], LlamaDecoderLayer) and len(head.layers) == 1
    assert isinstance(head.norm, LlamaRMSNorm) and isinstance(head.rotary_emb, LlamaRotaryEmbedding)
    assert (head.config.hidden_size, head.config.num_attention_heads, head.config.num_key_value_heads,
            head.config.head_dim) == (D, 4, 2, 8)  # fmt: skip
    assert head.device.type == "cpu" and head.dtype == torch.float32 and "eagle+events" in head.name
    # the target's parts are neither trained nor saved
    names = set(head.state_dict())
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in names)
    assert head.embed_tokens.weight.data_ptr() not in {p.data_ptr() for p in head.parameters()}
    with pytest.raises(SpecalignError, match="event tokens"):
        head(f, t)
    fused = tiny("eagle", fused=True)
    f3, _ = inputs(F=3 * D)
    assert fused(f3, t).shape == (2, 9, D)
    assert fused.inputs(torch.randn(2, 9, D), t).shape == (2, 9, D), "its own outputs (width D) stand in later"
    adapter = tiny("feature-adapter")
    assert adapter(torch.randn(5, 24)).shape == (5, D)


def test_forward_is_transformers_llama_layer():
    """The hand-written attention in forward equals transformers' own LlamaDecoderLayer forward (causal, float64),
    so the engine may run `layers[0]` as a Llama layer with its own cache."""
    head = tiny(dtype=torch.float64)
    f, t = inputs(dtype=torch.float64)
    B, T = t.shape
    ours = head(f, t)
    x = head.inputs(f, t)
    pos = torch.arange(T)[None].expand(B, T)
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None].expand(B, 1, T, T)
    # eager takes its softmax in float32 whatever the input: it agrees to float32's precision only
    for impl, tol in (("sdpa", 1e-10), ("eager", 1e-5)):
        head.config._attn_implementation = impl
        out = head.layers[0](x, attention_mask=causal, position_ids=pos, position_embeddings=head.rotary_emb(x, pos))
        ref = head.norm(out[0] if isinstance(out, tuple) else out)
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    # and it is not a trivially equal pass: a changed key projection changes it
    with torch.no_grad():
        head.layers[0].self_attn.k_proj.weight.mul_(1.5)
    assert (head(f, t) - ours).abs().max() > 1e-4


def test_padding_does_not_change_real_rows():
    head = tiny(dtype=torch.float64)
    f, t = inputs(B=1, T=6, dtype=torch.float64)
    alone = head.unroll(f, t, steps=3)
    fp = torch.cat([f, torch.randn(1, 3, D, dtype=torch.float64)], 1)
    tp = torch.cat([t, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    padded = head.unroll(fp, tp, attention_mask=mask, steps=3)
    for a, p in zip(alone, padded, strict=True):
        torch.testing.assert_close(p[:, :6], a, rtol=1e-10, atol=1e-10)


def test_training_time_test_is_what_a_chain_drafter_computes():
    """unroll step 0 is the plain forward; step j at row i equals a drafter's j-th step: a causal pass over the
    true features up to i - j, then the head's own outputs fed back one position at a time."""
    head = tiny(dtype=torch.float64)
    f, t = inputs(B=2, T=8, dtype=torch.float64)
    outs = head.unroll(f, t, steps=4)
    torch.testing.assert_close(outs[0], head(f, t), rtol=0, atol=0)
    for start in (0, 2, 4):
        feats = f[:, : start + 1]
        for j in range(4):
            if start + j >= 8:
                break
            drafted = head(feats, t[:, : start + j + 1])[:, -1]  # a fresh causal pass over the chain so far
            torch.testing.assert_close(outs[j][:, start + j], drafted, rtol=1e-10, atol=1e-10)
            feats = torch.cat([feats, drafted[:, None]], 1)  # the head's own output is the next feature
    # step j really differs from teacher forcing (else the test above proves nothing)
    assert (outs[2][:, 2:] - outs[0][:, 2:]).abs().max() > 1e-3


def test_ttt_mask_shape():
    valid = torch.ones(1, 4, dtype=torch.bool)
    m = ttt_mask(4, 2, valid)[0, 0].int()
    # row i = 3 at step 2: true keys p <= 1, step-1 key at p = 2, step-2 key at p = 3
    assert m[3].tolist() == [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    assert bool(ttt_mask(4, 0, valid)[0, 0].equal(torch.ones(4, 4, dtype=torch.bool).tril()))


def test_events_gate_starts_closed():
    """eagle+events at initialisation computes exactly what eagle computes with the same weights; once the gate
    opens, the events matter."""
    both = tiny("eagle+events", seed=3)
    plain = tiny("eagle", seed=4)
    missing, unexpected = plain.load_state_dict(both.state_dict(), strict=False)
    assert not missing and all(k.startswith("events_") for k in unexpected)
    attach_parts(plain, both.embed_tokens, both.lm_head)
    f, t = inputs()
    ev = torch.randn(2, 5, 12)
    assert both.events_gate.item() == 0
    torch.testing.assert_close(both(f, t, ev), plain(f, t), rtol=0, atol=0)
    with torch.no_grad():
        both.events_gate.fill_(0.5)
    a, b = both(f, t, ev), both(f, t, torch.randn(2, 5, 12))
    assert (a - b).abs().max() > 1e-3, "the event tokens change the output once the gate is open"


def test_event_padding_is_masked():
    head = tiny("eagle+events")
    with torch.no_grad():
        head.events_gate.fill_(1.0)
    f, t = inputs(B=1)
    ev = torch.randn(1, 4, 12)
    padded = torch.cat([ev, 100 * torch.randn(1, 3, 12)], 1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    torch.testing.assert_close(head.inputs(f, t, padded, mask), head.inputs(f, t, ev), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["eagle", "eagle+events", "feature-adapter"])
def test_save_load_roundtrip(tmp_path, kind):
    head = tiny(kind)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the gate too: not the initial state
    save_head(tmp_path / "h", head)
    back = load_head(tmp_path / "h")
    assert type(back) is type(head) and back.head_config == head.head_config
    attach_parts(back, head.embed_tokens, head.lm_head)
    if kind == "feature-adapter":
        x = torch.randn(3, 24)
        torch.testing.assert_close(back(x), head(x), rtol=0, atol=0)
    else:
        f, t = inputs()
        ev = torch.randn(2, 5, 12) if kind == "eagle+events" else None
        torch.testing.assert_close(back(f, t, ev), head(f, t, ev), rtol=0, atol=0)


def test_bad_head_folders(tmp_path):
    with pytest.raises(SpecalignError, match="head folder not found"):
        load_head(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecalignError, match="config.json is missing"):
        load_head(tmp_path / "empty")
    save_head(tmp_path / "h", tiny())
    (tmp_path / "h" / "config.json").write_text('{"vocab_size": 3}')
    with pytest.raises(SpecalignError, match="not a draft head config"):
        load_head(tmp_path / "h")
    save_head(tmp_path / "h", tiny())
    (tmp_path / "h" / "model.safetensors").unlink()
    with pytest.raises(SpecalignError, match="weights are missing"):
        load_head(tmp_path / "h")


def test_truncated_weights_refused(tmp_path):
    path = save_head(tmp_path / "h", tiny())
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SpecalignError) as e:
        load_head(path)
    msg = str(e.value)
    assert "\n" not in msg and str(weights) in msg and "truncated" in msg
    if (BUNDLED["mini-target"] / "config.json").is_file():  # check_head finds it too, before any model loads
        from specalign.models import inspect_model

        with pytest.raises(SpecalignError, match="truncated"):
            check_head(path, inspect_model("mini-target"))


def test_target_text_config_fills_llama_defaults():
    # a 7B Video-LLaVA config.json leaves most of its text model to Llama's defaults
    cfg = target_text_config({"model_type": "video_llava", "text_config": {"model_type": "llama", "vocab_size": 32064}})
    assert cfg["hidden_size"] == 4096 and cfg["vocab_size"] == 32064 and cfg["intermediate_size"] == 11008
    assert cfg["num_key_value_heads"] == 32 and cfg["head_dim"] == 128


@needs_bundled
def test_wrong_target_refused_on_one_line(tmp_path):
    from specalign.align.features import tokenizer_fingerprint
    from specalign.models import inspect_model, load_model

    vlm = load_model("mini-target")
    info = inspect_model("mini-target")
    # a head trained for the 7B pair (its config says so; the check comes before any tensor is read)
    path = save_head(tmp_path / "big", tiny())
    raw = json.loads((path / "config.json").read_text())
    raw.update(hidden_size=4096, feature_size=4096, vocab_size=32064,
               target={"name": "Video-LLaVA-7B", "hidden_size": 4096, "vocab_size": 32064})  # fmt: skip
    (path / "config.json").write_text(json.dumps(raw))
    want = ("a head trained for target Video-LLaVA-7B (hidden 4096, vocab 32064) cannot draft for target "
            "mini-target (hidden 256, vocab 780)")  # fmt: skip
    for call in (lambda: load_head(path, target_vlm=vlm), lambda: check_head(path, {**info, "name": "mini-target"})):
        with pytest.raises(SpecalignError) as e:
            call()
        assert "\n" not in str(e.value) and str(path) in str(e.value) and want in str(e.value)
    # the right width and vocabulary: accepted and attached to the target's own tensors
    text = target_text_config(json.loads((BUNDLED["mini-target"] / "config.json").read_text()))
    fp = tokenizer_fingerprint(vlm.tokenizer)
    good = HeadConfig.for_target("eagle", text, target={"name": "mini-target", "hidden_size": 256,
                                                        "vocab_size": 780, "tokenizer": fp})  # fmt: skip
    head = build_head(good)
    path = save_head(tmp_path / "good", head)
    back = load_head(path, target_vlm=vlm)
    assert back.lm_head is vlm.model.lm_head and back.embed_tokens is vlm.model.get_input_embeddings()
    assert check_head(path, info) == good
    # ... but not with another tokenizer
    head.head_config.target["tokenizer"] = "0" * 64
    path = save_head(tmp_path / "other_tok", head)
    for call in (lambda: load_head(path, target_vlm=vlm), lambda: check_head(path, info)):
        with pytest.raises(SpecalignError, match="their tokenizers differ") as e:
            call()
        assert "\n" not in str(e.value)
