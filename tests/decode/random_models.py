"""Random tiny models for the decode tests, in float64."""

import torch

from specalign.models.registry import MiniSizes, new_model

TINY = MiniSizes(image_size=28, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2, lm_hidden=64,
                 lm_layers=2, lm_heads=4, lm_intermediate=128)  # fmt: skip


def random_vlm(role: str, world, seed: int):
    """A random tiny target (Video-LLaVA) or draft (EventGPT) on the world's tokenizer, in float64 so that
    near-tied logits cannot flip between a one-token and a block forward, with sharpened logits so that random
    models still end answers now and then."""
    vlm = new_model(role, world / "tokenizer.json", TINY, seed=seed)
    vlm.model.to(torch.float64).eval()
    with torch.no_grad():
        vlm.model.lm_head.weight.mul_(30)
    return vlm
