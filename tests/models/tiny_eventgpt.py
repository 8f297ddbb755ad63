"""A tiny random EventGPT checkpoint in the official layout, written WITHOUT our EventChatModel: the LM is a
plain transformers LlamaForCausalLM, the tower a CLIPVisionModel, the projector/adaptor bare nn.Linear, so the
tests load what the official code would have saved rather than what our own code writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from specalign.world.tokenizer import train_tokenizer

IMAGE_SIZE, PATCH_SIZE = 30, 6  # P = (30 / 6)^2 + 1 = 26 CLIP positions
POSITIONS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
CORPUS = [
    "In the scene, there is a red car on the left side of the road.",
    "The key elements in this scene include a road, two trees and a parked truck.",
    "There are pedestrians crossing the street near the traffic light.",
    "The road curves to the right and a building stands behind the trees.",
]
QUESTIONS = ["What are the key elements in this scene?", "Describe the road layout."]


def tiny_tokenizer(patch_token: bool = True, llama_vocab=None):
    """A small BPE tokenizer (the mini world's recipe) wrapped as a transformers fast tokenizer. llama_vocab: a
    minidsec world's tokenizer.json, to use EventGPT-7B's layout instead (Llama's 32,000 tokens, from
    `tiny_video_llava.llama_tokenizer`; <unk> doubles as padding, as in Vicuna)."""
    from transformers import PreTrainedTokenizerFast

    if llama_vocab is not None:
        from tiny_video_llava import llama_tokenizer

        tok = llama_tokenizer(llama_vocab)
        tok.pad_token = "<unk>"
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(CORPUS, QUESTIONS, vocab_size=160),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
        )
    if patch_token:  # EventGPT adds <ev_patch> when mm_use_im_patch_token (32000 -> 32001 in the real model)
        tok.add_tokens(["<ev_patch>"], special_tokens=True)
    return tok


def tiny_configs(vocab_size: int, adaptor: bool = True):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return vision, llama


def write_tiny_eventgpt(
    out_dir,
    vocab_size: int | None = None,
    *,
    fmt: str = "safetensors",  # "safetensors" (sharded, with index) | "bin" (one torch.save'd state dict)
    tower_inside: bool = True,  # tower weights also in the checkpoint (as official save_pretrained does)
    tower_path: str | None = "clip-tiny",  # mm_visual_tower; relative to out_dir, or absolute
    adaptor: bool = True,
    patch_token: bool = True,
    model_type: str = "EventChat_llama",
    seed: int = 0,
    llama_vocab=None,  # a minidsec world's tokenizer.json: EventGPT-7B's vocabulary layout (see tiny_tokenizer)
    prefer_patch_token: bool = False,
) -> Path:
    """Write the checkpoint directory and return it. vocab_size None: the tokenizer's size + 3 (padding; with
    llama_vocab: the tokenizer's size, 32,000 or 32,001 with <ev_patch>, as in EventGPT-7B).
    prefer_patch_token: the LM head's <ev_patch> row points along the LM's mean last hidden state, so the draft says
    <ev_patch> at most positions (a draft whose argmax is an id the target does not share)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from specalign.models.eventgpt import clip_image_processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(patch_token, llama_vocab)
    if vocab_size is None:
        vocab_size = len(tok) + (3 if llama_vocab is None else 0)
    vision, llama_cfg = tiny_configs(vocab_size, adaptor)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(llama_cfg)
    clip = CLIPVisionModel(vision)
    d = llama_cfg.hidden_size
    projector = nn.Sequential(nn.Linear(vision.hidden_size, d), nn.GELU(), nn.Linear(d, d))
    feature_adaptor = nn.Linear(d, d)
    with torch.no_grad():  # larger projector weights so the event tokens move the logits visibly
        for p in [*projector.parameters(), *feature_adaptor.parameters()]:
            p.normal_(0, 0.3)

    if prefer_patch_token:  # the <ev_patch> row along the LM's mean last hidden state: a logit of about 2 there
        with torch.no_grad():
            ids = torch.tensor([tok("In the scene, there is a red car on the left side of the road.")["input_ids"]])
            mean = lm(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
            lm.lm_head.weight[tok.convert_tokens_to_ids("<ev_patch>")] = 2 * mean / mean.dot(mean)
    state = dict(lm.state_dict())
    state.update({f"model.visual_tower.visual_tower.vision_model.{k}": v for k, v in clip.state_dict().items()})
    state.update({f"model.visual_projector.{k}": v for k, v in projector.state_dict().items()})
    if adaptor:
        state.update({f"model.feature_adaptor.{k}": v for k, v in feature_adaptor.state_dict().items()})
    if not tower_inside:
        state = {k: v for k, v in state.items() if not k.startswith("model.visual_tower.")}
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}

    if tower_path is not None:  # the CLIP directory, as downloaded: config, weights, image processor
        tower_dir = Path(tower_path) if Path(tower_path).is_absolute() else out / tower_path
        clip.save_pretrained(str(tower_dir))
        clip_image_processor(IMAGE_SIZE).save_pretrained(str(tower_dir))

    config = {
        **llama_cfg.to_dict(),
        "model_type": model_type,
        "architectures": ["EventChatModel"],
        "mm_visual_tower": tower_path,
        "mm_use_im_patch_token": patch_token,
        "mm_use_im_start_end": False,
        "tune_mm_mlp_adapter": False,  # extra keys of the real config must not matter
        "tokenizer_model_max_length": 2048,
    }
    if adaptor:
        config["event_feature_adaptor"] = True
    config.pop("transformers_version", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))

    if fmt == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:  # two shards + index, like a real 7B directory
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: state[k] for k in ks}, str(out / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok.save_pretrained(str(out))
    return out
