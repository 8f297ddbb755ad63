"""Draft and target VLMs behind one interface (`models.base.VLM`).

load_model("mini-target")                 # bundled mini-world models, by name
load_model("/ckpt/Video-LLaVA-7B-hf")      # a checkpoint directory: the backend comes from config.json
load_model("LanguageBind/Video-LLaVA-7B-hf", backend="video-llava")   # a hub id in the local cache
"""

from __future__ import annotations

from pathlib import Path

from specalign.errors import SpecalignError, fail
from specalign.models.base import VLM, Batch, DecodeState, Prompt, Sampling, Step

BACKENDS = {"video_llava": "video-llava", "EventChat_llama": "eventgpt", "llava": "llava"}


def bundled_path(name: str) -> Path | None:
    from specalign.models.registry import BUNDLED

    return BUNDLED.get(name)


def weights_stamp(name_or_path: str) -> dict | None:
    """{weight file: [bytes, mtime ns]} of a bundled model or checkpoint directory (None for a hub id): what
    tells a resumed job that the model's weights changed since it started (retrained, re-downloaded)."""
    from specalign.models.loading import weight_files

    path = bundled_path(name_or_path) or Path(name_or_path)
    if not path.is_dir():
        return None
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in weight_files(path)}


def detect_backend(path: Path) -> str:
    from specalign.models.loading import read_config

    model_type = read_config(path).get("model_type")
    if model_type not in BACKENDS:
        raise fail(path / "config.json", f"unknown model_type {model_type!r}: expected one of {', '.join(BACKENDS)}")
    return BACKENDS[model_type]


def load_model(name_or_path: str, backend: str | None = None, device: str = "cpu", dtype=None,
               quantization: int | None = None) -> VLM:  # fmt: skip
    """Load a draft or target VLM by bundled name, checkpoint directory, or (with backend=) cached hub id."""
    path = bundled_path(name_or_path)
    if path is not None and not (path / "config.json").is_file():
        raise SpecalignError(f"{path}: bundled model {name_or_path!r} is missing (run `make assets` or re-clone)")
    path = path or Path(name_or_path)
    if backend is None:
        if not path.exists():
            raise SpecalignError(f"{name_or_path}: no such model (not a bundled name or a directory); "
                                 "for a hub id in the local cache pass --backend")  # fmt: skip
        backend = detect_backend(path)
    name = name_or_path
    if backend == "video-llava":
        from specalign.models.video_llava import load_video_llava

        return load_video_llava(str(path), device=device, dtype=dtype, quantization=quantization, name=name)
    if backend == "eventgpt":
        from specalign.models.eventgpt import load_eventgpt

        return load_eventgpt(str(path), device=device, dtype=dtype, quantization=quantization, name=name)
    if backend == "llava":
        from specalign.models.llava import load_llava

        return load_llava(str(path), device=device, dtype=dtype, quantization=quantization, name=name)
    raise SpecalignError(f"--backend: unknown backend {backend!r}: choose video-llava, eventgpt or llava")


__all__ = ["VLM", "Batch", "DecodeState", "Prompt", "Sampling", "Step", "load_model", "detect_backend"]
