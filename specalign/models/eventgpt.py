"""EventGPT (CVPR 2025): the draft VLM that sees an event-camera image.

Architecture, as in the public EventGPT code, with real transformers classes:

    event images [t, 3, S, S] --CLIP ViT (frozen, last_hidden_state, CLS kept)--> [t, P, C]
        --visual_projector: Linear(C, D) GELU Linear(D, D)--> --feature_adaptor: Linear(D, D), once--> [t, P, D]
        --spatio-temporal aggregation--> [t + P, D]: t temporal tokens (mean over positions), then P spatial tokens
        (mean over frames); they replace the t + P placeholder ids of the prompt; then the Llama LM.

The official code expands a single `<event>` id (-200) inside the model; here the prompt already holds one -200
per visual token, so the KV cache length equals the prompt length (see models.base).

    vlm = load_eventgpt("/ckpt/EventGPT-7b")                 # an official checkpoint directory
    vlm = build_eventgpt(tokenizer_file, sizes)              # a fresh mini model to train
    save_eventgpt(vlm.model, vlm.tokenizer, vlm.image_processor, out_dir)   # the official layout
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import read_json
from specalign.models.base import VLM
from specalign.models.loading import (
    HUB_ID,
    Checked,
    check_tokenizer_fits,
    load_hf_model,
    load_tokenizer,
    quiet_transformers,
    read_config,
    resolve_checkpoint,
    resolve_dtype,
    weight_files,
)

MODEL_TYPE = "EventChat_llama"
PLACEHOLDER_ID = -200  # EVENT_TOKEN_INDEX of EventGPT's tokenizer helper; one per visual token here
EVENT_TOKEN = "<event>"
EV_PATCH, EV_START, EV_END = "<ev_patch>", "<ev_start>", "<ev_end>"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
TOWER_DIR = "visual_tower"  # where save_eventgpt puts the CLIP tower (config, weights, image processor)
TOWER_PREFIX = "model.visual_tower.visual_tower."  # official weight names of the CLIP tower
# transformers 5.24 renamed the KV-cache argument `past_key_values` -> `cache`; 5.17 only knows the old name
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class EventChatConfig(LlamaConfig):
    """LlamaConfig + EventGPT's keys. Class attributes are the defaults; config.json values (and any unknown
    extra keys, kept as attributes) override them.

    mm_visual_tower: path of the CLIP tower directory (relative paths: against the checkpoint directory)
    mm_hidden_size: CLIP width C (1024 for ViT-L/14-336)
    event_feature_adaptor: build `model.feature_adaptor` (official code: present whenever the key is)
    mm_use_im_patch_token / mm_use_im_start_end: whether <ev_patch> / <ev_start>,<ev_end> were added as tokens
    vision_config: CLIPVisionConfig as a dict (ours: lets a model be built without the tower directory;
        load_eventgpt always takes it from the tower directory)
    """

    model_type = MODEL_TYPE
    mm_visual_tower = None
    mm_hidden_size = None
    event_feature_adaptor = None
    mm_use_im_patch_token = False
    mm_use_im_start_end = False
    vision_config = None


def eventgpt_config(
    vocab_size: int,
    vision_config: CLIPVisionConfig | dict,
    *,
    hidden_size: int = 4096,
    intermediate_size: int = 11008,
    num_hidden_layers: int = 32,
    num_attention_heads: int = 32,
    feature_adaptor: bool = True,
    mm_visual_tower: str = TOWER_DIR,
    **llama_kwargs,
) -> EventChatConfig:
    """A complete EventChatConfig (defaults: the 7B shape). llama_kwargs go to LlamaConfig (bos/eos/pad ids,
    num_key_value_heads, max_position_embeddings, ...)."""
    vision = vision_config.to_dict() if isinstance(vision_config, CLIPVisionConfig) else dict(vision_config)
    vision = CLIPVisionConfig(**vision).to_dict()  # fills defaults, validates
    return EventChatConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        mm_visual_tower=mm_visual_tower,
        mm_hidden_size=vision["hidden_size"],
        event_feature_adaptor=bool(feature_adaptor),
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        vision_config=vision,
        **llama_kwargs,
    )


def spatio_temporal_tokens(features: torch.Tensor) -> torch.Tensor:
    """EventGPT's aggregation. features [B, t, P, D] -> [B, t + P, D]: t temporal tokens (each frame's mean
    over its P positions) followed by P spatial tokens (each position's mean over the t frames)."""
    return torch.cat([features.mean(dim=2), features.mean(dim=1)], dim=1)


class VisualTower(nn.Module):
    """Wrapper that keeps the official weight names `model.visual_tower.visual_tower.*`."""

    def __init__(self, vision_config: CLIPVisionConfig):
        super().__init__()
        self.visual_tower = CLIPVisionModel(vision_config)


class EventChatLlamaModel(LlamaModel):
    """LlamaModel + the event encoder modules (`model.visual_tower`, `model.visual_projector`,
    `model.feature_adaptor`). Its own forward is the plain text LlamaModel forward."""

    config_class = EventChatConfig

    def __init__(self, config: EventChatConfig):
        super().__init__(config)
        if not config.vision_config:
            raise ValueError("EventChatConfig.vision_config is not set (use eventgpt_config or load_eventgpt)")
        vision = CLIPVisionConfig(**config.vision_config)
        mm_hidden = config.mm_hidden_size or vision.hidden_size
        if mm_hidden != vision.hidden_size:
            raise ValueError(f"mm_hidden_size {mm_hidden} != CLIP hidden_size {vision.hidden_size}")
        self.visual_tower = VisualTower(vision)
        self.visual_tower.requires_grad_(False)  # frozen, as in EventGPT; requires_grad_(True) to train it
        d = config.hidden_size
        self.visual_projector = nn.Sequential(nn.Linear(mm_hidden, d), nn.GELU(), nn.Linear(d, d))
        if config.event_feature_adaptor not in (None, False):
            self.feature_adaptor = nn.Linear(d, d)
        else:
            self.feature_adaptor = None
        self.post_init()


class EventChatModel(LlamaForCausalLM):
    """EventGPT as a LlamaForCausalLM. Build a fresh one with `EventChatModel(eventgpt_config(...))`."""

    config_class = EventChatConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]  # stored by old Llama checkpoints

    def __init__(self, config: EventChatConfig):
        super(LlamaForCausalLM, self).__init__(config)  # skip LlamaForCausalLM.__init__: it builds a LlamaModel
        self.model = EventChatLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ---- the event encoder ----------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> CLIPVisionModel:
        return self.model.visual_tower.visual_tower

    @property
    def event_patches(self) -> int:
        """P: CLIP positions per image, CLS included ((336 / 14)^2 + 1 = 577 for ViT-L/14-336)."""
        vc = self.vision_tower.config
        return (vc.image_size // vc.patch_size) ** 2 + 1

    def num_event_tokens(self, frames: int) -> int:
        """Visual tokens (= placeholder ids in the prompt) for `frames` event images: P + t."""
        return self.event_patches + frames

    def encode_events(self, event_pixel_values: torch.Tensor) -> torch.Tensor:
        """event_pixel_values [B, t, 3, S, S] -> aggregated event tokens [B, t + P, D]."""
        b, t = event_pixel_values.shape[:2]
        tower = self.vision_tower
        tower_dtype = tower.embeddings.patch_embedding.weight.dtype
        train_tower = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(train_tower):
            feats = tower(pixel_values=event_pixel_values.flatten(0, 1).to(tower_dtype)).last_hidden_state
        proj = self.model.visual_projector
        feats = proj(feats.to(proj[0].weight.dtype))  # [B * t, P, D]
        if self.model.feature_adaptor is not None:
            feats = self.model.feature_adaptor(feats)  # once per frame (the reference's cached path did it twice)
        return spatio_temporal_tokens(feats.unflatten(0, (b, t)))

    def embed_inputs(self, input_ids: torch.Tensor, event_pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the event tokens spliced in at the placeholder ids (-200)."""
        slots = input_ids == PLACEHOLDER_ID
        embeds = self.model.embed_tokens(input_ids.masked_fill(slots, 0))  # negative ids would index out of range
        if event_pixel_values is None:
            if slots.any():
                raise ValueError("input_ids hold event placeholders (-200) but no event_pixel_values were given")
            return embeds
        feats = self.encode_events(event_pixel_values)  # [B, n, D]
        counts = slots.sum(dim=1)
        if feats.shape[0] != input_ids.shape[0] or bool((counts != feats.shape[1]).any()):
            raise ValueError(
                f"each prompt needs {feats.shape[1]} event placeholders ({self.event_patches} positions + "
                f"{event_pixel_values.shape[1]} frames) for {feats.shape[0]} images; found {counts.tolist()}"
            )
        # masked_scatter fills the slots row by row, in order: row r's slots get feats[r]
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        event_pixel_values: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ):
        """input_ids long [B, T] (prefill: with t + P placeholders -200 per row and event_pixel_values
        [B, t, 3, S, S]; decode/verify: plain ids with past_key_values). labels [B, T]: shifted CE, -100 and
        negative ids ignored. Returns the CausalLMOutputWithPast of LlamaForCausalLM."""
        cache = kwargs.pop("cache", None)  # transformers >= 5.24 (and its generate) use the new name
        if past_key_values is None:
            past_key_values = cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, event_pixel_values)
        elif event_pixel_values is not None:
            raise ValueError("pass event_pixel_values with input_ids, not with inputs_embeds")
        if labels is not None:
            labels = labels.masked_fill(labels < 0, -100)  # placeholders are never targets
        return super().forward(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **{_CACHE_KW: past_key_values},
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, event_pixel_values=None, **kwargs):
        """HF `generate` support: the event images go in with the prompt only (the first step)."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            inputs["event_pixel_values"] = event_pixel_values
        return inputs


# ---- the backend ------------------------------------------------------------------------------------------------
@dataclass
class EventGPT(VLM):
    """EventGPT behind the VLM interface. `event_frames`: event images per sample (1: the `event_image_1f`
    image, EventGPT's default here; 5: the five images of equal event count)."""

    kind: str = "eventgpt"
    image_processor: Any = None  # CLIPImageProcessor of the tower
    event_frames: int = 1

    def prompt_text(self, question: str) -> str:
        # EventGPT's 'eventgpt_v1' conversation (Vicuna v1): "{system} USER: {message} ASSISTANT:"
        return f"{SYSTEM} USER: {EV_START}{EVENT_TOKEN}{EV_END}\n{question} ASSISTANT:"

    def visual_inputs(self, sample) -> dict[str, torch.Tensor]:
        """{"event_pixel_values": float [1, t, 3, S, S]} from the sample's t event images."""
        images = sample.event_images(self.event_frames)  # uint8 [t, H, W, 3]
        if images.size == 0 or bool((images == 255).all()):  # white canvas everywhere: no event was painted
            raise fail(sample.event_path, "event stream has no events: nothing for EventGPT to see")
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return {"event_pixel_values": torch.as_tensor(pixels).unsqueeze(0)}

    def expand_prompt(self, text: str, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Like EventGPT's tokenizer_event_token: BOS, the text before `<event>`, the placeholders, the text
        after (each part tokenized alone, without special tokens). long [T]."""
        if text.count(EVENT_TOKEN) != 1:
            raise ValueError(f"prompt must hold exactly one {EVENT_TOKEN}, found {text.count(EVENT_TOKEN)}")
        before, after = text.split(EVENT_TOKEN)
        frames = visual["event_pixel_values"].shape[1]
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        ids = (
            bos
            + self.tokenizer(before, add_special_tokens=False)["input_ids"]
            + [PLACEHOLDER_ID] * self.model.num_event_tokens(frames)
            + self.tokenizer(after, add_special_tokens=False)["input_ids"]
        )
        return torch.tensor(ids, dtype=torch.long)

    def save(self, out_dir) -> Path:
        return save_eventgpt(self.model, self.tokenizer, self.image_processor, out_dir)


# ---- loading ------------------------------------------------------------------------------------------------------
def _tower_dir(path: Path, cfg: dict, override: str | None = None) -> Path:
    """The CLIP tower directory: `override`, else config key mm_visual_tower, absolute or relative to the
    checkpoint directory; a hub id ("openai/clip-vit-large-patch14-336") may also sit there under its last part,
    or be in the local Hugging Face cache."""
    where = path / "config.json"
    name = override or cfg.get("mm_visual_tower")
    if not isinstance(name, str) or not name:
        raise fail(where, "no mm_visual_tower: EventGPT needs the path of its CLIP tower directory")
    raw = Path(name).expanduser()
    candidates = [raw] if raw.is_absolute() else [path / raw, path / raw.name]
    if HUB_ID.fullmatch(name) and not any((c / "config.json").is_file() for c in candidates):
        try:
            candidates.append(resolve_checkpoint(name))
        except SpecalignError:
            candidates.append(Path(f"{name} (not in the local Hugging Face cache)"))
    for c in candidates:
        if (c / "config.json").is_file():
            if not (c / "preprocessor_config.json").is_file():
                raise fail(c, "CLIP tower directory has no preprocessor_config.json (the image processor)")
            return c
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise fail(where, f"mm_visual_tower {name!r}: no CLIP directory with config.json at {tried}")


def _checkpoint_keys(files: list[Path]) -> set[str]:
    """Tensor names of the weight shards without reading the tensors: the index's weight_map when there is one,
    else the safetensors header (a lone .bin file has to be unpickled, memory-mapped where possible)."""
    index = files[0].parent / ("model.safetensors.index.json" if files[0].suffix == ".safetensors" else
                               "pytorch_model.bin.index.json")  # fmt: skip
    if index.is_file() and files[0].name not in ("model.safetensors", "pytorch_model.bin"):  # shards of the index
        return set(read_json(index)["weight_map"])
    keys: set[str] = set()
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as st:
                    keys.update(st.keys())
            else:
                try:
                    obj = torch.load(f, map_location="meta", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                    obj = torch.load(f, map_location="meta", weights_only=True)
                keys.update(obj.get("model_state_dict", obj).keys() if isinstance(obj, dict) else obj.keys())
        except Exception as e:
            raise fail(f, f"cannot read weights ({one_line(e)})") from None
    return keys


def _image_processor_class():
    """The PIL/numpy CLIP preprocessing, as EventGPT's transformers 4.x ran it, on every machine (transformers 5's
    default backend needs torchvision and resizes slightly differently)."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _load_image_processor(tower: Path):
    try:
        return _image_processor_class().from_pretrained(str(tower), local_files_only=True)
    except Exception as e:
        raise fail(tower / "preprocessor_config.json", f"cannot load the image processor: {one_line(e)}") from None


def check_eventgpt(path: Path, visual_tower: str | None = None) -> Checked:
    """Every check of an EventGPT checkpoint directory that needs no weights: config, weight files (their names
    only), the CLIP tower directory (config.json key mm_visual_tower, or `visual_tower`) and its weights when the
    checkpoint lacks them, tokenizer, image processor. One-line SpecalignError on the first problem."""
    cfg = read_config(path)
    if cfg.get("model_type") != MODEL_TYPE:
        raise fail(path / "config.json", f"model_type is {cfg.get('model_type')!r}, not {MODEL_TYPE!r} (EventGPT)")
    files = weight_files(path)
    tower = _tower_dir(path, cfg, visual_tower)
    try:
        vision = CLIPVisionConfig.from_pretrained(str(tower), local_files_only=True)
    except Exception as e:
        raise fail(tower / "config.json", f"not a CLIP config ({one_line(e)})") from None
    keys = _checkpoint_keys(files)
    tower_inside = any(k.startswith(TOWER_PREFIX) for k in keys)
    if not tower_inside:
        weight_files(tower)  # the tower's weights must then be in its own directory
    cfg = dict(cfg, vision_config=vision.to_dict(), mm_hidden_size=cfg.get("mm_hidden_size") or vision.hidden_size)
    if cfg.get("event_feature_adaptor") in (None, False) and "model.feature_adaptor.weight" in keys:
        cfg["event_feature_adaptor"] = True  # the weights decide: the official code builds it whenever the key exists
    try:
        config = EventChatConfig.from_dict(cfg)
    except Exception as e:
        raise fail(path / "config.json", f"invalid config ({one_line(e)})") from None
    if config.mm_hidden_size != vision.hidden_size:
        raise fail(path / "config.json", f"mm_hidden_size {config.mm_hidden_size} != CLIP width {vision.hidden_size}")
    # config= keeps AutoTokenizer from parsing config.json (whose model_type it does not know)
    tokenizer = load_tokenizer(path, config)
    check_tokenizer_fits(tokenizer, config.vocab_size, path)
    image_processor = _load_image_processor(tower)
    return Checked(path, config, files, tokenizer, image_processor, int(config.vocab_size),
                   {"tower": tower, "tower_inside": tower_inside})  # fmt: skip


def load_eventgpt(path, device="cpu", dtype=None, quantization: int | None = None, name: str | None = None,
                  event_frames: int = 1, visual_tower: str | None = None, offline: bool = True,
                  cache_dir=None) -> EventGPT:  # fmt: skip
    """Load an EventGPT checkpoint directory (official layout: config.json with model_type EventChat_llama,
    safetensors or .bin shards, the tokenizer, and the CLIP tower directory named by mm_visual_tower, or by
    `visual_tower`), or a hub id in the local cache. Every problem with the files is a one-line SpecalignError
    raised before the weights are read."""
    c = check_eventgpt(resolve_checkpoint(path, offline, cache_dir), visual_tower)
    tower_inside = c.extra["tower_inside"]
    model = load_hf_model(
        EventChatModel, c.path, c.config, c.files, device, dtype, quantization,
        full_precision=("visual_tower", "visual_projector", "feature_adaptor", "lm_head"),
        may_miss=lambda k: k.startswith(TOWER_PREFIX) and not tower_inside,  # then loaded from the tower directory
    )  # fmt: skip
    if not tower_inside:
        _load_tower_weights(model, c.extra["tower"], resolve_dtype(dtype, torch.device(device)))
    model.vision_tower.requires_grad_(False)  # from_pretrained makes fresh Parameters: freeze again
    return EventGPT(model=model, tokenizer=c.tokenizer, name=name or str(path), image_processor=c.image_processor,
                    event_frames=event_frames)  # fmt: skip


def _load_tower_weights(model: EventChatModel, tower: Path, dtype: torch.dtype) -> None:
    """Copy the CLIP weights of the tower directory (a CLIPModel or CLIPVisionModel checkpoint) into the model."""
    try:
        with quiet_transformers():
            clip, info = CLIPVisionModel.from_pretrained(str(tower), dtype=dtype, local_files_only=True,
                                                         output_loading_info=True)  # fmt: skip
    except Exception as e:
        raise fail(tower, f"cannot load the CLIP tower ({one_line(e)})") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise fail(tower, f"CLIP weights incomplete: {len(missing)} missing, e.g. {missing[0]}")
    try:
        model.vision_tower.load_state_dict(clip.state_dict())
    except RuntimeError as e:
        raise fail(tower, f"CLIP tower does not fit the model ({one_line(e)})") from None


# ---- fresh models and saving ----------------------------------------------------------------------------------------
def clip_image_processor(image_size: int):
    """CLIP preprocessing (resize shortest side, center crop, CLIP mean/std) at image_size."""
    return _image_processor_class()(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_eventgpt(tokenizer_file, sizes, train_visual_tower: bool = True, seed: int | None = None) -> EventGPT:
    """A freshly initialised EventGPT around a `tokenizers` tokenizer file (e.g. a minidsec world's
    tokenizer.json with <s> </s> <unk> <pad>). `sizes` has image_size, patch_size, vision_hidden,
    vision_layers, vision_heads, lm_hidden, lm_layers, lm_heads, lm_intermediate (models.registry.MiniSizes).
    The tower is trainable by default: a from-scratch tower has nothing to freeze."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.vision_hidden,
        intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
    )
    config = eventgpt_config(
        len(tokenizer),
        vision,
        hidden_size=sizes.lm_hidden,
        intermediate_size=sizes.lm_intermediate,
        num_hidden_layers=sizes.lm_layers,
        num_attention_heads=sizes.lm_heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = EventChatModel(config)
    model.vision_tower.requires_grad_(train_visual_tower)
    return EventGPT(model=model, tokenizer=tokenizer, name="eventgpt (new)",
                    image_processor=clip_image_processor(sizes.image_size))  # fmt: skip


def official_state_dict(model: EventChatModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the official checkpoint names (the CLIP tower under `...vision_model.`, as
    transformers 4.x, which EventGPT used, names CLIPVisionModel weights)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(TOWER_PREFIX) and not k.startswith(TOWER_PREFIX + "vision_model."):
            k = TOWER_PREFIX + "vision_model." + k[len(TOWER_PREFIX) :]
        out[k] = v
    return out


def save_eventgpt(model: EventChatModel, tokenizer, image_processor, out_dir, max_shard_size: str = "2GB") -> Path:
    """Write a checkpoint directory in the official layout: config.json (model_type EventChat_llama,
    mm_visual_tower = "visual_tower"), safetensors shards (+ index) under the official names, the tokenizer,
    and `visual_tower/` (CLIP config, weights, preprocessor_config.json). load_eventgpt reads it back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower = out / TOWER_DIR
    model.vision_tower.save_pretrained(str(tower))
    image_processor.save_pretrained(str(tower))
    model.config.mm_visual_tower = TOWER_DIR
    model.config.mm_hidden_size = model.vision_tower.config.hidden_size
    model.config.vision_config = model.vision_tower.config.to_dict()
    model.config.event_feature_adaptor = model.model.feature_adaptor is not None
    model.save_pretrained(str(out), state_dict=official_state_dict(model), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out))
    return out
