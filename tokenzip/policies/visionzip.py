"""VisionZip (CVPR 2025, arXiv 2412.04467; official code dvlab-research/VisionZip @ 3151f6d), training-free.

One stage on the vision output, before the LLM: each image keeps K = `item_budget(keep, N)` tokens, d "dominant"
tokens (the patches the vision tower attends to most) plus c "contextual" tokens (the rest merged: c targets spaced
evenly through the remaining tokens, every other remaining token joined to its most similar target by cosine of
the head-mean keys, a contextual value = target + mean of its members). The split follows the released settings
54 + 10, 108 + 20, 162 + 30 for 64 / 128 / 192 tokens: c = min(floor(K * contextual_ratio + 1/2), K - 1) with
contextual_ratio = 10 / 64, d = K - c. Nothing happens inside the LLM or at decode.

LLaVA-1.5 (the official family): at the CLIP feature layer (-2), before the projector; the dominant score of a
patch is the attention the CLS query gives it at that layer (head mean; the released code sums over heads, the
same ranking); the CLS token itself is the first dominant token and enters the LLM (it counts in d, so d - 1
patches are chosen; `include_cls=False` leaves CLS out and chooses d patches). Merged values are CLIP hidden states,
then projected. Positions compact (the LLaVA convention).

Qwen2.5-VL and LLaVA-OneVision (tokenzip adaptations; the released code covers only CLIP with CLS): the score is
the mean attention a token receives at the vision feature layer (no CLS), the metric that layer's head-mean keys,
and the merge runs on each item's content tokens at the LLM input (Qwen's merged 2x2 units; OneVision's base grid
and packed tiles together, newlines dropped, a video's trailing newline kept; a video's frames together).
Original M-RoPE positions on Qwen2.5-VL (a contextual token stands at its target's position).

Ties go to the lower index (the released `torch.topk` leaves their order unspecified); merges are computed in
float32 for half-precision models (the released code in the model dtype). Merged values are differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget
from ..contexts import Plan, PreLLMItem, ProjectorInputContext, Selection, VisionSignal
from ..errors import PolicyOptionError
from ..items import ItemShape
from ..ops.grad import differentiable_values
from .base import Choice, Float, Policy
from .contextual import dominant_contextual_item, dominant_contextual_rows
from .nominal import Nominal
from .registry import register

OFFICIAL_CONTEXTUAL_RATIO = 10 / 64  # 54 + 10, 108 + 20, 162 + 30 in the released settings


def visionzip_split(count: int, contextual_ratio: float = OFFICIAL_CONTEXTUAL_RATIO) -> tuple[int, int]:
    """(dominant, contextual) for `count` tokens: c = min(floor(count * ratio + 1/2), count - 1), d = count - c
    (64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30)). d >= 1 whenever count >= 1."""
    contextual = max(0, min(math.floor(count * contextual_ratio + 0.5), count - 1))
    return count - contextual, contextual


@dataclass(frozen=True)
class VisionZipState:
    """What `VisionZipPolicy.plan` derives for one model."""

    score: VisionSignal  # dominant scores: the CLS row (CLIP) or the attention received
    metric: VisionSignal  # head-mean keys of the same layer, for the contextual merge
    include_cls: bool  # LLaVA-1.5: CLS is the first dominant token and enters the LLM


@register
@dataclass(frozen=True)
class VisionZipPolicy(Policy):
    """VisionZip: per image, the tokens the vision tower attends to most (dominant) plus a few contextual tokens
    merging the rest by key similarity, on the vision output before the LLM (see the module docstring)."""

    name = "visionzip"
    description = "VisionZip: dominant tokens by CLS / received attention + contextual merging, per image (pre-LLM)."

    contextual_ratio: float = Float(
        OFFICIAL_CONTEXTUAL_RATIO, ge=0, lt=1, doc="contextual share of the K tokens, rounded (official 10/64)"
    )
    include_cls: bool | None = Choice(
        None, (None, True, False), doc="LLaVA-1.5: CLS is a dominant token fed to the LLM (None: True, official)"
    )
    score_dtype: str = Choice(
        "float32", ("float32", "model"), doc="dominant-score numerics: float32, or 'model' = the tower's dtype"
    )

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        layer = info.vision_feature_layer
        metric = VisionSignal("keys", layer)
        if info.supports_projector_stage and info.vision_has_cls:  # CLIP + projector-input stage (LLaVA-1.5)
            include_cls = self.include_cls is not False
            state = VisionZipState(VisionSignal("cls", layer, self.score_dtype), metric, include_cls)
            return Plan(projector_input=True, vision_signals=(state.score, state.metric), state=state)
        if self.include_cls is not None:
            raise PolicyOptionError(
                f"visionzip: include_cls applies only to a CLIP tower with a CLS token (LLaVA-1.5); {info.family} "
                "has none"
            )
        state = VisionZipState(VisionSignal("received", layer, self.score_dtype), metric, False)
        return Plan(pre_llm=True, vision_signals=(state.score, state.metric), state=state)

    def nominal(self, info: ModelInfo, shape: ItemShape, keep: Keep) -> Nominal:
        """K per item (exact; on LLaVA-1.5 the CLS token is one of them); a video's trailing newline stays."""
        return Nominal([item_budget(keep, shape.n_content) + shape.trailing] * info.n_llm_layers)

    @differentiable_values()  # merged values keep their autograd graph; selection inputs carry none
    def select_projector_input(self, ctx: ProjectorInputContext) -> list[Selection]:
        state: VisionZipState = ctx.state
        count = item_budget(ctx.keep, ctx.n_patches)
        dominant, contextual = visionzip_split(count, self.contextual_ratio)
        return dominant_contextual_rows(ctx, state.score.key, state.metric.key, dominant, contextual, state.include_cls)

    @differentiable_values()  # merged values keep their autograd graph; selection inputs carry none
    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        state: VisionZipState = ctx.state
        dominant, contextual = visionzip_split(ctx.budget, self.contextual_ratio)
        return dominant_contextual_item(ctx, state.score.key, state.metric.key, dominant, contextual)
