"""HiPrune (arXiv 2508.00553; official code Danielement321/HiPrune @ 6e83a12), training-free, pre-LLM.

Vision-encoder attention at two depths: a middle "object" layer picks k_a = round(K * alpha / 5) anchors, each
with its four grid neighbours as buffers; the deep (feature) layer fills the remaining budget with "register"
tokens. Kept tokens stay in raster order. Scores are the mean attention each token receives (over heads and
all queries of its attention segment), recomputed from captured q/k; never eager attention.

Per family (see the spec for the full table):

* LLaVA-1.5 (official family, `compat="official"`): flat-index neighbours (+-1 wraps across rows, indices
  clamped to the grid), candidates excluded from the register top-k by subtracting 1, compact positions.
* Qwen2.5-VL (`compat="fixed"` by default): scores of the merged 2x2 units in raster order, true 2-D
  neighbours, candidates masked out, column *mean*; `compat="official"` restores flat neighbours, the
  subtract-1 exclusion and the released column *sum* (mean x segment length). Original M-RoPE positions.
* LLaVA-OneVision (tokenzip adaptation, fixed): the base grid and the packed high-resolution grid are
  selected separately (K split in proportion to their sizes), newline tokens dropped by default; videos per
  frame (K split evenly, the first K mod F frames get one more), the trailing newline kept.

`object_layer` is 1-based, as the official HIPRUNE_OBJECT_LAYER (9 for CLIP ViT-L/14's 24 layers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget
from ..contexts import Plan, PreLLMItem, Selection, VisionSignal
from ..errors import PolicyOptionError
from ..ops.topk import topk_stable
from .base import Choice, Float, Int, Policy
from .common import NEWLINE_MODES, structural_to_keep
from .nominal import Nominal, structural
from .registry import register
from .units import grid_units, proportional_two, split_evenly


def grid_neighbours(anchors: torch.Tensor, n: int, width: int, mode: str) -> torch.Tensor:
    """Anchors and their four neighbours on an n-token raster grid of the given width (unique, unsorted).

    mode "flat" (official): a-1, a+1, a-width, a+width clamped to [0, n-1] (+-1 wraps across row ends);
    mode "grid": true 2-D neighbours, those outside the grid discarded.
    """
    if mode == "flat":
        cand = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
        return torch.unique(cand)
    col = anchors % width
    pieces = [
        anchors,
        (anchors - 1)[col > 0],
        (anchors + 1)[(col < width - 1) & (anchors + 1 < n)],
        (anchors - width)[anchors - width >= 0],
        (anchors + width)[anchors + width < n],
    ]
    return torch.unique(torch.cat(pieces))


def hiprune_select(
    s_obj: torch.Tensor,
    s_deep: torch.Tensor,
    budget: int,
    alpha: float,
    width: int,
    neighbors: str = "flat",
    exclude: str = "minus_one",
) -> torch.Tensor:
    """HiPrune's selection on one grid: kept indices, ascending (raster order).

    s_obj, s_deep: float [N] object-layer and deep-layer scores; budget: K; width: grid width.
    k_a = round(K * alpha / 5) anchors (Python round, ties to even) by s_obj, plus neighbours (`neighbors`);
    registers = top (K - |candidates|) of s_deep with candidates excluded (`exclude`: "minus_one" subtracts 1
    as the official code, "mask" sets -inf). When candidates alone exceed K, the K best candidates by s_obj
    are kept (the official code crashes). Ties resolve to the lower index. With "minus_one" and scores not in
    [0, 1), registers may re-select candidates and fewer than K tokens result (official behaviour).
    """
    n = s_obj.numel()
    k_anchor = round(budget * alpha / 5)
    anchors = topk_stable(s_obj, k_anchor)
    candidates = grid_neighbours(anchors, n, width, neighbors) if anchors.numel() else anchors
    k_registers = budget - candidates.numel()
    if k_registers < 0:
        return torch.sort(candidates[topk_stable(s_obj[candidates], budget)]).values
    deep = s_deep.detach().float().clone()
    if exclude == "minus_one":
        deep[candidates] -= 1
    else:
        deep[candidates] = float("-inf")
    registers = topk_stable(deep, k_registers)
    return torch.unique(torch.cat([candidates, registers]))  # sorted ascending


def default_layers(info: ModelInfo) -> tuple[int, int]:
    """(object, deep) 0-based vision layers: the spec's per-family defaults, scaled for other depths."""
    n = info.n_vision_layers
    if info.vision_windowed:
        full = info.vision_full_attention_layers
        return (full[len(full) // 2 - 1] if len(full) >= 2 else full[0]), n - 1
    deep = info.vision_feature_layer if info.vision_feature_layer is not None else n - 1
    return max(0, round(n * 9 / 24) - 1), deep


COMPAT = {"official": ("flat", "minus_one"), "fixed": ("grid", "mask")}


@dataclass(frozen=True)
class HiPruneState:
    """What `HiPrunePolicy.plan` derives for one model."""

    object_signal: VisionSignal  # anchor scores (the object layer)
    deep_signal: VisionSignal  # register scores (the deep layer)
    compat: str  # "official" or "fixed"
    neighbors: str  # "flat" or "grid"
    exclude: str  # "minus_one" or "mask"
    column_sum: bool  # Qwen2.5-VL official: scores as the released column sum (mean x segment length)


@register
@dataclass(frozen=True)
class HiPrunePolicy(Policy):
    """HiPrune: anchors from a middle vision layer with their grid neighbours as buffers, the rest of the budget
    as registers from the deep layer; kept tokens stay in raster order (see the module docstring per family)."""

    name = "hiprune"
    description = "HiPrune: anchors + grid buffers from a middle ViT layer, registers from the deep layer (pre-LLM)."

    alpha: float = Float(0.1, ge=0, le=5, doc="anchor share: k_a = round(K * alpha / 5) anchors (<= K)")
    object_layer: int | None = Int(
        None, ge=1, none=True, doc="1-based vision layer of the anchor scores; None = the family default"
    )
    compat: str | None = Choice(
        None, (None, "official", "fixed"), doc="released rules or tokenzip's fixes; None = per family"
    )
    neighbors: str | None = Choice(None, (None, "flat", "grid"), doc="buffer neighbours; None = from compat")
    exclude: str | None = Choice(None, (None, "minus_one", "mask"), doc="candidate exclusion; None = from compat")
    newlines: str = Choice("drop", NEWLINE_MODES, doc="OneVision per-row newline tokens")
    score_dtype: str = Choice(
        "float32",
        ("float32", "model"),
        doc="attention-score numerics: float32, or 'model' = the official fp16 / bf16 scoring (rounded to the "
        "model dtype)",
    )

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        obj, deep = default_layers(info)
        if self.object_layer is not None:
            obj = self.object_layer - 1
            if obj >= info.n_vision_layers:
                raise PolicyOptionError(
                    f"hiprune: object_layer={obj + 1} but the vision tower has {info.n_vision_layers} layers"
                )
            if obj not in info.vision_full_attention_layers:
                warnings.warn(
                    f"hiprune: vision block {obj} uses windowed attention; its scores are computed "
                    "inside the windows (full-attention blocks: "
                    f"{list(info.vision_full_attention_layers)})",
                    stacklevel=2,
                )
        mode = self.rules(info)
        state = HiPruneState(
            VisionSignal("received", obj, self.score_dtype),
            VisionSignal("received", deep, self.score_dtype),
            mode,
            self.neighbors or COMPAT[mode][0],
            self.exclude or COMPAT[mode][1],
            column_sum=info.vision_windowed and mode == "official",
        )
        signals = tuple(dict.fromkeys((state.object_signal, state.deep_signal)))
        return Plan(pre_llm=True, vision_signals=signals, state=state)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """K per item (exact); newlines as `newlines` ('keep_nonempty_rows' assumes every row kept)."""
        budget = item_budget(keep, shape.n_content)
        return Nominal([budget + structural(shape, self.newlines)] * info.n_llm_layers)

    def rules(self, info: ModelInfo) -> str:
        """`compat`, or the family default: "official" on LLaVA-1.5, "fixed" elsewhere."""
        if self.compat is not None:
            return self.compat
        return "official" if info.reference_architecture else "fixed"

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        state: HiPruneState = ctx.state
        s_obj = ctx.signals[state.object_signal.key]
        s_deep = ctx.signals[state.deep_signal.key]
        if state.column_sum:
            segment = 4 * ctx.item.shape.parts[0].rows * ctx.item.shape.parts[0].cols  # patches per slice
            s_obj, s_deep = s_obj * segment, s_deep * segment
        units = grid_units(ctx.item.shape)
        budget = ctx.budget
        if ctx.item.modality == "video" or len(units) == 1:
            shares = split_evenly(budget, len(units))
        else:  # anyres: base grid, then the packed high-resolution grid
            shares = list(proportional_two(budget, units[0].size, units[1].size))
        kept = []
        for unit, share in zip(units, shares, strict=True):
            if share <= 0:
                continue
            cells = unit.cells.to(s_obj.device)
            local = hiprune_select(
                s_obj[cells], s_deep[cells], share, self.alpha, unit.cols, state.neighbors, state.exclude
            )
            kept.append(cells[local])
        content = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
        extra = structural_to_keep(ctx.item.shape, content.cpu(), self.newlines)
        return Selection(torch.cat([content.cpu(), extra]))
