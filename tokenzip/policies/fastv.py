"""`fastv`: FastV-style pruning inside the LLM by the last token's attention (Chen et al., 2024).

At decoder layer K (default 2) keep the R visual tokens that the last prompt token attended to most in
layer K-1 (head-mean attention, recomputed from captured q/k; no eager attention), with original positions.
`keep` is the layer-averaged visual budget: layers 0..K-1 see all N visual tokens, so
R = (L * keep_tokens - K * N) / (L - K), rounded. Budgets below what pruning at layer K can reach raise
`BudgetError` (lower `layer` or raise `keep`). `ratio` sets R = round(ratio * N) directly instead (FastV's own
parametrisation), ignoring `keep` for the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, one_stage_count
from ..contexts import LLMSignal, LLMStageContext
from .base import Float, Int
from .registry import register
from .scorer import LLMScorerPolicy


def fastv_count(
    target: float, n_visual: int, layer: int, n_layers: int, keep: Keep | None = None, sizes: list[int] | None = None
) -> int:
    """Tokens kept from layer `layer` on so the layer-averaged count meets `target` (`budget.one_stage_count`)."""
    return one_stage_count("fastv", target, n_visual, layer, n_layers, keep, sizes or [n_visual])


@register
@dataclass(frozen=True)
class FastVPolicy(LLMScorerPolicy):
    """FastV: at decoder layer K keep the visual tokens the last prompt token attended to most in layer K-1."""

    name = "fastv"
    description = "FastV: drop visual tokens at LLM layer K by the last token's attention at layer K-1."

    layer: int = Int(2, ge=1, doc="decoder layer K the pruning happens before (scores from layer K-1)")
    ratio: float | None = Float(
        None, gt=0, le=1, none=True, doc="R = round(ratio * N) kept from layer K (ignores keep); None = from keep"
    )

    def signals(self, info: ModelInfo) -> tuple[LLMSignal, ...]:
        return (LLMSignal("last_row", self.layer - 1),)

    def score(self, ctx: LLMStageContext) -> torch.Tensor:
        return ctx.signals[LLMSignal("last_row", self.layer - 1).key]

    def count(self, n_visual: int, target: int, n_layers: int, keep: Keep, sizes: list[int]) -> int:
        if self.ratio is not None:
            return min(n_visual, max(1, round(float(self.ratio) * n_visual)))
        return fastv_count(target, n_visual, self.layer, n_layers, keep, sizes)
