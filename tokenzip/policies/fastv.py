"""`fastv`: FastV-style pruning inside the LLM by the last token's attention (Chen et al., 2024).

At decoder layer K (default 2) keep the R visual tokens that the last prompt token attended to most in
layer K-1 (head-mean attention, recomputed from captured q/k; no eager attention), with original positions.
`keep` is the layer-averaged visual budget: layers 0..K-1 see all N visual tokens, so
R = (L * keep_tokens - K * N) / (L - K), rounded. Budgets below what pruning at layer K can reach raise
`BudgetError` (lower `layer` or raise `keep`). `ratio` sets R = round(ratio * N) directly instead (FastV's own
parametrisation), ignoring `keep` for the count.
"""

from __future__ import annotations

from typing import ClassVar

from ..adapters.base import ModelInfo
from ..budget import Keep, infeasible_budget, item_budget, one_stage_llm_count
from ..contexts import LLMSignal, LLMStageContext, Plan, Selection
from ..errors import PolicyOptionError
from ..ops.topk import topk_keep_order
from .base import Float, Int, Option, Policy
from .nominal import Nominal, staged
from .registry import register


def fastv_count(
    target: float, n_visual: int, layer: int, n_layers: int, keep: Keep | None = None, sizes: list[int] | None = None
) -> int:
    """Tokens kept from layer `layer` on so the layer-averaged count meets `target` (see module doc).

    Raises `BudgetError` naming the smallest reachable keep (for items of `sizes` content tokens, default one item
    of `n_visual`) when even one token from layer `layer` on would overshoot `target` by more than half a token."""
    if n_visual <= 0:
        return 0
    r = one_stage_llm_count(target, n_visual, layer, n_layers)
    if r < 0.5:
        minimum = (layer * n_visual + (n_layers - layer)) / n_layers
        reason = f"at layer {layer} of {n_layers} the first {layer} layers see all {n_visual}; lower layer"
        raise infeasible_budget("fastv", reason, keep, target, minimum, sizes or [n_visual])
    return min(n_visual, max(1, round(r)))


@register
class FastVPolicy(Policy):
    name = "fastv"
    description = "FastV: drop visual tokens at LLM layer K by the last token's attention at layer K-1."
    options_spec: ClassVar[dict[str, Option]] = {
        "layer": Int(2, ge=1, doc="decoder layer K the pruning happens before (scores from layer K-1)"),
        "ratio": Float(
            None, gt=0, le=1, none=True, doc="R = round(ratio * N) kept from layer K (ignores keep); None = from keep"
        ),
    }

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
            kept = fastv_count(item_budget(keep, n), n, k, info.n_llm_layers, keep)
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
                sizes = [it.shape.n_content for it in ctx.items.per_sample[b]]
                count = fastv_count(target, n, k, ctx.info.n_llm_layers, ctx.keep, sizes)
            out.append(Selection(slots[topk_keep_order(scores[b, slots], count)]))
        return out
