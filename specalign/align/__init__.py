"""Alignment between the draft and the target: the reference study's TokenAdapter (more adapters to come)."""

from specalign.align.token_adapter import (
    TokenAdapter,
    TokenAdapterConfig,
    adapter_loss,
    load_adapter,
    save_adapter,
    shifted_targets,
    topk_accuracy,
)

__all__ = [
    "TokenAdapter",
    "TokenAdapterConfig",
    "adapter_loss",
    "load_adapter",
    "save_adapter",
    "shifted_targets",
    "topk_accuracy",
]
