"""LLaVA: a generic image VLM target or draft (transformers `LlavaForConditionalGeneration`, e.g. llava-1.5).

    one image uint8 [H, W, 3] --the checkpoint's image processor (PIL flavour)--> pixel_values [1, 3, S, S]
        --vision tower, layer vision_feature_layer--> [P (+ CLS), C] ("default" drops CLS, "full" keeps it)
        --projector--> tokens that replace the prompt's `<image>` ids (576 for CLIP-L/14 at 336 px, 256 at 224 px)

Which image of a sample it sees (`image_source`): "frame", the middle one of the 8 RGB frames the target sees
(index 4 of `frames(8)`), or "event", the 1f event image (`event_images(1)`) the way the draft sees events.

    vlm = load_llava("/ckpt/llava-1.5-7b-hf")
    vlm = load_llava("llava-hf/llava-1.5-7b-hf", image_source="event")   # a hub id in the local HF cache
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specalign.errors import SpecalignError, fail, one_line
from specalign.models.base import VLM
from specalign.models.loading import (
    Checked,
    check_special_ids,
    check_tokenizer_fits,
    load_hf_model,
    load_image_processor,
    load_tokenizer,
    quiet_transformers,
    read_config,
    resolve_checkpoint,
    weight_files,
)
from specalign.models.video_llava import IMAGE_TOKEN, NUM_FRAMES, Processor, expand_placeholder, image_pixels

MODEL_TYPE = "llava"
PROMPT = "USER: <image>\n{question} ASSISTANT:"
IMAGE_SOURCES = ("frame", "event")
_CLS = {"clip_vision_model": 1, "siglip_vision_model": 0}  # vision towers we can count tokens for: CLS or not


@dataclass
class Llava(VLM):
    """LLaVA behind the VLM interface."""

    kind: str = "llava"
    image_processor: Any = None
    image_source: str = "frame"

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_index)

    @property
    def num_image_tokens(self) -> int:
        return image_tokens(self.model.config)

    def prompt_text(self, question: str) -> str:
        return PROMPT.format(question=question)

    def sample_image(self, sample) -> tuple[np.ndarray, Any]:
        """(uint8 [H, W, 3], where it came from) for the configured image source."""
        if self.image_source == "event":
            return sample.event_images(1)[0], getattr(sample, "event_path", getattr(sample, "id", sample))
        frames = sample.frames(NUM_FRAMES)
        return frames[len(frames) // 2], getattr(sample, "video_dir", getattr(sample, "id", sample))

    def visual_inputs(self, sample) -> dict[str, torch.Tensor]:
        """{"pixel_values": float32 [1, 3, S, S]}."""
        image, where = self.sample_image(sample)
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
            raise fail(where, f"image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
        pixels = image_pixels(self.image_processor, [arr])
        size = int(self.model.config.vision_config.image_size)
        if tuple(pixels.shape[-2:]) != (size, size):
            raise fail(where, f"image was processed to {list(pixels.shape[-2:])} px, the vision tower takes {size}")
        return {"pixel_values": pixels}

    def expand_prompt(self, text: str, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token ids long [T]: tokenizer(text) with its `<image>` id repeated once per image token."""
        return expand_placeholder(self.tokenizer, text, IMAGE_TOKEN, self.image_token_id, self.num_image_tokens,
                                  self.name)  # fmt: skip

    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        with quiet_transformers():
            self.model.save_pretrained(str(out))
        patch = int(self.model.config.vision_config.patch_size)
        strategy = self.model.config.vision_feature_select_strategy
        Processor(self.tokenizer, self.image_processor, patch, "LlavaProcessor", strategy).save_pretrained(out)
        return out


def image_tokens(config) -> int:
    """`<image>` ids per image from a LlavaConfig: the tower's positions (patches, + CLS for CLIP), minus the first
    one with the "default" select strategy (HF drops it whatever it is)."""
    vc = config.vision_config
    positions = (vc.image_size // vc.patch_size) ** 2 + _CLS[vc.model_type]
    return positions - (config.vision_feature_select_strategy == "default")


def check_llava(path: Path) -> Checked:
    """Every check of a LLaVA checkpoint directory that needs no weights (config, weight files, tokenizer and its
    <image> id, image processor); one-line SpecalignError on the first problem."""
    from transformers import LlavaConfig

    cfg = read_config(path)
    config_file = path / "config.json"
    if cfg.get("model_type") != MODEL_TYPE:
        raise fail(config_file, f"model_type is {cfg.get('model_type')!r}, not {MODEL_TYPE!r} (LLaVA)")
    files = weight_files(path)
    try:
        with quiet_transformers():
            config = LlavaConfig.from_dict(cfg)
    except Exception as e:
        raise fail(config_file, f"invalid LLaVA config ({one_line(e)})") from None
    tower = getattr(config.vision_config, "model_type", None)
    if tower not in _CLS:
        raise fail(config_file, f"vision tower {tower!r} is not supported (CLIP or SigLIP)")
    tokenizer = load_tokenizer(path)
    vocab = int(config.text_config.vocab_size)
    check_tokenizer_fits(tokenizer, vocab, path)
    check_special_ids(config_file, vocab, tokenizer, {IMAGE_TOKEN: int(config.image_token_index)})
    image_processor = load_image_processor(path, "CLIPImageProcessor")
    return Checked(path, config, files, tokenizer, image_processor, vocab)


def load_llava(path_or_hub_id, device="cpu", dtype=None, quantization: int | None = None, name: str | None = None,
               offline: bool = True, cache_dir=None, image_source: str = "frame") -> Llava:  # fmt: skip
    """Load a LLaVA checkpoint (HF layout directory, or a hub id in the local HF cache); file problems are one-line
    SpecalignErrors raised before the weights are read."""
    from transformers import LlavaForConditionalGeneration

    if image_source not in IMAGE_SOURCES:
        raise SpecalignError(f"image_source: unknown {image_source!r}: choose {' or '.join(IMAGE_SOURCES)}")
    c = check_llava(resolve_checkpoint(path_or_hub_id, offline, cache_dir))
    model = load_hf_model(LlavaForConditionalGeneration, c.path, c.config, c.files, device, dtype, quantization)
    return Llava(model=model, tokenizer=c.tokenizer, name=name or str(path_or_hub_id),
                 image_processor=c.image_processor, image_source=image_source)  # fmt: skip
