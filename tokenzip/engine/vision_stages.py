"""Policy work inside a feature call: vision signals, the vision-tower stage and the projector-input stage.

Each function runs inside one hook during a feature call and writes what it decided into the call's
`CallCapture`; `replayed` (set while `Patch.replay()` reapplies a recorded prefill) gives the recorded per-row
selections of this call instead of asking the policy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..contexts import ProjectorInputContext, Selection, VisionSignal, VisionStageContext
from ..errors import UnsupportedInputError
from ..signals.checks import require_finite
from .accounting import policy_work
from .config import PatchConfig
from .feature_calls import pixel_keys
from .hooks import stopwatch
from .state import CallCapture, Decisions, VisionStageState
from .vision import encoder_padding_mask, pad_rows, scatter_signal

Replayed = Callable[[int], list[Selection]] | None  # rows -> the recorded selections of this call


def capture_signal(cfg: PatchConfig, capture: CallCapture, sig: VisionSignal, module, args, kwargs) -> None:
    """Compute vision signal `sig` from the inputs of attention module `module` into `capture.signals[sig.key]`:
    [R, T] per tower row over the row's tokens (CLS at 0 where present; `keys`: [R, T, d]) for CLIP / SigLIP,
    [N] packed in the tower's window order for Qwen2.5-VL; scattered back onto the full row (NaN at dropped
    slots) when a vision stage shortened it."""
    hidden = args[0] if args else kwargs["hidden_states"]
    where, what = f"vision layer {sig.layer}", f"vision signal {sig.kind!r}"
    with stopwatch(hidden.device) as seconds:
        require_finite(hidden, cfg.policy.name, where, f"input (hidden states) of the {what}")
        with policy_work():
            scores = cfg.adapter.vision_signal(sig, module, args, kwargs)
            require_finite(scores, cfg.policy.name, where, what)
            if capture.stage is not None:
                stage = capture.stage
                scores = scatter_signal(scores, stage.slots, stage.valid, stage.full_length)
        capture.signals[sig.key] = scores
    capture.seconds += seconds[0]


def vision_stage(cfg: PatchConfig, capture: CallCapture, index: int, args, kwargs, replayed: Replayed):
    """Pre-hook of encoder layer `index` (at or after the stage layer): at the stage layer, ask the policy which
    patches of each row continue (`Selection` per row over patch indices 0..P-1, CLS excluded; CLS stays first),
    right-pad the rows to [R, W, D] and build the padding mask; every later layer gets the shortened rows and the
    mask. Returns the hook's (args, kwargs), or None."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if index == cfg.plan.vision_layer:
        with stopwatch(hidden.device) as seconds:
            has_cls = cfg.info.vision_has_cls
            require_finite(hidden, cfg.policy.name, f"the vision stage (vision layer {index})", "hidden states")
            if replayed is not None:
                selections = replayed(hidden.shape[0])
            else:
                keys = pixel_keys(capture, hidden.shape[0])
                ctx = VisionStageContext(index, hidden, has_cls, cfg.keep, keys, info=cfg.info, state=cfg.plan.state)
                with policy_work():
                    selections = [
                        s if isinstance(s, Selection) else Selection(s) for s in cfg.policy.select_vision(ctx)
                    ]
            capture.kept_rows = selections
            rows, values = [], []
            for r, sel in enumerate(selections):
                keep = sel.keep.to(hidden.device).long() + int(has_cls)
                vals = hidden[r, keep] if sel.values is None else sel.values.to(hidden.device, hidden.dtype)
                if not sel.ordered:
                    keep, order = torch.sort(keep)
                    vals = vals[order]
                if has_cls:  # CLS stays first and unchanged
                    keep = torch.cat([torch.zeros(1, dtype=torch.long, device=hidden.device), keep])
                    vals = torch.cat([hidden[r, :1], vals])
                rows.append(keep)
                values.append(vals)
            full_length = hidden.shape[1]
            hidden, slots, valid = pad_rows(hidden, rows, values)
            mask = encoder_padding_mask(valid, cfg.info.attn_implementation, hidden.dtype)
            capture.stage = VisionStageState(slots, valid, mask, full_length=full_length)
        capture.seconds += seconds[0]
    stage = capture.stage
    if stage is None:
        return None
    if args:
        return (hidden, stage.mask, *args[2:]), kwargs
    kwargs["hidden_states"] = hidden
    kwargs["attention_mask"] = stage.mask
    return args, kwargs


def projector_input_stage(cfg: PatchConfig, capture: CallCapture, features: torch.Tensor, replayed: Replayed):
    """Before the projector: the policy selects / merges the feature layer's tokens of each row (`Selection` per
    row over token indices 0..T-1 of `capture.feature_out` [R, T, D_vision], CLS = 0); the projector then runs on
    the selected values only. Returns the projector's input [R, max kept, D_vision] (right-padded rows)."""
    hidden = capture.feature_out
    with stopwatch(hidden.device) as seconds:
        require_finite(hidden, cfg.policy.name, "the projector-input stage", "vision features")
        if replayed is not None:
            selections = replayed(hidden.shape[0])
        else:
            keys = pixel_keys(capture, hidden.shape[0])
            ctx = ProjectorInputContext(
                hidden,
                dict(capture.signals),
                cfg.keep,
                keys,
                cfg.info.vision_has_cls,
                info=cfg.info,
                state=cfg.plan.state,
            )
            with policy_work():
                selections = cfg.policy.select_projector_input(ctx)
        capture.projector_rows = list(selections)
        rows, reps = [], []
        for r, sel in enumerate(selections):
            keep = sel.keep.to(hidden.device).long()
            values = hidden[r, keep] if sel.values is None else sel.values.to(hidden.device, hidden.dtype)
            if not sel.ordered:
                keep, order = torch.sort(keep)
                values = values[order]
            rows.append(values)
            reps.append(keep.cpu())
        padded = hidden.new_zeros(len(rows), max(v.shape[0] for v in rows), hidden.shape[-1])
        for r, values in enumerate(rows):
            padded[r, : values.shape[0]] = values
        capture.projected_reps = reps
        capture.projector_shape = (features.shape[0], features.shape[1])
    capture.seconds += seconds[0]
    return padded


def projector_output(capture: CallCapture, output: torch.Tensor) -> torch.Tensor:
    """After the projector: keep the projected selected tokens in the capture and hand the model zeros of its own
    shape (its placeholder count); the engine puts the selected tokens in at the LLM input."""
    capture.projected = [output[r, : reps.numel()] for r, reps in enumerate(capture.projected_reps)]
    rows, length = capture.projector_shape
    return output.new_zeros(rows, length, output.shape[-1])


def recorded_rows(replaying: Decisions, kind: str, modality: str, index: int) -> Callable[[int], list[Selection]]:
    """rows -> the selections `replaying` recorded (`kind`: "vision" or "projector") for feature call `index` of
    `modality` (calls are matched by their order); refuses a call whose rows differ."""
    calls = getattr(replaying, kind).get(modality, [])

    def recorded(rows: int) -> list[Selection]:
        if index >= len(calls) or len(calls[index]) != rows:
            raise UnsupportedInputError("replay: this prefill's images differ from the recorded prefill's")
        return calls[index]

    return recorded
