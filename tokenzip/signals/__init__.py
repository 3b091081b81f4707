"""Attention signals recomputed from captured q/k (no eager attention, no `output_attentions`)."""

from .attention import (
    as_keep_mask,
    decoder_attention_received,
    decoder_attention_rows,
    decoder_head_mean_keys,
    encoder_attention_received,
    encoder_attention_rows,
    encoder_head_mean_keys,
    qwen_vision_attention_received,
    qwen_vision_head_mean_keys,
)
from .checks import require_finite

__all__ = [
    "as_keep_mask",
    "decoder_attention_received",
    "decoder_attention_rows",
    "decoder_head_mean_keys",
    "encoder_attention_received",
    "encoder_attention_rows",
    "encoder_head_mean_keys",
    "qwen_vision_attention_received",
    "qwen_vision_head_mean_keys",
    "require_finite",
]
