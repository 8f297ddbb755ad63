"""specalign: cross-modal speculative decoding (event-camera draft VLM -> RGB-video target VLM)."""

__version__ = "0.1.0"
__all__ = ["TokenAdapter", "load_adapter", "__version__"]


def __getattr__(name):
    # lazy, so that `specalign world build` and its workers do not pay for importing torch
    if name in ("TokenAdapter", "load_adapter"):
        from specalign import align

        return getattr(align, name)
    raise AttributeError(f"module 'specalign' has no attribute {name!r}")
