"""EventGPT backend: loading the official layout, the architecture against a direct computation, the KV-cache
steps, generation, training loss, saving, and one-line errors for bad checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_eventgpt import IMAGE_SIZE, POSITIONS, tiny_configs, write_tiny_eventgpt

from specalign.data import open_dataset
from specalign.errors import SpecalignError
from specalign.models.base import Sampling
from specalign.models.eventgpt import (
    PLACEHOLDER_ID,
    EventChatModel,
    build_eventgpt,
    load_eventgpt,
    save_eventgpt,
    spatio_temporal_tokens,
)
from specalign.models.loading import load_state_dict

QUESTIONS = ["What are the key elements in this scene?", "Describe the road layout in detail, please."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_eventgpt(tmp_path_factory.mktemp("egpt") / "EventGPT-tiny")


@pytest.fixture(scope="module")
def vlm(ckpt):
    return load_eventgpt(ckpt)


def one_line_error(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    return msg


# ---- loading ------------------------------------------------------------------------------------------------------
def test_load_official_layout(vlm, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert vlm.kind == "eventgpt" and vlm.name == str(ckpt)
    assert vlm.vocab_size == cfg["vocab_size"] > len(vlm.tokenizer)  # the config's vocab_size, not the tokenizer's
    assert vlm.model.model.feature_adaptor is not None
    assert not any(p.requires_grad for p in vlm.model.vision_tower.parameters())  # frozen tower
    assert vlm.model.num_event_tokens(1) == POSITIONS + 1


def logits_of(vlm, sample, question=QUESTIONS[0]):
    prompt = vlm.prepare(sample, question)
    with torch.no_grad():
        return vlm.model(input_ids=prompt.input_ids[None], **prompt.visual).logits


def test_bin_and_tower_directory_load_the_same_model(tmp_path, vlm, dataset):
    ref = logits_of(vlm, dataset[0])
    as_bin = load_eventgpt(write_tiny_eventgpt(tmp_path / "bin", fmt="bin"))
    torch.testing.assert_close(logits_of(as_bin, dataset[0]), ref, rtol=0, atol=0)
    # tower weights only in the CLIP directory, named by an absolute path
    ext = write_tiny_eventgpt(tmp_path / "ext", tower_inside=False, tower_path=str(tmp_path / "clip"))
    torch.testing.assert_close(logits_of(load_eventgpt(ext), dataset[0]), ref, rtol=0, atol=0)
    # ... or given by the caller (a config whose mm_visual_tower points nowhere on this machine)
    cfg = json.loads((ext / "config.json").read_text())
    (ext / "config.json").write_text(json.dumps(dict(cfg, mm_visual_tower="/data/openai/clip-vit-large-patch14-336")))
    moved = load_eventgpt(ext, visual_tower=str(tmp_path / "clip"))
    torch.testing.assert_close(logits_of(moved, dataset[0]), ref, rtol=0, atol=0)


@pytest.mark.parametrize("frames", [1, 5])
def test_forward_matches_direct_computation(vlm, ckpt, dataset, frames):
    """CLIP last_hidden_state -> projector -> adaptor once -> aggregation -> splice -> Llama, written out."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    vlm.event_frames = frames
    try:
        prompt = vlm.prepare(dataset[1], QUESTIONS[1])
        other = vlm.prepare(dataset[0], QUESTIONS[1])
    finally:
        vlm.event_frames = 1
    pixels = prompt.visual["event_pixel_values"]
    assert pixels.shape == (1, frames, 3, IMAGE_SIZE, IMAGE_SIZE)
    ids = prompt.input_ids
    assert int((ids == PLACEHOLDER_ID).sum()) == POSITIONS + frames

    w = load_state_dict(ckpt)
    clip = CLIPVisionModel.from_pretrained(str(ckpt / "clip-tiny"))
    lm = LlamaForCausalLM(tiny_configs(w["lm_head.weight"].shape[0])[1])
    lm.load_state_dict(
        {k: v for k, v in w.items() if k.startswith(("model.layers", "model.embed", "model.norm", "lm_head"))}
    )
    with torch.no_grad():
        h = clip(pixel_values=pixels[0]).last_hidden_state  # [t, P, C], CLS included
        x = F.linear(h, w["model.visual_projector.0.weight"], w["model.visual_projector.0.bias"])
        x = F.linear(F.gelu(x), w["model.visual_projector.2.weight"], w["model.visual_projector.2.bias"])
        x = F.linear(x, w["model.feature_adaptor.weight"], w["model.feature_adaptor.bias"])
        tokens = torch.cat([x.mean(dim=1), x.mean(dim=0)])  # t temporal tokens, then P spatial tokens
        emb = lm.get_input_embeddings()(ids.clamp(min=0))
        emb[ids == PLACEHOLDER_ID] = tokens
        ref = lm(inputs_embeds=emb[None]).logits
        ours = vlm.model(input_ids=ids[None], event_pixel_values=pixels).logits
        elsewhere = vlm.model(input_ids=ids[None], **other.visual).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, elsewhere, atol=1e-3)  # the events matter: another clip, other logits


def test_aggregation_order():
    f = torch.arange(2 * 3 * 4 * 1, dtype=torch.float).reshape(1, 3, 4, 2)  # [B, t=3, P=4, D=2]
    out = spatio_temporal_tokens(f)
    assert out.shape == (1, 3 + 4, 2)
    torch.testing.assert_close(out[0, :3], f[0].mean(dim=1))
    torch.testing.assert_close(out[0, 3:], f[0].mean(dim=0))


def test_prompt_and_placeholders(vlm, dataset):
    text = vlm.prompt_text("What is there?")
    assert text.startswith("A chat between a curious human and an artificial intelligence assistant.")
    assert text.endswith(" USER: <ev_start><event><ev_end>\nWhat is there? ASSISTANT:")
    prompt = vlm.prepare(dataset[0], "What is there?")
    ids = prompt.input_ids.tolist()
    assert ids[0] == vlm.tokenizer.bos_token_id and ids.count(vlm.tokenizer.bos_token_id) == 1
    first = ids.index(PLACEHOLDER_ID)
    assert ids[first : first + POSITIONS + 1] == [PLACEHOLDER_ID] * (POSITIONS + 1)  # one contiguous run
    assert vlm.tokenizer.decode(ids[first + POSITIONS + 1 :]).startswith("<ev_end>")
    with pytest.raises(ValueError):
        vlm.expand_prompt("no event marker", prompt.visual)


# ---- stepping -----------------------------------------------------------------------------------------------------
def test_kv_cache_steps_and_rollback(vlm, dataset):
    prompts = [vlm.prepare(dataset[0], QUESTIONS[0]), vlm.prepare(dataset[1], QUESTIONS[1])]
    new = torch.tensor([[40, 41, 42, 43], [50, 51, 52, 53]])
    state, first = vlm.prefill(vlm.collate(prompts), return_hidden=True)
    assert first.hidden.shape == (2, 1, vlm.model.config.hidden_size)
    steps = [vlm.forward(new[:, :1], state), vlm.forward(new[:, 1:3], state), vlm.forward(new[:, 3:], state)]
    stepped = torch.cat([first.logits] + [s.logits for s in steps], dim=1)  # [B, 5, V]
    # one full forward over prompt + tokens
    full = [type(p)(torch.cat([p.input_ids, t]), p.visual, p.text) for p, t in zip(prompts, new, strict=True)]
    _, whole = vlm.prefill(vlm.collate(full), all_logits=True)
    torch.testing.assert_close(stepped, whole.logits[:, -5:], rtol=0, atol=1e-5)
    # rollback the last 3 tokens, then re-forward them
    vlm.rollback(state, state.length - 3)
    again = vlm.forward(new[:, 1:], state)
    torch.testing.assert_close(again.logits, stepped[:, 2:], rtol=0, atol=1e-5)
    assert state.length == state.attention_mask.shape[1] == full[1].input_ids.shape[0]


def test_generate_greedy_deterministic_and_batched(vlm, dataset):
    prompts = [vlm.prepare(dataset[0], QUESTIONS[0]), vlm.prepare(dataset[1], QUESTIONS[1])]
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)  # so the batch is left-padded
    batched = vlm.generate(prompts, max_new_tokens=8)
    assert batched == vlm.generate(prompts, max_new_tokens=8)
    assert batched == [vlm.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert all(len(row) == 8 or row[-1] == vlm.eos_token_id for row in batched)
    sampled = [vlm.generate(prompts, 8, Sampling(temperature=1.0, seed=3)) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_hf_generate_agrees(vlm, dataset):
    prompt = vlm.prepare(dataset[0], QUESTIONS[0])
    ours = vlm.generate([prompt], max_new_tokens=6)[0]
    with torch.no_grad():
        ids = prompt.input_ids[None]
        out = vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 eos_token_id=None, pad_token_id=vlm.pad_token_id, **prompt.visual)  # fmt: skip
    assert out[0, len(prompt.input_ids) :].tolist()[: len(ours)] == ours


# ---- training -----------------------------------------------------------------------------------------------------
def test_labels_loss_decreases(ckpt, dataset):
    vlm = load_eventgpt(ckpt)
    vlm.model.train()
    prompt = vlm.prepare(dataset[0], QUESTIONS[0])
    answer = torch.tensor(vlm.tokenizer(" a red car on the road", add_special_tokens=False)["input_ids"] + [2])
    ids = torch.cat([prompt.input_ids, answer])[None]
    labels = ids.clone()  # the placeholder ids (-200) must be ignored, as must the prompt (-100)
    labels[0, : len(prompt.input_ids) - 5] = -100
    opt = torch.optim.SGD([p for p in vlm.model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(4):
        loss = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **prompt.visual).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert vlm.model.model.visual_projector[0].weight.grad is not None  # gradients reach the projector


def test_build_save_load_roundtrip(tmp_path, world, dataset):
    from specalign.models.registry import MiniSizes

    sizes = MiniSizes(image_size=28, patch_size=14, vision_hidden=16, vision_layers=1, vision_heads=2, lm_hidden=32,
                      lm_layers=1, lm_heads=2, lm_intermediate=48)  # fmt: skip
    new = build_eventgpt(world / "tokenizer.json", sizes, seed=0)
    assert all(p.requires_grad for p in new.model.vision_tower.parameters())  # trainable from scratch
    assert new.vocab_size == len(new.tokenizer)
    out = save_eventgpt(new.model, new.tokenizer, new.image_processor, tmp_path / "mini-draft")
    keys = set(load_state_dict(out))
    assert "model.visual_projector.0.weight" in keys and "model.feature_adaptor.weight" in keys
    assert any(k.startswith("model.visual_tower.visual_tower.vision_model.") for k in keys)  # official names
    assert json.loads((out / "config.json").read_text())["mm_visual_tower"] == "visual_tower"
    back = load_eventgpt(out)
    prompt = new.prepare(dataset[0], QUESTIONS[0])
    assert torch.equal(back.prepare(dataset[0], QUESTIONS[0]).input_ids, prompt.input_ids)
    with torch.no_grad():
        a = new.model.eval()(input_ids=prompt.input_ids[None], **prompt.visual).logits
    torch.testing.assert_close(logits_of(back, dataset[0]), a, rtol=0, atol=1e-6)
    fresh = EventChatModel(back.model.config)  # a config read back builds a model too
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in back.model.parameters())


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_missing_directory_and_config(tmp_path):
    with pytest.raises(SpecalignError) as e:
        load_eventgpt(tmp_path / "nope")
    one_line_error(e, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecalignError) as e:
        load_eventgpt(tmp_path / "empty")
    assert "config.json" in one_line_error(e, tmp_path / "empty")


def test_wrong_model_type(tmp_path):
    ck = write_tiny_eventgpt(tmp_path / "ck", model_type="llava")
    with pytest.raises(SpecalignError) as e:
        load_eventgpt(ck)
    msg = one_line_error(e, ck / "config.json")
    assert "'llava'" in msg and "EventChat_llama" in msg


@pytest.mark.parametrize(
    "remove, expect",
    [
        ("model-00002-of-00002.safetensors", "missing"),
        ("model.safetensors.index.json", "no weights"),
        ("tokenizer.json", "tokenizer"),
        ("clip-tiny", "mm_visual_tower"),
        ("clip-tiny/preprocessor_config.json", "preprocessor_config.json"),
    ],
)
def test_missing_files(tmp_path, remove, expect):
    ck = write_tiny_eventgpt(tmp_path / "ck")
    target = ck / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    if remove == "model.safetensors.index.json":  # the shards alone, without their index, are not a checkpoint
        for f in ck.glob("model-*.safetensors"):
            f.unlink()
    with pytest.raises(SpecalignError) as e:
        load_eventgpt(ck)
    assert expect in one_line_error(e, ck)


def test_tower_weights_nowhere(tmp_path):
    ck = write_tiny_eventgpt(tmp_path / "ck", tower_inside=False)
    (ck / "clip-tiny" / "model.safetensors").unlink()
    with pytest.raises(SpecalignError) as e:
        load_eventgpt(ck)
    one_line_error(e, ck / "clip-tiny")


def test_tokenizer_larger_than_embeddings(tmp_path):
    ck = write_tiny_eventgpt(tmp_path / "ck", vocab_size=100)
    with pytest.raises(SpecalignError) as e:
        load_eventgpt(ck)
    assert "100 embeddings" in one_line_error(e, ck)


def test_weights_not_matching_config(tmp_path):
    ck = write_tiny_eventgpt(tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(cfg, vocab_size=cfg["vocab_size"] + 8)))
    with pytest.raises(SpecalignError) as e:
        load_eventgpt(ck)
    one_line_error(e, ck)


def test_token_outside_vocabulary(vlm, dataset):
    state, _ = vlm.prefill(vlm.collate([vlm.prepare(dataset[0], QUESTIONS[0])]))
    with pytest.raises(SpecalignError) as e:
        vlm.forward(torch.tensor([[vlm.vocab_size]]), state)
    one_line_error(e, vlm.name)


def test_empty_event_stream(tmp_path, vlm, world):
    root = tmp_path / "split"
    shutil.copytree(world / "my_egpt_dsec_train_500ms", root)
    sample = open_dataset(root)[0]
    rel = sample.entry["event_image_1f"]
    png = root / "event_image_1f" / (rel if isinstance(rel, str) else rel[0])
    from PIL import Image

    Image.fromarray(np.full((24, 32, 3), 255, np.uint8)).save(png)  # a white canvas: no events painted
    with pytest.raises(SpecalignError) as e:
        vlm.visual_inputs(sample)
    one_line_error(e, sample.event_path)
