"""Telling a forward's kind: a fresh prefill, a prefill that repeats the previous one's encoder outputs
(`generate(use_cache=False)`), or a decode step on a compressed cache (and what is refused there)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedInputError
from .state import Decisions, ForwardState, VisionCall


def has_media(kwargs: dict) -> bool:
    """Whether a forward's kwargs carry images or videos (pixels, or non-empty pre-computed encoder outputs)."""
    if any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
        return True
    encoded = kwargs.get("mm_encoder_outputs")
    return bool(encoded) and any(v is not None for v in encoded.values())


def requeue_encoded(previous: ForwardState | None, encoded: dict, pending: dict[str, list[VisionCall]]) -> bool:
    """generate() without a cache passes the same `mm_encoder_outputs` to every step: queue again (in `pending`)
    the feature calls the previous prefill recorded for them. True if every encoded modality was such a repeat."""
    if previous is None:
        return False
    again: dict[str, list[VisionCall]] = {}
    for modality, out in encoded.items():
        if out is None or modality not in pending:
            continue
        if pending[modality]:
            return False  # a fresh feature call: a new prompt
        match = [c for c in previous.calls if c.modality == modality and c.output_ref is not None]
        match = [c for c in match if c.output_ref() is out]
        if not match:
            return False
        again[modality] = match[-1:]
    for modality, calls in again.items():
        pending[modality].extend(calls)
    return bool(again)


def extends(previous: ForwardState | None, recorded: Decisions | None, input_ids: torch.Tensor | None) -> bool:
    """Whether `input_ids` [B, L] continue the recorded prompt (same batch, recorded prompt as prefix)."""
    if previous is None or not previous.active or recorded is None or input_ids is None:
        return False
    first = previous.input_ids
    if first is None or input_ids.shape[0] != recorded.batch or input_ids.shape[1] < first.shape[1]:
        return False
    return bool(torch.equal(input_ids[:, : first.shape[1]].to(first.device), first))


def decode_step_problem(st: ForwardState | None, cache: Any, kwargs: dict) -> UnsupportedInputError | None:
    """Why a forward on a non-empty cache cannot continue this patch's compressed prefill, or None: the cache holds
    another prefill of the model, or new images arrive after prefill."""
    serial = getattr(cache, "_tokenzip_serial", None)
    if serial is not None and (st is None or st.serial != serial):
        return UnsupportedInputError(
            "this KV cache holds a compressed prefill that is not this patch's latest one (tokenzip keeps the "
            "token layout of the latest prefill only, and its layers hold fewer entries than tokens); continue "
            "from a returned cache (or a copy of it) before the next prefill of the model, or run generate() "
            "again on the full sequence with its images"
        )
    if st is not None and st.active and has_media(kwargs):
        return UnsupportedInputError(
            "new image/video inputs arrived after prefill, with a non-empty KV cache (a continued generation); "
            "tokenzip compresses images only in a fresh prefill: continue with text-only tokens, or start a "
            "new generate() on the full sequence without a passed cache"
        )
    return None
