"""Attention signals recomputed from captured q/k (no eager attention, no `output_attentions`)."""

from .attention import (
    as_keep_mask,
    decoder_attention_received,
    decoder_attention_rows,
    encoder_attention_received,
    encoder_attention_rows,
    qwen_vision_attention_received,
)

__all__ = [
    "as_keep_mask",
    "decoder_attention_received",
    "decoder_attention_rows",
    "encoder_attention_received",
    "encoder_attention_rows",
    "qwen_vision_attention_received",
]
