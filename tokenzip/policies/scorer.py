"""Scorer bases: the common case of a policy, where it only says how much each visual token is worth.

`ScorerPolicy` (pre-LLM) and `LLMScorerPolicy` (one stage inside the LLM) do everything else: the plan, the
per-item / per-sample budget, the layer-averaged schedule and its `BudgetError`, a deterministic top-k (ties to
the lower index), the structural tokens (OneVision newlines) and the sequence order. A subclass implements
`score` and, when it reads attention, `signals`:

    @register
    @dataclass(frozen=True)
    class FeatureNorm(ScorerPolicy):
        '''Keep the visual tokens whose LLM-input embedding has the largest L2 norm.'''

        name = "feature_norm"
        description = "largest-norm visual tokens (pre-LLM)"

        def score(self, ctx: PreLLMItem) -> torch.Tensor:
            return ctx.embeds.float().norm(dim=-1)

`docs/writing-a-policy.md` walks through a complete example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget, one_stage_count
from ..contexts import LLMSignal, LLMStageContext, Plan, PreLLMItem, Selection, VisionSignal
from ..errors import PolicyOptionError, TokenzipError
from ..items import ItemShape
from ..ops.topk import topk_keep_order
from ..signals.checks import require_finite
from .base import Choice, Int, Policy
from .common import NEWLINE_MODES, structural_to_keep
from .nominal import Nominal, staged, structural


def _checked_scores(policy: str, scores: torch.Tensor, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """`scores` as float32 after checking its shape (a clear error rather than a wrong selection)."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise TokenzipError(f"{policy}: score() must return a float tensor of shape {shape} ({where}), got {got}")
    return scores.detach().float()


@dataclass(frozen=True)
class ScorerPolicy(Policy):
    """Pre-LLM scorer: keep each item's `budget` highest-scoring content tokens, in sequence order.

    Implement `score(ctx) -> [length]` (one value per item-local token; only the content tokens that reached the
    LLM input are read) and, to read vision attention, `signals(info)`: the engine then computes those signals and
    hands them to `score` in `ctx.signals` (keys `VisionSignal.key`); `ctx.state` is the tuple `signals` returned.
    """

    newlines: str = Choice("keep_nonempty_rows", NEWLINE_MODES, doc="OneVision per-row newline tokens")

    def signals(self, info: ModelInfo) -> tuple[VisionSignal, ...]:
        """The vision signals `score` reads on a model described by `info` (default: none)."""
        return ()

    def score(self, ctx: PreLLMItem) -> torch.Tensor:
        """float [ctx.item.length]: how much each token of the item is worth keeping (higher = kept first)."""
        raise NotImplementedError(f"policy {self.name!r} must implement score(ctx)")

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        signals = tuple(self.signals(info))
        return Plan(pre_llm=True, vision_signals=signals, state=signals)

    def nominal(self, info: ModelInfo, shape: ItemShape, keep: Keep) -> Nominal:
        """K per item (exact); newlines as `newlines` ('keep_nonempty_rows' assumes every row kept)."""
        return Nominal([item_budget(keep, shape.n_content) + structural(shape, self.newlines)] * info.n_llm_layers)

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        where = f"sample {ctx.item.sample}'s {ctx.item.modality} {ctx.item.index_in_sample}"
        scores = _checked_scores(self.name, self.score(ctx), (ctx.item.length,), where)
        content = ctx.content_available.cpu()
        candidates = scores.cpu()[content]
        require_finite(candidates, self.name, where, "scores of its content tokens")
        kept = content[topk_keep_order(candidates, ctx.budget)]
        extra = structural_to_keep(ctx.item.shape, kept, self.newlines)
        extra = extra[torch.isin(extra, ctx.available.cpu())]
        return Selection(torch.cat([kept, extra]).to(ctx.available.device))


@dataclass(frozen=True)
class LLMScorerPolicy(Policy):
    """One-stage in-LLM scorer: before decoder layer `layer`, keep each sample's highest-scoring visual tokens.

    The count meets the layer-averaged budget: layers 0..layer-1 see all N visual tokens of the sample, the rest
    R = (L * budget - layer * N) / (L - layer) (`tokenzip.budget.one_stage_count`, which raises `BudgetError`
    naming the smallest reachable keep when no R >= 1 meets it). Kept tokens keep their order and positions.

    Implement `score(ctx) -> [B, L]` (one value per slot of `ctx.layout`; only visual slots are read) and the
    `signals(info)` it reads (`LLMSignal`s, captured during prefill, in `ctx.signals`); or override `count` to
    set the per-sample count another way.
    """

    layer: int = Int(2, ge=1, doc="decoder layer K the tokens are dropped before")

    def signals(self, info: ModelInfo) -> tuple[LLMSignal, ...]:
        """The LLM signals `score` reads (default: none; `ctx.attention_received` is always available)."""
        return ()

    def score(self, ctx: LLMStageContext) -> torch.Tensor:
        """float [B, L]: per slot of `ctx.layout`, how much each visual token is worth keeping."""
        raise NotImplementedError(f"policy {self.name!r} must implement score(ctx)")

    def count(self, n_visual: int, target: int, n_layers: int, keep: Keep, sizes: list[int]) -> int:
        """Visual tokens one sample keeps from `layer` on: `n_visual` enter the LLM, `target` is its layer-averaged
        budget, `sizes` the content tokens of its items."""
        return one_stage_count(self.name, target, n_visual, self.layer, n_layers, keep, sizes)

    def default_positions(self, info: ModelInfo) -> str:
        return "original"

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        if self.layer >= info.n_llm_layers:
            raise PolicyOptionError(
                f"{self.name}: layer={self.layer} but the LLM has {info.n_llm_layers} layers "
                f"(0..{info.n_llm_layers - 1})"
            )
        signals = tuple(self.signals(info))
        return Plan(llm_layers=(self.layer,), llm_signals=signals, state=signals)

    def nominal(self, info: ModelInfo, shape: ItemShape, keep: Keep) -> Nominal:
        """Exact for one item: all N content tokens before `layer`, `count` from it on."""
        n = shape.n_content
        kept = self.count(n, item_budget(keep, n), info.n_llm_layers, keep, [n])
        return Nominal(staged(n, [kept], (self.layer,), info.n_llm_layers, shape.length - n))

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        layout = ctx.layout
        scores = _checked_scores(self.name, self.score(ctx), (layout.batch, layout.length), f"layer {ctx.layer}")
        out = []
        for b, target in enumerate(ctx.item_targets()):
            slots = layout.visual_slots(b)
            sizes = [it.shape.n_content for it in ctx.items.per_sample[b]]
            count = self.count(slots.numel(), target, ctx.info.n_llm_layers, ctx.keep, sizes) if slots.numel() else 0
            candidates = scores[b, slots.to(scores.device)]
            require_finite(candidates, self.name, f"layer {ctx.layer}", f"scores of sample {b}'s visual tokens")
            out.append(Selection(slots[topk_keep_order(candidates, count).to(slots.device)]))
        return out
