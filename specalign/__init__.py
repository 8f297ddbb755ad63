"""specalign: cross-modal speculative decoding (event-camera draft VLM -> RGB-video target VLM)."""

from importlib.metadata import PackageNotFoundError, version

try:  # pyproject.toml is the one place the version is written
    __version__ = version("specalign")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["TokenAdapter", "load_adapter", "__version__"]


def __getattr__(name):
    # lazy, so that `specalign world build` and its workers do not pay for importing torch
    if name in ("TokenAdapter", "load_adapter"):
        from specalign import align

        return getattr(align, name)
    raise AttributeError(f"module 'specalign' has no attribute {name!r}")
