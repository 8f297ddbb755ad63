"""specalign: cross-modal speculative decoding (event-camera draft VLM -> RGB-video target VLM)."""

__version__ = "0.1.0"
