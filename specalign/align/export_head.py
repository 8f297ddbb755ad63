"""`specalign export-head`: a trained eagle head in the public EAGLE-1 checkpoint layout, for vLLM and SGLang.

The layout is EAGLE-1's for a Llama target, as vLLM's `EagleLlamaForCausalLM` and SGLang's `LlamaForCausalLMEagle`
load it:
- `config.json`: the head as a one-layer Llama (model_type llama, num_hidden_layers 1, the target's vocabulary,
  "bias": false, no tied embeddings), with `architectures` ["LlamaForCausalLM"] for vLLM (its `--speculative-config
  '{"method": "eagle", ...}'` renames it) or ["LlamaForCausalLMEagle"] for SGLang (read as is);
- `model.safetensors`: `fc.weight` [D, 2D] over [embedding ; feature], `layers.0.self_attn.{q,k,v,o}_proj.weight`,
  `layers.0.mlp.{gate,up,down}_proj.weight`, `layers.0.post_attention_layernorm.weight`; for SGLang also
  `fc.bias`, zeros (its fc always has a bias, and one left out keeps its random start). No embeddings and no LM
  head: both engines use the target's, as our heads do;
- `specalign_head.json`: our own config (the target's identity), ignored by the engines, so `import_head` gives
  back the same head.

Only an eagle head trained with `train-head --layout eagle-1` has this math (no norm before or after its layer, fc
without bias, the embedding first); any other head is refused, naming what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from specalign.align.heads import CONFIG_NAME, WEIGHTS_NAME, DraftHead, HeadConfig, read_head_config
from specalign.errors import SpecalignError, fail, one_line
from specalign.fsutil import atomic_path, write_json
from specalign.options import option
from specalign.runs import OVERWRITE_HELP, clear_folder, exclusive

ENGINES = {"vllm": ["LlamaForCausalLM"], "sglang": ["LlamaForCausalLMEagle"]}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OURS = "specalign_head.json"


@dataclass
class ExportConfig:
    head: str = option(help="an eagle head trained with --layout eagle-1: its best_model/ folder, a task folder or a "
                       "folder of task folders")  # fmt: skip
    out: str = option(help="the checkpoint folder to write")
    engine: str = option("vllm", choices=tuple(ENGINES), help="the serving engine whose names config.json uses")
    dtype: str | None = option(None, choices=tuple(DTYPES), help="weights' precision (default: the head's own; "
                               "the public EAGLE heads are fp16)")  # fmt: skip
    overwrite: bool = option(False, help=OVERWRITE_HELP)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise SpecalignError(f"--engine: unknown engine {self.engine!r}: choose {' or '.join(ENGINES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SpecalignError(f"--dtype: unknown precision {self.dtype!r}: choose {', '.join(DTYPES)}")


def eagle_config(hc: HeadConfig, engine: str, dtype: torch.dtype) -> dict:
    """config.json of the EAGLE-1 layout: the head's one Llama layer, named for `engine`."""
    cfg = hc.llama_config().to_dict()
    for key in ("_attn_implementation", "_attn_implementation_internal", "transformers_version", "dtype"):
        cfg.pop(key, None)
    rope = cfg.pop("rope_parameters", None) or {}
    return {**cfg, "architectures": ENGINES[engine], "model_type": "llama", "num_hidden_layers": 1,
            "rope_theta": float(rope.get("rope_theta", hc.rope_theta)), "hidden_act": "silu", "bias": False,
            "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


def export_head(cfg: ExportConfig) -> dict:
    """Write `cfg.out` in the EAGLE-1 layout; returns {out, engine, dtype, tensors, parameters}."""
    from safetensors.torch import load_file, save_file

    from specalign.models.registry import BUNDLED_HEADS
    from specalign.runs import resolve_best_model

    name = BUNDLED_HEADS.get(cfg.head, cfg.head)
    path = resolve_best_model(name, lambda p: (p / CONFIG_NAME).is_file(), "draft head")
    hc = read_head_config(path)
    if hc.kind != "eagle" or hc.layout != "eagle-1":
        what = hc.kind if hc.kind != "eagle" else ("fused " if hc.fused else "") + f"{hc.layout} layout"
        raise fail(path, f"a {what} head: EAGLE-1's layout holds a plain eagle head with no norm around its "
                         "layer and an fc without bias; train one with `train-head --layout eagle-1`")  # fmt: skip
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:
        raise fail(path / WEIGHTS_NAME, f"weights unreadable ({one_line(e)})") from None
    expected = set(DraftHead(hc).state_dict())
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[0]
        raise fail(path / WEIGHTS_NAME, f"tensor {odd} does not belong to an eagle-1 head")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else next(iter(state.values())).dtype
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    if cfg.engine == "sglang":
        state["fc.bias"] = torch.zeros(hc.hidden_size, dtype=dtype)
    with exclusive(cfg.out) as out:
        if any(p.name != ".lock" for p in out.iterdir()):
            if not cfg.overwrite:
                raise fail(out, "is not empty; use an empty or new --out (or --overwrite to clear it)")
            clear_folder(out)
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json(out / OURS, hc.to_json())
        write_json(out / CONFIG_NAME, eagle_config(hc, cfg.engine, dtype))  # last: a folder with it is complete
    return {"out": str(out), "engine": cfg.engine, "dtype": str(dtype).removeprefix("torch."), "tensors": len(state),
            "parameters": sum(v.numel() for v in state.values())}  # fmt: skip


def import_head(path: str | Path) -> DraftHead:
    """An exported folder back as our head (on the CPU, in the dtype written): the same tensors, bit for bit."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_NAME, OURS, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise fail(path, f"not an exported head: {name} is missing")
    try:
        raw = json.loads((path / OURS).read_text())
        hc = HeadConfig(**{k: v for k, v in raw.items() if k not in ("format", "format_version")})
        state = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:
        raise fail(path, f"unreadable exported head ({one_line(e)})") from None
    bias = state.pop("fc.bias", None)
    if bias is not None and bool(bias.any()):
        raise fail(path / WEIGHTS_NAME, "fc.bias is not zero: not a head this command wrote")
    head = DraftHead(hc).to(next(iter(state.values())).dtype)
    head.load_state_dict(state, strict=True)
    return head
