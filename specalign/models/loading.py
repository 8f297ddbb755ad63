"""Loading checkpoints safely: no code runs while weights load, and bad directories fail early and clearly."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specalign.errors import SpecalignError, fail

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}  # fmt: skip


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' | None (bf16 on GPU, fp32 on CPU)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SpecalignError(f"--dtype: unknown precision {name!r}: choose bf16, fp16 or fp32 (or --load-in-4bit/8bit)")
    return DTYPES[name]


def quantization_config(bits: int | None):
    """bitsandbytes 4-/8-bit config for from_pretrained, or None. The reference ran both 7B models in 4-bit."""
    if bits is None:
        return None
    if bits not in (4, 8):
        raise SpecalignError(f"quantization: {bits}-bit is not supported (4 or 8)")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise SpecalignError(f"{bits}-bit loading needs bitsandbytes, which is not installed") from None
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg = path / "config.json"
    if not path.is_dir():
        raise fail(path, "checkpoint directory not found")
    if not cfg.is_file():
        raise fail(path, "not a checkpoint directory: config.json is missing")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise fail(cfg, f"not valid JSON ({e})") from None


def weight_files(path: str | Path) -> list[Path]:
    """The weight shards of a checkpoint directory: safetensors preferred, else .bin; error if none/missing."""
    path = Path(path)
    for index_name, suffix in (
        ("model.safetensors.index.json", ".safetensors"),
        ("pytorch_model.bin.index.json", ".bin"),
    ):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise fail(path / missing[0], f"weight shard listed in {index_name} is missing")
            return [path / s for s in shards]
        single = path / ("model" + suffix if suffix == ".safetensors" else "pytorch_model.bin")
        if single.is_file():
            return [single]
    raise fail(path, "no weights found (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (or one weight file), loaded without executing code."""
    path = Path(path)
    files = [path] if path.is_file() else weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f)))
            else:
                obj = torch.load(f, map_location="cpu", weights_only=True)
                state.update(obj.get("model_state_dict", obj) if isinstance(obj, dict) else obj)
        except SpecalignError:
            raise
        except Exception as e:
            raise fail(f, f"cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return state


def check_tokenizer_fits(tokenizer, embeddings: int, path) -> None:
    """A tokenizer with more ids than the model has embeddings produces out-of-range ids later."""
    if len(tokenizer) > embeddings:
        raise fail(path, f"tokenizer has {len(tokenizer)} tokens but the model has only {embeddings} embeddings")
