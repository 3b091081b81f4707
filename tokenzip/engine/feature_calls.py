"""Recording one call of a feature function (`get_image_features` / `get_video_features`): the item shapes it
produced, the signals and vision-side selections captured while it ran, and what it computed (FLOPs)."""

from __future__ import annotations

import weakref
import zlib
from typing import Any

import torch

from ..adapters.base import Adapter
from ..contexts import Selection
from .config import PatchConfig
from .state import CallCapture, VisionCall
from .vision import expand_features


def pixel_keys(capture: CallCapture, rows: int) -> list[int]:
    """One stable int per tower row, from its pixel values (independent of batch composition); 0..rows-1 when the
    call carries no pixels."""
    args, kwargs = capture.arguments
    pixels = kwargs.get("pixel_values", args[0] if args else None)
    if pixels is None:
        return list(range(rows))
    return [zlib.crc32(p.detach().float().cpu().contiguous().numpy().tobytes()) for p in pixels]


def item_groups(groups: torch.Tensor | None, dropped: int) -> torch.Tensor | None:
    """A selection's merges [2, m] (tower indices) as item-local indices: minus the `dropped` leading tower tokens
    (CLS); merges involving a dropped token are left out."""
    if groups is None:
        return None
    shifted = groups.cpu().long() - dropped
    return shifted[:, (shifted >= 0).all(0)]


def record_call(cfg: PatchConfig, capture: CallCapture, original: Any, out: Any) -> VisionCall:
    """The `VisionCall` of a finished feature call. A vision stage's surviving features are scattered back onto
    each item's full grid in `out` (so the model's placeholder check passes); a projector-input stage's selections
    become per-item overrides of the LLM input."""
    args, kwargs = capture.arguments
    arguments = Adapter.bind(original, args, kwargs)
    stage = capture.stage
    shapes = cfg.adapter.item_shapes(capture.modality, arguments, out, check=stage is None)
    call = VisionCall(
        capture.modality,
        arguments,
        shapes,
        capture.signals,
        seconds=capture.seconds,
        call_seconds=capture.call_seconds,
        kept_rows=capture.kept_rows,
        projector_rows=capture.projector_rows,
    )
    dropped = cfg.adapter.dropped_feature_tokens(arguments)
    if stage is not None:
        full, available = expand_features(list(out.pooler_output), stage.slots, stage.valid, shapes, dropped)
        out.pooler_output = type(out.pooler_output)(full) if isinstance(out.pooler_output, tuple) else full
        call.available = available
        call.vision_groups = [_vision_groups(cfg, capture, shape, dropped) for shape in shapes]
    if capture.projected is not None:
        call.overrides = [
            Selection(
                (capture.projected_reps[shape.vision_rows[0]] - dropped).clamp_min(0),
                capture.projected[shape.vision_rows[0]],
                ordered=True,
                groups=item_groups(capture.projector_rows[shape.vision_rows[0]].groups, dropped),
            )
            for shape in shapes
        ]
    stage_width = (cfg.plan.vision_layer, stage.slots.shape[1]) if stage is not None else None
    projected = max(int(r.numel()) for r in capture.projected_reps) if capture.projected_reps is not None else None
    call.workload = cfg.adapter.vision_workload(capture.modality, arguments, shapes, stage_width, projected)
    try:
        call.output_ref = weakref.ref(out)
    except TypeError:  # an output type without weak references: no reuse across cache-free steps
        call.output_ref = None
    # the shapes are recorded: hold no pixels (a record lives until the next forward)
    call.arguments = {k: v for k, v in arguments.items() if not k.startswith("pixel_values")}
    return call


def _vision_groups(cfg: PatchConfig, capture: CallCapture, shape, dropped: int) -> torch.Tensor | None:
    """The merges [2, m] a vision-stage selection recorded for a single-row item, as item-local indices."""
    start, end = shape.vision_rows
    if end - start != 1 or not capture.kept_rows or capture.kept_rows[start].groups is None:
        return None
    return item_groups(capture.kept_rows[start].groups + int(cfg.info.vision_has_cls), dropped)
