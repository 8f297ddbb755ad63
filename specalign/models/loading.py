"""The one Hugging Face loading path of every backend: no code runs while weights load, and a bad directory fails
early, on one line, before any weight is read.

    path = resolve_checkpoint("LanguageBind/Video-LLaVA-7B-hf")     # a directory, or a hub id from the local cache
    cfg = read_config(path); files = weight_files(path)              # cheap checks
    tokenizer = load_tokenizer(path); image_processor = load_image_processor(path, "CLIPImageProcessor")
    model = load_hf_model(VideoLlavaForConditionalGeneration, path, config, files, device, dtype, quantization)
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specalign.errors import SpecalignError, fail, one_line

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}  # fmt: skip


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' | None (bf16 on GPU, fp32 on CPU)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SpecalignError(f"--dtype: unknown precision {name!r}: choose bf16, fp16 or fp32")
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
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                raise fail(index, f"not a weight index: no readable weight_map ({one_line(e)})") from None
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
            raise fail(f, f"cannot read weights ({one_line(e)})") from None
    return state


@dataclass
class Checked:
    """A checkpoint directory whose files were all checked, before any weight is read (what `inspect_model`
    reports and the loaders then load)."""

    path: Path
    config: Any  # the model's transformers config
    files: list[Path]  # weight files
    tokenizer: Any
    image_processor: Any
    vocab_size: int  # text embeddings (the logit width)
    extra: dict = field(default_factory=dict)  # backend-specific findings (EventGPT: its CLIP tower)


# ---- hub ids ------------------------------------------------------------------------------------------------------
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(text: str) -> bool:
    """ "owner/name" that is not an existing path."""
    return bool(HUB_ID.fullmatch(text)) and not Path(text).expanduser().exists()


def resolve_checkpoint(path_or_hub_id, offline: bool = True, cache_dir=None) -> Path:
    """A checkpoint directory for a path or a hub id ("owner/name"). Hub ids come from the local Hugging Face cache
    when offline (the default: nothing is downloaded); a hub id that is not cached is a one-line error."""
    text = str(path_or_hub_id)
    if not is_hub_id(text):
        return Path(text).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=offline, cache_dir=cache_dir))
    except Exception as e:
        if offline:
            raise SpecalignError(
                f"{text}: not a directory, and not in the local Hugging Face cache (download it first, "
                f"e.g. `hf download {text}`, or pass a checkpoint directory)"
            ) from None
        raise SpecalignError(f"{text}: cannot download it from the hub ({one_line(e)})") from None


# ---- tokenizer, image processor --------------------------------------------------------------------------------------
def load_tokenizer(path: Path, config=None):
    """The checkpoint's tokenizer (tokenizer.json, or tokenizer.model with sentencepiece). config: the model's
    transformers config, for model types AutoTokenizer does not know (EventGPT's)."""
    from transformers import AutoTokenizer

    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise fail(path, "no tokenizer in the checkpoint directory (tokenizer.json or tokenizer.model)")
    kwargs = {} if config is None else {"config": config}
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as e:
        hint = "" if (path / "tokenizer.json").is_file() else " (a tokenizer.model alone needs `sentencepiece`)"
        raise fail(path, f"cannot load the tokenizer{hint}: {one_line(e)}") from None


def check_tokenizer_fits(tokenizer, embeddings: int, path) -> None:
    """A tokenizer with more ids than the model has embeddings produces out-of-range ids later."""
    if len(tokenizer) > embeddings:
        raise fail(path, f"tokenizer has {len(tokenizer)} tokens but the model has only {embeddings} embeddings")


def check_special_ids(config_file: Path, vocab_size: int, tokenizer, specials: dict[str, int]) -> None:
    """Each placeholder id must be inside the embeddings and be the tokenizer's id of its token."""
    for token, token_id in specials.items():
        if not 0 <= token_id < vocab_size:
            raise fail(config_file, f"text vocab_size {vocab_size} is not above the {token} id {token_id}")
        got = tokenizer.convert_tokens_to_ids(token)
        if got != token_id:
            raise fail(config_file, f"{token} is id {token_id} in the config but {got} in the tokenizer")


def image_processor_config(path: Path) -> tuple[Path, dict]:
    """(file, dict) of the image processor's settings: preprocessor_config.json, or the nested "image_processor" of
    processor_config.json (transformers 5 saves it there)."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        f = path / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise fail(f, f"not valid JSON ({e})") from None
            data = data.get(key) if key and isinstance(data, dict) else data
            if isinstance(data, dict):
                return f, data
    raise fail(path, "no image processor settings (preprocessor_config.json) in the checkpoint directory")


def load_image_processor(path: Path, default: str):
    """The PIL/numpy flavour of the checkpoint's image processor (the same pixels on every machine; transformers'
    torchvision flavours need torchvision and resize slightly differently). `default`: the class when the settings
    name none."""
    import transformers

    file, settings = image_processor_config(path)
    name = str(settings.get("image_processor_type") or default).removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name, None)
    if cls is None:
        raise fail(file, f"unknown image_processor_type {settings.get('image_processor_type')!r}")
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise fail(file, f"cannot load the image processor: {one_line(e)}") from None


# ---- weights ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_transformers():
    """transformers prints load reports, progress bars and deprecation notes; the loaders check what matters
    themselves."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def device_map(device: torch.device) -> dict | None:
    """from_pretrained's device_map for one device: None on the CPU, else the whole model on `device` (a CUDA
    device without an index: the current one)."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": str(device)}


def load_hf_model(cls, path: Path, config, files: list[Path], device, dtype, quantization: int | None = None,
                  full_precision: tuple[str, ...] = (), may_miss=lambda key: False):  # fmt: skip
    """cls.from_pretrained with our device/dtype/quantization rules; missing or misshapen weights are a one-line
    error. full_precision: modules quantization leaves alone; may_miss(key): weights that are loaded elsewhere."""
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    if quantization is not None and device.type != "cuda":
        raise SpecalignError(f"{path}: {quantization}-bit loading needs a CUDA device, not {device}")
    # mismatched shapes are reported by us below, with the tensor's name
    kwargs: dict = {"config": config, "dtype": dtype, "local_files_only": True, "output_loading_info": True,
                    "ignore_mismatched_sizes": True, "device_map": device_map(device)}  # fmt: skip
    qc = quantization_config(quantization)
    if qc is not None:
        if full_precision:
            qc.llm_int8_skip_modules = list(full_precision)
        kwargs["quantization_config"] = qc
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(path), **kwargs)
    except SpecalignError:
        raise
    except Exception as e:
        raise fail(path, f"cannot load the weights ({one_line(e)})") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not may_miss(k))
    if missing:
        raise fail(files[0].parent, f"weights do not match the config: {len(missing)} missing, e.g. {missing[0]}")
    if info.get("mismatched_keys"):
        bad = sorted(info["mismatched_keys"])[0]
        bad = bad[0] if isinstance(bad, tuple) else bad  # (name, stored shape, expected shape) in some versions
        raise fail(files[0].parent, f"weights do not match the config: wrong shape of {bad}")
    return model.eval()
