"""`fastv`: FastV-style pruning inside the LLM by the last token's attention (Chen et al., 2024).

At decoder layer K (default 2) keep the R visual tokens that the last prompt token attended to most in
layer K-1 (head-mean attention, recomputed from captured q/k; no eager attention), with original positions.
`keep` is the layer-averaged visual budget: layers 0..K-1 see all N visual tokens, so
R = (L * keep_tokens - K * N) / (L - K), rounded. Budgets below what pruning at layer K can reach raise
`BudgetError` (lower `layer` or raise `keep`). `ratio` sets R = round(ratio * N) directly instead (FastV's own
parametrisation), ignoring `keep` for the count.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget, one_stage_llm_count
from ..contexts import LLMSignal, LLMStageContext, Plan, Selection
from ..errors import BudgetError, PolicyOptionError
from ..ops.topk import topk_keep_order
from .base import Policy
from .nominal import Nominal, staged
from .registry import register


def fastv_count(target: float, n_visual: int, layer: int, n_layers: int) -> int:
    """Tokens kept from layer `layer` on so the layer-averaged count meets `target` (see module doc)."""
    r = one_stage_llm_count(target, n_visual, layer, n_layers)
    if r < 0.5:
        minimum = (layer * n_visual + (n_layers - layer)) / n_layers
        raise BudgetError(
            f"fastv at layer {layer} of {n_layers}: a layer-averaged budget of {target:g} of {n_visual} visual "
            f"tokens is infeasible (the first {layer} layers see all of them; the smallest reachable average is "
            f"{minimum:.2f} tokens, keep >= {minimum / max(1, n_visual):.4f}); raise keep or lower layer"
        )
    return min(n_visual, max(1, round(r)))


@register
class FastVPolicy(Policy):
    name = "fastv"
    description = "FastV: drop visual tokens at LLM layer K by the last token's attention at layer K-1."
    defaults: ClassVar[dict[str, Any]] = {"layer": 2, "ratio": None}

    def validate(self) -> None:
        self._check_int("layer", 1)
        ratio = self.options["ratio"]
        if ratio is not None and (isinstance(ratio, bool) or not 0 < float(ratio) <= 1 or math.isnan(float(ratio))):
            raise PolicyOptionError(f"fastv: ratio must be a float in (0, 1] or None, got {ratio!r}")

    def default_positions(self, info: ModelInfo) -> str:
        return "original"

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        k = self.options["layer"]
        if k >= info.n_llm_layers:
            raise PolicyOptionError(
                f"fastv: layer={k} but the LLM has {info.n_llm_layers} layers (0..{info.n_llm_layers - 1})"
            )
        return Plan(llm_layers=(k,), llm_signals=(LLMSignal("last_row", k - 1),))

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        k, n = self.options["layer"], shape.n_content
        if self.options["ratio"] is not None:
            kept = min(n, max(1, round(float(self.options["ratio"]) * n)))
        else:
            kept = fastv_count(item_budget(keep, n), n, k, info.n_llm_layers)
        return Nominal(staged(n, [kept], (k,), info.n_llm_layers, shape.length - n))

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        k = self.options["layer"]
        scores = ctx.signals[LLMSignal("last_row", k - 1).key]
        layout = ctx.layout
        out = []
        for b, target in enumerate(ctx.item_targets()):
            slots = (layout.valid[b] & layout.visual[b]).nonzero().flatten()
            n = slots.numel()
            if self.options["ratio"] is not None:
                count = min(n, max(1, round(float(self.options["ratio"]) * n)))
            else:
                count = fastv_count(target, n, k, ctx.info.n_llm_layers)
            out.append(Selection(slots[topk_keep_order(scores[b, slots], count)]))
        return out
