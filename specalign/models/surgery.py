"""Model surgery: change a trained model's shape without changing what it computes."""

from __future__ import annotations

import copy

import torch

from specalign.errors import SpecalignError


def deepen_target(vlm, vision_layers: int = 0, lm_layers: int = 0) -> None:
    """Make a Video-LLaVA model deeper, in place, without changing what it computes: training then continues
    with more capacity instead of starting over.

    Each new layer is a copy of its neighbour with the output projections of its attention and MLP zeroed
    (out_proj/fc2 in CLIP, o_proj/down_proj in Llama), so its residual branches add nothing until trained.
    New Llama layers go after the last; new vision layers before the tower's last one, because Video-LLaVA reads
    the second-to-last layer's output (vision_feature_layer -2) and so never uses the last."""

    model, cfg = vlm.model, vlm.model.config
    if vision_layers < 0 or lm_layers < 0:
        raise SpecalignError(f"deepen: layers can only be added, not {vision_layers} vision / {lm_layers} LM")
    if vision_layers:
        if cfg.vision_feature_layer not in (-1, -2):
            raise SpecalignError(f"deepen: vision_feature_layer {cfg.vision_feature_layer} (only -1 or -2 handled)")
        for tower in (model.model.video_tower, model.model.image_tower):  # one vision config builds both towers
            layers = getattr(tower, "vision_model", tower).encoder.layers  # transformers 5 flattened it
            at = len(layers) + 1 + cfg.vision_feature_layer  # after the layer whose output is read
            for _ in range(vision_layers):
                new = copy.deepcopy(layers[max(at - 1, 0)])
                for linear in (new.self_attn.out_proj, new.mlp.fc2):
                    torch.nn.init.zeros_(linear.weight)
                    torch.nn.init.zeros_(linear.bias)
                layers.insert(at, new)
        cfg.vision_config.num_hidden_layers += vision_layers
    if lm_layers:
        layers = model.model.language_model.layers
        for _ in range(lm_layers):
            new = copy.deepcopy(layers[-1])
            for linear in (new.self_attn.o_proj, new.mlp.down_proj):
                torch.nn.init.zeros_(linear.weight)
                if linear.bias is not None:
                    torch.nn.init.zeros_(linear.bias)
            layers.append(new)
        for i, layer in enumerate(layers):  # the KV cache finds a layer's slot by its index
            layer.self_attn.layer_idx = i
        cfg.text_config.num_hidden_layers += lm_layers
        if getattr(cfg.text_config, "layer_types", None):  # one entry per layer where the config has them
            cfg.text_config.layer_types = [*cfg.text_config.layer_types, *[cfg.text_config.layer_types[-1]] * lm_layers]
