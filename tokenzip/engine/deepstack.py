"""DeepStack (Qwen3-VL): per-visual-token features added to the hidden states after the first decoder layers.

The model computes, before the decoder stack, `visual_pos_masks` [B, L] (the placeholder positions of the
prompt as the processor built it) and one tensor [n_visual, D] of features per DeepStack layer, in row-major order
of that mask; after decoder layer i it adds the i-th tensor at the masked positions
(`Qwen3VLTextModel._deepstack_process(hidden, visual_pos_masks, features)`). Once a pre-LLM or in-LLM stage has
shortened the sequence, that mask no longer describes the tokens the layer processed.

tokenzip wraps `_deepstack_process` on the instance (`DeepstackWrapper`) and, while a compressed prefill runs,
re-targets each addition to the layout the layer really ran on: a slot holds a visual token iff the original
position it stands for (`Layout.orig`) is in the model's mask, and it receives that position's row of the
features. So a kept token receives exactly its own DeepStack features at every DeepStack layer, wherever it now
sits, and a dropped token's features go nowhere. A token that stands for a merged group (a selection with
`values`) receives the features of the position it represents. The gather runs on the layout of the layer just
computed (`ForwardState.current`), so in-LLM stages before the last DeepStack layer are handled the same way as
the pre-LLM stage; with nothing removed (keep=1.0) the model's own call runs unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .layout import Layout


def retarget(layout: Layout, visual_pos_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepStack mask of `layout` and, in its row-major order, the rows of the model's feature tensors.

    visual_pos_masks: BoolTensor [B, L_orig] of the original prompt (the model's own). Returns (mask [B, L'] of
    the slots holding a visual token, LongTensor [n] of feature rows for those slots in row-major order).
    """
    original = visual_pos_masks.to(layout.orig.device).bool()
    rank = (original.flatten().long().cumsum(0) - 1).view_as(original)  # feature row of each original position
    mask = original.gather(1, layout.orig) & layout.valid
    rows = rank.gather(1, layout.orig)[mask]
    return mask, rows


def deepstack_step(state: Any, original, hidden: torch.Tensor, visual_pos_masks, visual_embeds):
    """One DeepStack addition in the layout of the layer just computed (the model's own call when the prefill
    was not shortened, or when tokenzip is not tracking this forward)."""
    if (
        state is None
        or not state.active
        or state.phase != "prefill"
        or state.current is None
        or visual_pos_masks is None
        or (state.current is state.layout0 and not state.rebuilt)
    ):
        return original(hidden, visual_pos_masks, visual_embeds)
    mask, rows = retarget(state.current, visual_pos_masks)
    return original(hidden, mask, visual_embeds[rows.to(visual_embeds.device)])


class DeepstackWrapper:
    """tokenzip's instance-level wrapper of the decoder stack's `_deepstack_process` (a pass-through once the
    runtime is removed, see `FeatureWrapper`)."""

    def __init__(self, runtime: Any, original: Any) -> None:
        functools.update_wrapper(self, original)
        self.runtime = runtime
        self.original = original

    def __call__(self, hidden_states, visual_pos_masks, visual_embeds):
        if self.runtime is None:
            return self.original(hidden_states, visual_pos_masks, visual_embeds)
        return deepstack_step(self.runtime.state, self.original, hidden_states, visual_pos_masks, visual_embeds)
