"""Draft and target VLMs behind one interface (`models.base.VLM`).

load_model("mini-target")                        # a bundled mini-world model, by name
load_model("/ckpt/Video-LLaVA-7B-hf")            # a checkpoint directory: the backend comes from config.json
load_model("LanguageBind/Video-LLaVA-7B-hf")     # a hub id already in the local Hugging Face cache
inspect_model("/ckpt/EventGPT-7B")               # every check of load_model that needs no weights, in a second
"""

from __future__ import annotations

import importlib
from pathlib import Path

from specalign.errors import SpecalignError, fail
from specalign.models.base import VLM, Batch, DecodeState, Prompt, Sampling, Step

BACKENDS = {"video_llava": "video-llava", "EventChat_llama": "eventgpt", "llava": "llava"}  # model_type -> backend
# backend -> its module, which has check_<module>(path) and load_<module>(path, ...)
_MODULES = {"video-llava": "video_llava", "eventgpt": "eventgpt", "llava": "llava"}


def bundled_path(name: str) -> Path | None:
    from specalign.models.registry import BUNDLED

    return BUNDLED.get(name)


def locate(name_or_path: str) -> Path:
    """The checkpoint directory of a bundled name, a directory, or a hub id in the local Hugging Face cache."""
    from specalign.models.loading import is_hub_id, resolve_checkpoint

    path = bundled_path(name_or_path)
    if path is not None:
        if not (path / "config.json").is_file():
            raise fail(path, f"the bundled model {name_or_path!r} is missing (re-clone the repository, or train it "
                             "with scripts/train_mini_assets.sh)")  # fmt: skip
        return path
    if is_hub_id(str(name_or_path)):
        return resolve_checkpoint(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        from specalign.models.registry import BUNDLED

        raise SpecalignError(f"{name_or_path}: no such model: not a bundled name ({', '.join(BUNDLED)}), not a "
                             "directory, and not a hub id (owner/name) in the local Hugging Face cache")  # fmt: skip
    return path


def weights_stamp(name_or_path: str) -> dict | None:
    """{weight file: [bytes, mtime ns]} of a bundled model, checkpoint directory or cached hub id (None when it
    cannot be found): what tells a resumed job that the model's weights changed since it started (retrained,
    re-downloaded)."""
    from specalign.models.loading import weight_files

    try:
        path = locate(name_or_path)
        files = weight_files(path) if path.is_dir() else []
    except SpecalignError:
        return None
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files} or None


def detect_backend(path: Path) -> str:
    from specalign.models.loading import read_config

    model_type = read_config(path).get("model_type")
    if model_type not in BACKENDS:
        raise fail(path / "config.json", f"unknown model_type {model_type!r}: expected one of {', '.join(BACKENDS)}")
    return BACKENDS[model_type]


def _backend(path: Path, backend: str | None):
    """(backend name, its module) for a checkpoint directory; `backend` None: from its config.json."""
    backend = backend or detect_backend(path)
    if backend not in _MODULES:
        raise SpecalignError(f"--backend: unknown backend {backend!r}: choose {', '.join(_MODULES)}")
    return backend, importlib.import_module(f"specalign.models.{_MODULES[backend]}")


def inspect_model(name_or_path: str, backend: str | None = None) -> dict:
    """Every check load_model makes before it reads weights (config.json, backend, weight files present, tokenizer
    loadable and fitting the embeddings, image processor, EventGPT's CLIP tower), without loading the model.
    Returns {"path": the resolved directory, "backend", "vocab_size": text embeddings, "tokenizer_size",
    "tokenizer"}; a bad
    model is a one-line SpecalignError."""
    path = locate(name_or_path)
    backend, module = _backend(path, backend)
    checked = getattr(module, f"check_{_MODULES[backend]}")(path)
    return {"path": str(path.resolve()), "backend": backend, "vocab_size": checked.vocab_size,
            "tokenizer_size": len(checked.tokenizer), "tokenizer": checked.tokenizer}  # fmt: skip


def check_model(name_or_path: str, flag: str) -> dict:
    """`inspect_model` for a command-line option: its errors name the option (`--target: ...`)."""
    try:
        return inspect_model(name_or_path)
    except SpecalignError as e:
        raise SpecalignError(f"{flag}: {e}") from None


def load_model(name_or_path: str, backend: str | None = None, device: str = "cpu", dtype=None,
               quantization: int | None = None) -> VLM:  # fmt: skip
    """Load a draft or target VLM by bundled name, checkpoint directory, or hub id in the local cache. backend:
    video-llava | eventgpt | llava (default: from config.json's model_type)."""
    path = locate(name_or_path)
    backend, module = _backend(path, backend)
    load = getattr(module, f"load_{_MODULES[backend]}")
    return load(path, device=device, dtype=dtype, quantization=quantization, name=name_or_path)


__all__ = ["VLM", "Batch", "DecodeState", "Prompt", "Sampling", "Step", "load_model", "inspect_model", "detect_backend"]
