"""Tiny RANDOM Video-LLaVA and LLaVA checkpoints, written with transformers' own classes and `save_pretrained`
(not with our build helpers), so the tests load what a user's converted 7B directory holds.

Vocabulary layout as in the real checkpoints: a BPE tokenizer (<unk>=0, <s>=1, </s>=2) whose BOS is added the
Llama way, then `<image>`, `<video>`, `<pad>` appended as special tokens (32000/32001/32002 in the real model),
then the embeddings padded to a multiple of 64 (32064 in the real model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE, PATCH_SIZE = 30, 6
PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 25
FRAME_TOKENS = PATCHES + 1  # video frames keep CLS
VIDEO_TOKENS = 8 * FRAME_TOKENS  # 208
CORPUS = [
    "The key elements in this scene include a road, two trees and a parked truck.",
    "In the scene, there is a red car on the left side of the road.",
    "There are pedestrians crossing the street near the traffic light.",
    "The road curves to the right and a building stands behind the trees.",
]
QUESTIONS = ["What are the key elements in this scene?", "Describe the road layout in detail, please."]


LLAMA_VOCAB = 32000  # Llama's tokenizer: the base vocabulary of EventGPT-7B and Video-LLaVA-7B-hf


def tiny_tokenizer(vocab: int = 120, llama_vocab=None):
    """A small BPE tokenizer (Metaspace, like Llama's) that adds <s> in front, wrapped as a fast tokenizer,
    with <image>, <video>, <pad> appended after the BPE vocabulary. llama_vocab: a minidsec world's tokenizer.json,
    to start from `llama_tokenizer` (32,000 base tokens) instead: then <image>, <video>, <pad> are 32000..32002."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if llama_vocab is not None:
        fast = llama_tokenizer(llama_vocab)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
        prompts = [f"USER: <video>\n{q} ASSISTANT:" for q in QUESTIONS]
        tok.train_from_iterator(CORPUS + prompts, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])  # fmt: skip
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    # appended in the real tokenizer's order: <image>, <video>, <pad>
    fast.add_tokens(["<image>", "<video>", "<pad>"], special_tokens=True)
    fast.pad_token = "<pad>"
    return fast


def llama_tokenizer(world_tokenizer, size: int = LLAMA_VOCAB):
    """A tokenizer in Llama's layout, built offline: exactly `size` base tokens, <unk> <s> </s> at 0, 1, 2, a
    minidsec world's BPE tokens at their own ids (so the world's text tokenizes as it does there; the world's own
    specials <pad> <image> <video> <event> become plain byte-like tokens, as ids 3.. are in Llama's), then unused
    filler tokens up to `size`. Adds <s> in front, as Llama's does."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    data = json.loads(Path(world_tokenizer).read_text())
    vocab = data["model"]["vocab"]  # token -> id
    for i, special in enumerate(("<pad>", "<image>", "<video>", "<event>"), start=3):
        vocab[f"<0x{i:02X}>"] = vocab.pop(special)
    if len(vocab) > size:
        raise ValueError(f"the world's tokenizer has {len(vocab)} tokens, more than {size}")
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), size)})
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _vision(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> dict:
    return dict(model_type="clip_vision_model", image_size=image_size, patch_size=patch_size, hidden_size=32,
                intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)  # fmt: skip


def _text(vocab_size: int, tok) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.4,  # peaked logits: greedy runs vary with frames and question
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _sizes() -> dict:
    return {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}


def _processor_config(cls: str, strategy: str) -> dict:
    """processor_config.json as transformers 4.x wrote it (what HF's processor reads for the token counts)."""
    return {"processor_class": cls, "patch_size": PATCH_SIZE, "num_additional_image_tokens": 1,
            "vision_feature_select_strategy": strategy, "image_token": "<image>"}  # fmt: skip


def _padded(n: int) -> int:
    return (n + 63) // 64 * 64


def _stronger_projector(model, seed: int) -> None:
    """Random init gives ~0.02-scale weights: the frames would barely move the logits. Larger projector weights
    make a test notice a wrong frame, a wrong order or a missing video."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _save(model, tok, image_processor, out: Path, processor_extra: dict, legacy_keys: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    image_processor.save_pretrained(str(out))
    (out / "processor_config.json").write_text(json.dumps(processor_extra, indent=2))
    if legacy_keys:  # the layout of checkpoints converted for transformers 4.x (the hub's 7B directories)
        from safetensors.torch import load_file, save_file

        state = load_file(str(out / "model.safetensors"))
        renamed = {}
        for k, v in state.items():
            if k == "lm_head.weight":
                k = "language_model.lm_head.weight"
            elif k.startswith("model.language_model."):
                k = "language_model.model." + k.removeprefix("model.language_model.")
            elif k.startswith(("model.video_tower.", "model.image_tower.", "model.vision_tower.")):
                tower, rest = k.removeprefix("model.").split(".", 1)
                k = f"{tower}.vision_model.{rest}"
            else:
                k = k.removeprefix("model.")
            renamed[k] = v
        (out / "model.safetensors").unlink()
        keys = sorted(renamed)  # two shards + index, like a real 7B directory
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: renamed[k] for k in ks}, str(out / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_video_llava(out_dir, *, vocab_size: int | None = None, model_type: str | None = None,
                           legacy_keys: bool = False, seed: int = 0, llama_vocab=None) -> Path:  # fmt: skip
    """A random VideoLlavaForConditionalGeneration directory (CLIP 30 px / patch 6 -> 26 tokens per frame,
    208 per 8-frame video; Llama hidden 32, 2 layers). vocab_size None: the tokenizer's size padded to 64.
    model_type overrides config.json's (to test the check); legacy_keys writes transformers-4.x weight names.
    llama_vocab: a minidsec world's tokenizer.json: Video-LLaVA-7B-hf's vocabulary layout (`llama_tokenizer`'s
    32,000 tokens + <image> <video> <pad> = 32,003; embeddings 32,064)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    out = Path(out_dir)
    tok = tiny_tokenizer(llama_vocab=llama_vocab)
    vocab_size = _padded(len(tok)) if vocab_size is None else vocab_size
    config = VideoLlavaConfig(
        vision_config=_vision(),
        text_config=_text(vocab_size, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_seq_length=PATCHES,
        video_seq_length=VIDEO_TOKENS,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    _stronger_projector(model, seed)
    ip = VideoLlavaImageProcessor(**_sizes())
    extra = _processor_config("VideoLlavaProcessor", "default")
    extra["video_token"] = "<video>"
    _save(model, tok, ip, out, extra, legacy_keys)
    if model_type is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg["model_type"] = model_type
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def write_tiny_llava(out_dir, *, vocab_size: int | None = None, strategy: str = "default", legacy_keys: bool = False,
                     seed: int = 0) -> Path:  # fmt: skip
    """A random LlavaForConditionalGeneration directory (CLIP 30 px / patch 6: 25 image tokens with the default
    strategy, which drops CLS; 26 with "full")."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    tok = tiny_tokenizer()
    vocab_size = _padded(len(tok)) if vocab_size is None else vocab_size
    config = LlavaConfig(
        vision_config=_vision(),
        text_config=_text(vocab_size, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=PATCHES + (strategy == "full"),
        vision_feature_select_strategy=strategy,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _stronger_projector(model, seed)
    ip = CLIPImageProcessorPil(**_sizes())
    extra = _processor_config("LlavaProcessor", strategy)
    _save(model, tok, ip, out, extra, legacy_keys)
    return out


# ---- shared by the Video-LLaVA and LLaVA tests --------------------------------------------------------------------
def build_test_world(out) -> Path:
    """A minidsec world of 2 training clips (32 x 24 px) for real Data API samples; returns its folder."""
    from specalign.world.build import WorldConfig, build_world

    cfg = WorldConfig(out=str(out), duration="500ms", train=2, test=0, width=32, height=24, clips_per_sequence=2,
                      mp4=False)  # fmt: skip
    build_world(cfg, progress=False)
    return Path(out)


def fake_hub_cache(cache_dir, repo_id: str, checkpoint: Path) -> Path:
    """Lay a checkpoint directory out as the HF hub cache holds a downloaded repo; returns the cache folder."""
    import shutil

    cache = Path(cache_dir)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return cache


def one_line_error(excinfo, where) -> str:
    """The message of a raised SpecalignError; asserts it is one line naming `where`."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(where) in msg, msg
    return msg


def edit_json(path, **changes) -> None:
    """Change top-level keys of a JSON file; a dict value updates the nested dict."""
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if isinstance(v, dict):
            data[k].update(v)
        else:
            data[k] = v
    path.write_text(json.dumps(data))
