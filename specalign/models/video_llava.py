"""Video-LLaVA: the target VLM that sees 8 RGB frames (transformers `VideoLlavaForConditionalGeneration`).

    8 frames uint8 [8, H, W, 3] --VideoLlavaImageProcessor, per frame--> pixel_values_videos [1, 8, 3, S, S]
        --CLIP video tower, layer vision_feature_layer (-2), CLS kept--> [8, P + 1, C] --projector--> 8 (P + 1)
        tokens that replace the 8 (P + 1) `<video>` ids of the prompt (2056 for the 7B: 8 x 257) --> Llama.

The prompt ids already hold one `<video>` id per video token (the model only swaps embeddings), so the KV cache
is as long as the prompt (see models.base).

    vlm = load_video_llava("/ckpt/Video-LLaVA-7B-hf")                  # a directory
    vlm = load_video_llava("LanguageBind/Video-LLaVA-7B-hf")           # a hub id already in the local HF cache
    model, processor = build_video_llava("world/tokenizer.json", vision={...}, text={...})   # fresh, to train
    save_video_llava(model, processor, out_dir)                        # loads back with load_video_llava

Frames go through the PIL `VideoLlavaImageProcessor` one by one (resize shortest side to S bicubic, center crop
S x S, CLIP mean/std) on every machine: transformers' `VideoLlavaVideoProcessor` needs torchvision, which the CPU
machines do not have, and resizes slightly differently.
"""

from __future__ import annotations

import inspect
import json
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
    image_processor_config,
    load_hf_model,
    load_image_processor,
    load_tokenizer,
    quiet_transformers,
    read_config,
    resolve_checkpoint,
    weight_files,
)

MODEL_TYPE = "video_llava"
NUM_FRAMES = 8
VIDEO_TOKEN, IMAGE_TOKEN = "<video>", "<image>"
PROMPT = "USER: <video>\n{question} ASSISTANT:"


# ---- the backend --------------------------------------------------------------------------------------------------
@dataclass
class VideoLlava(VLM):
    """Video-LLaVA behind the VLM interface."""

    kind: str = "video-llava"
    image_processor: Any = None  # VideoLlavaImageProcessor (PIL)
    num_frames: int = NUM_FRAMES

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_index)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def tokens_per_frame(self) -> int:
        """P + 1: patches plus CLS (video frames keep CLS; 257 for CLIP-L/14 at 224 px)."""
        return frame_tokens(self.model.config)

    def num_video_tokens(self, frames: int = NUM_FRAMES) -> int:
        """`<video>` ids in a prompt for `frames` frames: frames x (P + 1) (2056 for the 7B)."""
        return frames * self.tokens_per_frame

    def prompt_text(self, question: str) -> str:
        return PROMPT.format(question=question)

    def visual_inputs(self, sample) -> dict[str, torch.Tensor]:
        """{"pixel_values_videos": float32 [1, 8, 3, S, S]} from the sample's 8 frames (Data API `frames(8)`)."""
        where = getattr(sample, "video_dir", None) or getattr(sample, "id", sample)
        frames = sample.frames(self.num_frames)
        return {"pixel_values_videos": video_pixels(self.image_processor, frames, where, self.num_frames,
                                                    self.image_size)}  # fmt: skip

    def expand_prompt(self, text: str, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token ids long [T] of the prompt, its one `<video>` id repeated once per video token, as
        VideoLlavaProcessor expands it (tokenizer(text) with its BOS; <video> is a special token, so the text
        around it tokenizes the same either way)."""
        pixels = visual["pixel_values_videos"]
        return expand_placeholder(self.tokenizer, text, VIDEO_TOKEN, self.video_token_id,
                                  pixels.shape[1] * self.tokens_per_frame, self.name)  # fmt: skip

    @property
    def processor(self) -> Processor:
        return Processor(self.tokenizer, self.image_processor, int(self.model.config.vision_config.patch_size))

    def save(self, out_dir) -> Path:
        return save_video_llava(self.model, self.processor, out_dir)


def frame_tokens(config) -> int:
    """Video tokens per frame from a VideoLlavaConfig: (image_size / patch_size)^2 + 1 (CLS kept)."""
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + 1


def video_pixels(image_processor, frames, where, num_frames: int = NUM_FRAMES, image_size: int | None = None):
    """uint8 frames [num_frames, H, W, 3] -> float32 [1, num_frames, 3, S, S]; a bad array -> SpecalignError
    naming `where` (the clip)."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or min(arr.shape[1:3], default=0) < 1:
        raise fail(where, f"video frames must be uint8 [{num_frames}, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] != num_frames:
        raise fail(where, f"Video-LLaVA takes exactly {num_frames} frames, got {arr.shape[0]}")
    pixels = image_pixels(image_processor, list(arr))
    if image_size is not None and tuple(pixels.shape[-2:]) != (image_size, image_size):
        raise fail(where, f"frames were processed to {list(pixels.shape[-2:])} px, the vision tower takes {image_size}")
    return pixels.unsqueeze(0)


def image_pixels(image_processor, images: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 images -> float32 [n, 3, S, S] through an image processor of either transformers version
    (5.17 returns `pixel_values_images` for Video-LLaVA, 5.24 can return `pixel_values`)."""
    kwargs: dict = {"return_tensors": "pt"}
    if "return_legacy_image_output" in inspect.signature(image_processor.preprocess).parameters:
        kwargs["return_legacy_image_output"] = False  # 5.24: the new key, without a deprecation warning
    out = image_processor(images=images, **kwargs)
    pixels = out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]
    return torch.as_tensor(pixels, dtype=torch.float32)


def expand_placeholder(tokenizer, text: str, token: str, token_id: int, count: int, name: str) -> torch.Tensor:
    """tokenizer(text) with its single `token` id repeated `count` times: long [T]. Errors if the text does not hold
    the marker exactly once or the tokenizer does not keep it as that one id."""
    if text.count(token) != 1:
        raise SpecalignError(f"{name}: the prompt must hold {token} exactly once, found {text.count(token)}: {text!r}")
    ids = tokenizer(text)["input_ids"]
    where = [i for i, t in enumerate(ids) if t == token_id]
    if len(where) != 1:
        raise SpecalignError(f"{name}: the tokenizer turned {token} into {len(where)} id(s) {token_id}, expected 1")
    k = where[0]
    out = torch.tensor(ids[:k] + [token_id] * count + ids[k + 1 :], dtype=torch.long)
    got = int((out == token_id).sum())
    if got != count:  # cannot happen with one marker in the text; the model would fail far less clearly
        raise SpecalignError(f"{name}: the prompt holds {got} {token} ids, the model needs {count}")
    return out


# ---- the processor ------------------------------------------------------------------------------------------------
@dataclass
class Processor:
    """What the backend needs of a VideoLlavaProcessor (which cannot be built without torchvision): the tokenizer
    and the image processor. `save_pretrained` writes the HF layout, so `VideoLlavaProcessor.from_pretrained`
    also reads the directory where torchvision is installed."""

    tokenizer: Any
    image_processor: Any
    patch_size: int
    processor_class: str = "VideoLlavaProcessor"
    vision_feature_select_strategy: str = "default"

    def save_pretrained(self, out_dir) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out))
        self.image_processor.save_pretrained(str(out))
        extra = {
            "processor_class": self.processor_class,
            "patch_size": self.patch_size,
            "num_additional_image_tokens": 1,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "image_token": IMAGE_TOKEN,
        }
        if self.processor_class == "VideoLlavaProcessor":
            extra["video_token"] = VIDEO_TOKEN
        (out / "processor_config.json").write_text(json.dumps(extra, indent=2) + "\n")


# ---- loading ------------------------------------------------------------------------------------------------------
def check_video_llava(path: Path) -> Checked:
    """Every check of a Video-LLaVA checkpoint directory that needs no weights: config, weight files, tokenizer and
    its placeholder ids, image processor. One-line SpecalignError on the first problem."""
    from transformers import VideoLlavaConfig

    cfg = read_config(path)
    config_file = path / "config.json"
    if cfg.get("model_type") != MODEL_TYPE:
        raise fail(config_file, f"model_type is {cfg.get('model_type')!r}, not {MODEL_TYPE!r} (Video-LLaVA)")
    files = weight_files(path)
    try:
        with quiet_transformers():
            config = VideoLlavaConfig.from_dict(cfg)
    except Exception as e:
        raise fail(config_file, f"invalid Video-LLaVA config ({one_line(e)})") from None
    if getattr(config.vision_config, "model_type", "") != "clip_vision_model":
        raise fail(config_file, f"vision tower {config.vision_config.model_type!r} is not CLIP")
    tokenizer = load_tokenizer(path)
    vocab = int(config.text_config.vocab_size)
    check_tokenizer_fits(tokenizer, vocab, path)
    specials = {IMAGE_TOKEN: int(config.image_token_index), VIDEO_TOKEN: int(config.video_token_index)}
    check_special_ids(config_file, vocab, tokenizer, specials)
    image_processor = load_image_processor(path, "VideoLlavaImageProcessor")
    crop = _crop_size(image_processor)
    size = config.vision_config.image_size
    if crop is not None and crop != size:
        raise fail(image_processor_config(path)[0], f"crops frames to {crop} px but the vision tower takes {size} px")
    return Checked(path, config, files, tokenizer, image_processor, vocab)


def load_video_llava(path_or_hub_id, device="cpu", dtype=None, quantization: int | None = None,
                     name: str | None = None, offline: bool = True, cache_dir=None) -> VideoLlava:  # fmt: skip
    """Load a Video-LLaVA checkpoint (a directory in the HF layout, or a hub id in the local cache). Every problem
    with the files is a one-line SpecalignError raised before the weights are read."""
    from transformers import VideoLlavaForConditionalGeneration

    c = check_video_llava(resolve_checkpoint(path_or_hub_id, offline, cache_dir))
    model = load_hf_model(VideoLlavaForConditionalGeneration, c.path, c.config, c.files, device, dtype, quantization)
    return VideoLlava(model=model, tokenizer=c.tokenizer, name=name or str(path_or_hub_id),
                      image_processor=c.image_processor)  # fmt: skip


def _crop_size(image_processor) -> int | None:
    """The square side the processor outputs (crop_size when it crops), or None when it does not say."""
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    if isinstance(crop, dict) and crop.get("height") == crop.get("width"):
        return crop.get("height")
    return None


# ---- fresh models and saving ----------------------------------------------------------------------------------------
def world_tokenizer(tokenizer_file):
    """A `tokenizers` tokenizer file (a minidsec world's tokenizer.json: <unk> <s> </s> <pad> <image> <video> ...)
    as a transformers fast tokenizer that adds <s> in front, as Llama's does."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer_file)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise fail(path, f"not a tokenizers file ({one_line(e)})") from None
    missing = [t for t in ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, VIDEO_TOKEN) if tok.token_to_id(t) is None]
    if missing:
        raise fail(path, f"tokenizer lacks the special token(s) {', '.join(missing)}")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")  # fmt: skip


def build_video_llava(tokenizer_file, vision: dict, text: dict, seed: int | None = None):
    """A freshly initialised VideoLlavaForConditionalGeneration + Processor around a `tokenizers` file.

    vision: CLIPVisionConfig keys (image_size, patch_size, hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads, ...); text: LlamaConfig keys (hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads, num_key_value_heads, max_position_embeddings, ...). vocab_size defaults to the
        tokenizer's size; bos/eos/pad and the <image>/<video> ids come from the tokenizer.
    Returns (model in train mode, Processor); save both with save_video_llava."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    tokenizer = world_tokenizer(tokenizer_file)
    vision = {"model_type": "clip_vision_model", **vision}
    text = {"model_type": "llama", "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **text}  # fmt: skip
    if text["vocab_size"] < len(tokenizer):
        raise fail(tokenizer_file, f"text vocab_size {text['vocab_size']} < the tokenizer's {len(tokenizer)} tokens")
    size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 14))
    patches = (size // patch) ** 2
    config = VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_seq_length=patches,
        video_seq_length=NUM_FRAMES * (patches + 1),
        pad_token_id=tokenizer.pad_token_id,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config)
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, Processor(tokenizer, image_processor, patch)


def video_llava_from_parts(model, processor: Processor, name: str = "video-llava (new)") -> VideoLlava:
    """The VLM backend around a model + Processor (e.g. from build_video_llava), for training and evaluation."""
    return VideoLlava(model=model, tokenizer=processor.tokenizer, name=name, image_processor=processor.image_processor)


def save_video_llava(model, processor: Processor, out_dir) -> Path:
    """Write config, safetensors weights, generation config, tokenizer, image processor and processor_config.json:
    the HF layout that load_video_llava (and transformers' from_pretrained) reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(str(out))
    processor.save_pretrained(out)
    return out
