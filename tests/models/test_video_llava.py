"""Video-LLaVA backend: loading a HF-layout directory, the prompt's video ids, our step functions against the HF
model's own forward and generate, the KV cache, batching, building a mini model, and one-line errors."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from tiny_video_llava import (
    FRAME_TOKENS,
    IMAGE_SIZE,
    QUESTIONS,
    VIDEO_TOKENS,
    edit_json,
    fake_hub_cache,
    one_line_error,
    write_tiny_video_llava,
)

from specalign.data import open_dataset
from specalign.errors import SpecalignError
from specalign.models.base import Prompt
from specalign.models.video_llava import (
    build_video_llava,
    load_video_llava,
    save_video_llava,
    video_llava_from_parts,
)

MAX_NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_video_llava(tmp_path_factory.mktemp("vl") / "Video-LLaVA-tiny")


@pytest.fixture(scope="module")
def vlm(ckpt):
    return load_video_llava(ckpt)


def continuation(vlm, text=" a red car on the road near the trees"):
    return torch.tensor(vlm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


# ---- loading and the prompt -----------------------------------------------------------------------------------------
def test_load_and_prompt_ids(vlm, ckpt, dataset):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert vlm.kind == "video-llava" and vlm.name == str(ckpt)
    assert vlm.vocab_size == cfg["text_config"]["vocab_size"] == 128 > len(vlm.tokenizer)  # padded like 32064
    assert vlm.tokens_per_frame == FRAME_TOKENS and vlm.num_video_tokens() == VIDEO_TOKENS == 8 * 26
    p = vlm.prepare(dataset[0], QUESTIONS[0])
    assert p.text == f"USER: <video>\n{QUESTIONS[0]} ASSISTANT:"
    ids = p.input_ids
    slots = (ids == vlm.video_token_id).nonzero().flatten()
    assert len(slots) == VIDEO_TOKENS and int(slots[-1] - slots[0]) == VIDEO_TOKENS - 1  # one contiguous run
    assert int(ids[0]) == vlm.tokenizer.bos_token_id
    assert int((ids == vlm.model.config.image_token_index).sum()) == 0
    # the same ids as VideoLlavaProcessor's expansion: the marker repeated in the text, then tokenized
    hf_text = p.text.replace("<video>", "<video>" * VIDEO_TOKENS)
    assert ids.tolist() == vlm.tokenizer(hf_text)["input_ids"]
    pixels = p.visual["pixel_values_videos"]
    assert pixels.shape == (1, 8, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == torch.float32


def test_frames_in_order_through_the_image_processor(vlm, dataset):
    sample = dataset[1]
    frames = sample.frames(8)
    pixels = vlm.visual_inputs(sample)["pixel_values_videos"][0]
    for i in (0, 3, 7):
        one = vlm.image_processor(images=[frames[i]], return_tensors="pt")
        one = one["pixel_values"] if "pixel_values" in one else one["pixel_values_images"]
        torch.testing.assert_close(pixels[i], torch.as_tensor(one)[0])
    assert not torch.equal(pixels[0], pixels[7])  # the ego vehicle moves: first and last frames differ


def test_legacy_weight_names_load_the_same_model(tmp_path, vlm, dataset):
    legacy = load_video_llava(write_tiny_video_llava(tmp_path / "legacy", legacy_keys=True))
    p = vlm.prepare(dataset[0], QUESTIONS[0])
    _, ref = vlm.prefill(vlm.collate([p]), all_logits=True)
    _, got = legacy.prefill(legacy.collate([p]), all_logits=True)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)


def test_bf16_load(ckpt, dataset):
    vlm = load_video_llava(ckpt, dtype="bf16")
    assert vlm.dtype == torch.bfloat16
    _, step = vlm.prefill(vlm.collate([vlm.prepare(dataset[0], QUESTIONS[0])]))
    assert step.logits.dtype == torch.float32 and torch.isfinite(step.logits).all()


# ---- our steps against the HF model -------------------------------------------------------------------------------
def test_prefill_equals_hf_forward(vlm, dataset):
    p = vlm.prepare(dataset[0], QUESTIONS[0])
    state, step = vlm.prefill(vlm.collate([p]), all_logits=True, return_hidden=True)
    with torch.no_grad():
        hf = vlm.model(input_ids=p.input_ids[None], pixel_values_videos=p.visual["pixel_values_videos"])
    torch.testing.assert_close(step.logits, hf.logits.float(), rtol=1e-4, atol=1e-5)
    assert state.length == len(p.input_ids) and step.hidden.shape == (1, len(p.input_ids), 32)
    # the video matters: other frames, other logits
    other = Prompt(p.input_ids, vlm.visual_inputs(dataset[1]), p.text)
    _, step2 = vlm.prefill(vlm.collate([other]))
    assert (step2.logits[0, -1] - step.logits[0, -1]).abs().max() > 1e-3


def test_kv_cache_steps_equal_one_full_forward(vlm, dataset):
    p = vlm.prepare(dataset[0], QUESTIONS[1])
    cont = continuation(vlm)
    n = len(p.input_ids)
    full = Prompt(torch.cat([p.input_ids, cont]), p.visual, p.text)
    _, ref = vlm.prefill(vlm.collate([full]), all_logits=True)
    ref = ref.logits[0]  # [n + k, V]

    state, step = vlm.prefill(vlm.collate([p]))
    torch.testing.assert_close(step.logits[0, -1], ref[n - 1], rtol=1e-4, atol=1e-4)
    for i in range(4):  # decode, one token at a time
        step = vlm.forward(cont[None, i : i + 1], state)
        torch.testing.assert_close(step.logits[0, -1], ref[n + i], rtol=1e-4, atol=1e-4)
    step = vlm.forward(cont[None, 4:], state)  # verify, several at once
    torch.testing.assert_close(step.logits[0], ref[n + 4 :], rtol=1e-4, atol=1e-4)
    assert state.length == len(full.input_ids) == state.cache.get_seq_length()


def test_rollback_then_forward(vlm, dataset):
    p = vlm.prepare(dataset[0], QUESTIONS[0])
    cont = continuation(vlm)
    n = len(p.input_ids)
    state, _ = vlm.prefill(vlm.collate([p]))
    vlm.forward(cont[None, :4], state)  # 4 drafted tokens, the last 3 rejected
    vlm.rollback(state, n + 1)
    assert state.length == n + 1 == state.cache.get_seq_length()
    new = torch.tensor([[int(cont[5])]])
    step = vlm.forward(new, state)
    fresh = Prompt(torch.cat([p.input_ids, cont[:1], new[0]]), p.visual, p.text)
    _, ref = vlm.prefill(vlm.collate([fresh]))
    torch.testing.assert_close(step.logits[0, -1], ref.logits[0, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        vlm.rollback(state, n + 5)


def test_greedy_generate_equals_hf_generate(vlm, dataset):
    for sample, q in ((dataset[0], QUESTIONS[0]), (dataset[1], QUESTIONS[1])):
        p = vlm.prepare(sample, q)
        ours = vlm.generate([p], max_new_tokens=MAX_NEW)[0]
        ids = p.input_ids[None]
        with torch.no_grad():
            hf = vlm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values_videos=p.visual["pixel_values_videos"],
                do_sample=False,
                max_new_tokens=MAX_NEW,
            )
        assert ours == hf[0, ids.shape[1] :].tolist()
        assert len(set(ours)) > 1  # not a degenerate repeat: the comparison means something


def test_batched_left_padded_generate_equals_single(vlm, dataset):
    prompts = [vlm.prepare(dataset[0], QUESTIONS[0]), vlm.prepare(dataset[1], QUESTIONS[1]),
               vlm.prepare(dataset[1], "Describe the scene.")]  # fmt: skip
    assert len({len(p.input_ids) for p in prompts}) > 1  # really padded
    batch = vlm.collate(prompts)
    _, step = vlm.prefill(batch)
    for i, p in enumerate(prompts):
        _, alone = vlm.prefill(vlm.collate([p]))
        torch.testing.assert_close(step.logits[i], alone.logits[0], rtol=1e-4, atol=1e-4)
    singles = [vlm.generate([p], max_new_tokens=MAX_NEW)[0] for p in prompts]
    assert vlm.generate(prompts, max_new_tokens=MAX_NEW) == singles


# ---- a fresh mini model from the world tokenizer ------------------------------------------------------------------
VISION = dict(image_size=IMAGE_SIZE, patch_size=6, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4)  # fmt: skip
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)  # fmt: skip


def test_build_train_save_load(tmp_path, world, dataset):
    model, processor = build_video_llava(world / "tokenizer.json", VISION, TEXT, seed=0)
    tok = processor.tokenizer
    assert (tok.convert_tokens_to_ids("<video>"), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id) == (5, 4, 3)
    assert model.config.text_config.vocab_size == len(tok)
    vlm = video_llava_from_parts(model, processor)
    p = vlm.prepare(dataset[0], QUESTIONS[0])
    assert int(p.input_ids[0]) == 1 and int((p.input_ids == 5).sum()) == VIDEO_TOKENS
    # one training step, as models.train_mini runs it
    answer = torch.tensor(tok(" The key elements in this scene include a road.", add_special_tokens=False)["input_ids"]
                          + [tok.eos_token_id])  # fmt: skip
    ids = torch.cat([p.input_ids, answer])[None]
    labels = ids.clone()
    labels[0, : len(p.input_ids)] = -100
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **p.visual).loss
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()

    out = save_video_llava(model, processor, tmp_path / "mini-target")
    loaded = load_video_llava(out)
    assert loaded.prepare(dataset[0], QUESTIONS[0]).input_ids.tolist() == p.input_ids.tolist()
    _, ref = vlm.prefill(vlm.collate([p]), all_logits=True)
    _, got = loaded.prefill(loaded.collate([p]), all_logits=True)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)


def test_build_rejects_a_tokenizer_without_video(tmp_path):
    from tokenizers import Tokenizer, models

    bad = tmp_path / "tokenizer.json"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    tok.save(str(bad))
    with pytest.raises(SpecalignError) as e:
        build_video_llava(bad, VISION, TEXT)
    assert "<video>" in one_line_error(e, bad)


# ---- bad inputs: one line naming the file ---------------------------------------------------------------------------
def copy_of(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "copy")


def test_missing_files(tmp_path, ckpt):
    with pytest.raises(SpecalignError) as e:
        load_video_llava(tmp_path / "nowhere")
    one_line_error(e, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecalignError) as e:
        load_video_llava(tmp_path / "empty")
    assert "config.json" in one_line_error(e, tmp_path / "empty")
    for name, words in (("model.safetensors", "no weights"), ("tokenizer.json", "tokenizer"),
                        ("preprocessor_config.json", "preprocessor_config.json")):  # fmt: skip
        d = shutil.copytree(ckpt, tmp_path / name.replace(".", "_"))
        (d / name).unlink()
        with pytest.raises(SpecalignError) as e:
            load_video_llava(d)
        assert words in one_line_error(e, d)


def test_missing_weight_shard(tmp_path):
    d = write_tiny_video_llava(tmp_path / "sharded", legacy_keys=True)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SpecalignError) as e:
        load_video_llava(d)
    one_line_error(e, d / "model-00002-of-00002.safetensors")


def test_bad_configs(tmp_path, ckpt):
    d = copy_of(ckpt, tmp_path)
    cfg = d / "config.json"
    edit_json(cfg, model_type="llava")
    with pytest.raises(SpecalignError) as e:
        load_video_llava(d)
    assert "video_llava" in one_line_error(e, cfg)

    edit_json(cfg, model_type="video_llava", video_token_index=500)  # beyond the 128 embeddings
    with pytest.raises(SpecalignError) as e:
        load_video_llava(d)
    assert "not above the <video> id 500" in one_line_error(e, cfg)

    edit_json(cfg, video_token_index=7)  # inside, but not the tokenizer's <video>
    with pytest.raises(SpecalignError) as e:
        load_video_llava(d)
    assert "<video>" in one_line_error(e, cfg)

    edit_json(cfg, video_token_index=json.loads((ckpt / "config.json").read_text())["video_token_index"])
    pre = d / "preprocessor_config.json"
    edit_json(pre, crop_size={"height": 24, "width": 24})
    with pytest.raises(SpecalignError) as e:
        load_video_llava(d)
    assert "24 px" in one_line_error(e, pre)

    (d / "config.json").write_text("{not json")
    with pytest.raises(SpecalignError) as e:
        load_video_llava(d)
    one_line_error(e, cfg)


def test_tokenizer_larger_than_embeddings(tmp_path, ckpt):
    d = copy_of(ckpt, tmp_path)
    edit_json(d / "config.json", text_config={"vocab_size": 100})  # the tokenizer has 123 tokens
    with pytest.raises(SpecalignError) as e:
        load_video_llava(d)
    assert "123 tokens" in one_line_error(e, d)


def test_wrong_weights(tmp_path, ckpt):
    d = copy_of(ckpt, tmp_path)
    edit_json(d / "config.json", text_config={"hidden_size": 64})
    with pytest.raises(SpecalignError) as e:
        load_video_llava(d)
    assert "wrong shape of" in one_line_error(e, d)


class FrameSample:
    """A Data-API-like sample whose frames() returns a fixed array."""

    def __init__(self, frames, video_dir="clips/seq/000007"):
        self._frames, self.video_dir, self.id = frames, video_dir, "seq/000007"

    def frames(self, n):
        return self._frames


@pytest.mark.parametrize(
    "frames, words",
    [
        (np.zeros((7, 24, 32, 3), np.uint8), "exactly 8 frames, got 7"),
        (np.zeros((9, 24, 32, 3), np.uint8), "exactly 8 frames, got 9"),
        (np.zeros((8, 24, 32), np.uint8), "[8, 24, 32]"),
        (np.zeros((8, 24, 32, 4), np.uint8), "[8, 24, 32, 4]"),
        (np.zeros((8, 24, 32, 3), np.float32), "float32"),
        (np.zeros((8, 0, 32, 3), np.uint8), "[8, 0, 32, 3]"),
    ],
)
def test_bad_frames(vlm, frames, words):
    with pytest.raises(SpecalignError) as e:
        vlm.visual_inputs(FrameSample(frames))
    assert words in one_line_error(e, "clips/seq/000007")


def test_clip_without_frames(vlm, dataset, tmp_path):
    world = shutil.copytree(dataset.root, tmp_path / "split")
    sample = open_dataset(world)[0]
    shutil.rmtree(sample.video_dir)
    with pytest.raises(SpecalignError) as e:
        vlm.prepare(sample, QUESTIONS[0])
    one_line_error(e, sample.video_dir)


def test_token_outside_vocab(vlm, dataset):
    state, _ = vlm.prefill(vlm.collate([vlm.prepare(dataset[0], QUESTIONS[0])]))
    with pytest.raises(SpecalignError) as e:
        vlm.forward(torch.tensor([[vlm.vocab_size]]), state)
    assert "outside the vocabulary" in one_line_error(e, vlm.name)


def test_question_with_a_video_marker(vlm, dataset):
    with pytest.raises(SpecalignError) as e:
        vlm.prepare(dataset[0], "What is in <video>?")
    one_line_error(e, vlm.name)


def test_hub_ids_offline(tmp_path, ckpt, dataset):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    with pytest.raises(SpecalignError) as e:
        load_video_llava("nobody/Video-LLaVA-not-cached", cache_dir=cache)
    assert "local Hugging Face cache" in one_line_error(e, "nobody/Video-LLaVA-not-cached")
    fake_hub_cache(cache, "LanguageBind/Video-LLaVA-tiny-hf", ckpt)
    vlm = load_video_llava("LanguageBind/Video-LLaVA-tiny-hf", cache_dir=cache)
    assert vlm.name == "LanguageBind/Video-LLaVA-tiny-hf"
    assert len(vlm.prepare(dataset[0], QUESTIONS[0]).input_ids) > VIDEO_TOKENS


def test_quantization_needs_cuda(ckpt):
    with pytest.raises(SpecalignError) as e:
        load_video_llava(ckpt, quantization=4)
    assert "CUDA" in one_line_error(e, ckpt)


# ---- where torchvision exists (the GPU machine): transformers' own VideoLlavaProcessor agrees ------------------------
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="VideoLlavaProcessor needs torchvision")
def test_hf_processor_agrees(vlm, ckpt, dataset):
    from transformers import VideoLlavaProcessor

    proc = VideoLlavaProcessor.from_pretrained(str(ckpt))
    sample = dataset[0]
    p = vlm.prepare(sample, QUESTIONS[0])
    hf = proc(text=p.text, videos=list(sample.frames(8)), return_tensors="pt")
    assert hf["input_ids"][0].tolist() == p.input_ids.tolist()
    # torchvision resizes a little differently from PIL: same layout, close values
    assert hf["pixel_values_videos"].shape == p.visual["pixel_values_videos"].shape
    assert (hf["pixel_values_videos"] - p.visual["pixel_values_videos"]).abs().mean() < 0.1


# ---- on the GPU machine: pytest -m gpu ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_generate_equals_hf_generate(ckpt, dataset, dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    vlm = load_video_llava(ckpt, device="cuda", dtype=dtype)
    assert vlm.device.type == "cuda" and vlm.dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)
    prompts = [vlm.prepare(dataset[0], QUESTIONS[0]), vlm.prepare(dataset[1], QUESTIONS[1])]
    for p in prompts:
        ids = p.input_ids[None].cuda()
        with torch.no_grad():
            hf = vlm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values_videos=p.visual["pixel_values_videos"].to("cuda", vlm.dtype),
                do_sample=False,
                max_new_tokens=MAX_NEW,
            )
        assert vlm.generate([p], max_new_tokens=MAX_NEW)[0] == hf[0, ids.shape[1] :].tolist()
