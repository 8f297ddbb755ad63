"""LLaVA backend: loading, the image placeholder count, which image a sample gives, our step functions against
the HF model's forward and generate, the KV cache, batching, and one-line errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_video_llava import (
    IMAGE_SIZE,
    PATCHES,
    QUESTIONS,
    edit_json,
    fake_hub_cache,
    one_line_error,
    write_tiny_llava,
)

from specalign.errors import SpecalignError
from specalign.models.base import Prompt
from specalign.models.llava import load_llava

MAX_NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "llava-tiny")


@pytest.fixture(scope="module")
def vlm(ckpt):
    return load_llava(ckpt)


def test_prompt_ids_and_image_count(vlm, ckpt, dataset, tmp_path):
    p = vlm.prepare(dataset[0], QUESTIONS[0])
    assert p.text == f"USER: <image>\n{QUESTIONS[0]} ASSISTANT:"
    slots = (p.input_ids == vlm.image_token_id).nonzero().flatten()
    assert len(slots) == PATCHES == 25  # default strategy: CLS dropped
    assert int(slots[-1] - slots[0]) == PATCHES - 1 and int(p.input_ids[0]) == vlm.tokenizer.bos_token_id
    assert p.input_ids.tolist() == vlm.tokenizer(p.text.replace("<image>", "<image>" * PATCHES))["input_ids"]
    assert p.visual["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    full = load_llava(write_tiny_llava(tmp_path / "full", strategy="full"))
    assert int((full.prepare(dataset[0], QUESTIONS[0]).input_ids == full.image_token_id).sum()) == PATCHES + 1


def test_image_sources(ckpt, vlm, dataset):
    sample = dataset[0]
    frame = vlm.visual_inputs(sample)["pixel_values"]
    middle = vlm.image_processor(images=[sample.frames(8)[4]], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(frame, torch.as_tensor(middle))
    events = load_llava(ckpt, image_source="event")
    ev = events.visual_inputs(sample)["pixel_values"]
    ref = vlm.image_processor(images=[sample.event_images(1)[0]], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ev, torch.as_tensor(ref))
    assert not torch.equal(ev, frame)
    with pytest.raises(SpecalignError) as e:
        load_llava(ckpt, image_source="depth")
    assert "image_source" in str(e.value)


def test_legacy_weight_names(tmp_path, vlm, dataset):
    legacy = load_llava(write_tiny_llava(tmp_path / "legacy", legacy_keys=True))
    p = vlm.prepare(dataset[0], QUESTIONS[0])
    _, ref = vlm.prefill(vlm.collate([p]), all_logits=True)
    _, got = legacy.prefill(legacy.collate([p]), all_logits=True)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)


def test_prefill_steps_rollback_against_hf(vlm, dataset):
    p = vlm.prepare(dataset[0], QUESTIONS[1])
    cont = torch.tensor(vlm.tokenizer(" a red car on the road", add_special_tokens=False)["input_ids"])
    n = len(p.input_ids)
    full = torch.cat([p.input_ids, cont])
    with torch.no_grad():
        hf = vlm.model(input_ids=full[None], pixel_values=p.visual["pixel_values"]).logits[0].float()
    state, step = vlm.prefill(vlm.collate([p]), all_logits=True)
    torch.testing.assert_close(step.logits[0], hf[:n], rtol=1e-4, atol=1e-4)  # prefill == HF forward
    for i in range(3):  # decode
        step = vlm.forward(cont[None, i : i + 1], state)
        torch.testing.assert_close(step.logits[0, -1], hf[n + i], rtol=1e-4, atol=1e-4)
    step = vlm.forward(cont[None, 3:], state)  # verify several
    torch.testing.assert_close(step.logits[0], hf[n + 3 :], rtol=1e-4, atol=1e-4)
    vlm.rollback(state, n + 1)  # keep one continuation token, then a different one
    step = vlm.forward(cont[None, 2:3], state)
    _, ref = vlm.prefill(vlm.collate([Prompt(torch.cat([p.input_ids, cont[:1], cont[2:3]]), p.visual, p.text)]))
    torch.testing.assert_close(step.logits[0, -1], ref.logits[0, -1], rtol=1e-4, atol=1e-4)


def test_generate_equals_hf_and_batched_equals_single(vlm, dataset):
    prompts = [vlm.prepare(dataset[0], QUESTIONS[0]), vlm.prepare(dataset[1], QUESTIONS[1])]
    assert len({len(p.input_ids) for p in prompts}) > 1
    singles = []
    for p in prompts:
        ours = vlm.generate([p], max_new_tokens=MAX_NEW)[0]
        ids = p.input_ids[None]
        with torch.no_grad():
            hf = vlm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=p.visual["pixel_values"],
                do_sample=False,
                max_new_tokens=MAX_NEW,
            )
        assert ours == hf[0, ids.shape[1] :].tolist() and len(set(ours)) > 1
        singles.append(ours)
    assert vlm.generate(prompts, max_new_tokens=MAX_NEW) == singles


# ---- bad inputs ---------------------------------------------------------------------------------------------------
def test_bad_checkpoints(tmp_path, ckpt):
    with pytest.raises(SpecalignError) as e:
        load_llava(tmp_path / "nowhere")
    one_line_error(e, tmp_path / "nowhere")

    d = shutil.copytree(ckpt, tmp_path / "copy")
    cfg = d / "config.json"
    edit_json(cfg, model_type="video_llava")
    with pytest.raises(SpecalignError) as e:
        load_llava(d)
    assert "'llava'" in one_line_error(e, cfg)

    edit_json(cfg, model_type="llava", text_config={"vocab_size": 100})
    with pytest.raises(SpecalignError) as e:
        load_llava(d)
    assert "123 tokens" in one_line_error(e, d)

    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    edit_json(cfg, text_config={"vocab_size": vocab})
    (d / "tokenizer.json").unlink()
    with pytest.raises(SpecalignError) as e:
        load_llava(d)
    assert "tokenizer" in one_line_error(e, d)

    with pytest.raises(SpecalignError) as e:
        load_llava("nobody/llava-not-cached", cache_dir=tmp_path)
    assert "local Hugging Face cache" in one_line_error(e, "nobody/llava-not-cached")


def test_hub_id_from_the_cache(tmp_path, ckpt, dataset):
    cache = fake_hub_cache(tmp_path / "hf", "llava-hf/llava-tiny-hf", ckpt)
    vlm = load_llava("llava-hf/llava-tiny-hf", cache_dir=cache)
    assert int((vlm.prepare(dataset[0], QUESTIONS[0]).input_ids == vlm.image_token_id).sum()) == PATCHES


class ImageSample:
    video_dir = "clips/seq/000003"
    event_path = "events/seq/000003.npy"

    def __init__(self, image):
        self.image = image

    def frames(self, n):
        return np.stack([self.image] * n)

    def event_images(self, n):
        return np.stack([self.image] * n)


@pytest.mark.parametrize("image", [np.zeros((24, 32), np.uint8), np.zeros((24, 32, 4), np.uint8),
                                   np.zeros((24, 32, 3), np.float64)])  # fmt: skip
def test_bad_images(vlm, image):
    with pytest.raises(SpecalignError) as e:
        vlm.visual_inputs(ImageSample(image))
    one_line_error(e, "clips/seq/000003")


def test_token_outside_vocab(vlm, dataset):
    state, _ = vlm.prefill(vlm.collate([vlm.prepare(dataset[0], QUESTIONS[0])]))
    with pytest.raises(SpecalignError) as e:
        vlm.forward(torch.tensor([[vlm.vocab_size + 3]]), state)
    one_line_error(e, vlm.name)
