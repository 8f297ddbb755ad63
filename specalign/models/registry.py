"""The bundled mini models: their names and folders, their sizes, and an untrained model of either role.

mini-target is a tiny Video-LLaVA (8 RGB frames + question), mini-draft a tiny EventGPT (one event image +
question); both read the minidsec world's shared tokenizer. `models/train_mini.py` trains them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from specalign.errors import SpecalignError

# SPECALIGN_ASSETS points at another assets folder (the GPU machine trains into /tmp)
ASSETS = Path(os.environ.get("SPECALIGN_ASSETS") or Path(__file__).resolve().parents[2] / "assets")
BUNDLED = {"mini-target": ASSETS / "mini-target", "mini-draft": ASSETS / "mini-draft"}
BUNDLED_HEADS = {"mini-head": ASSETS / "mini-head"}  # an eagle draft head for mini-target (`speculate --draft-head`)
ROLES = ("target", "draft")


@dataclass
class MiniSizes:
    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    lm_hidden: int = 256
    lm_layers: int = 4
    lm_heads: int = 4
    lm_intermediate: int = 768


SIZES = {
    "target": MiniSizes(),
    # the draft is cheaper: one event image instead of 8 frames, and a smaller LM
    "draft": MiniSizes(vision_hidden=128, vision_layers=3, lm_hidden=192, lm_layers=3, lm_intermediate=512),
}


def new_model(role: str, tokenizer_file: Path, sizes: MiniSizes, seed: int = 0):
    """A freshly initialised VLM of the role's architecture (a models.base.VLM backend object)."""
    vision = dict(image_size=sizes.image_size, patch_size=sizes.patch_size, hidden_size=sizes.vision_hidden,
                  intermediate_size=4 * sizes.vision_hidden, num_hidden_layers=sizes.vision_layers,
                  num_attention_heads=sizes.vision_heads)  # fmt: skip
    if role == "target":
        from specalign.models.video_llava import build_video_llava, video_llava_from_parts

        text = dict(hidden_size=sizes.lm_hidden, intermediate_size=sizes.lm_intermediate,
                    num_hidden_layers=sizes.lm_layers, num_attention_heads=sizes.lm_heads)  # fmt: skip
        model, processor = build_video_llava(tokenizer_file, vision=vision, text=text, seed=seed)
        vlm = video_llava_from_parts(model, processor, name="mini-target")
    elif role == "draft":
        from specalign.models.eventgpt import build_eventgpt

        vlm = build_eventgpt(tokenizer_file, sizes, seed=seed)
    else:
        raise SpecalignError(f"--role: unknown role {role!r}: choose target or draft")
    squash_frames(vlm)
    return vlm


def squash_frames(vlm) -> None:
    """Resize whole frames into the vision tower's square.

    CLIP's shortest-edge resize + centre crop cuts 12.5 % off each side of a 4:3 frame, where the parked cars and
    buildings are. The setting is saved with the checkpoint, so the model sees at inference what it trained on.
    """
    proc = vlm.image_processor
    crop = proc.crop_size  # the vision tower's input side: a dict or a SizeDict
    side = crop["height"] if isinstance(crop, dict) else crop.height
    proc.do_center_crop = False
    proc.size = {"height": side, "width": side}
