"""PyramidDrop (arXiv 2410.17247, CVPR 2025; official code Cooperx521/PyramidDrop @ 6444f30), inference-only.

The LLM is cut into stages at decoder layers b_1 < b_2 < b_3 (default round(k L / 4): 8, 16, 24 of 32). Before
layer b_k runs, each image keeps the n_k of its remaining visual tokens that the last prompt token attends to most,
scored with layer b_k's own projections on its input (input_layernorm, q/k, RoPE at the current positions, causal
softmax over the whole row in float32, mean over heads); the kept tokens stay in sequence order. Official counts
n_k = int(N * r_k) with r = (lambda, lambda^2, lambda^3), lambda = 0.5 in every released script.

`keep` is the layer-averaged budget K of each image / video: the first b_1 layers see all N tokens, then
n_k = round(N lambda^k) with lambda solved so that the layer average is exactly K (`pdrop_schedule`; the last count
absorbs the rounding). At K = 0.46875 N (270 of 576) this is the official lambda = 0.5 schedule (288 / 144 / 72).
Budgets below the floor (b_1 N + (L - b_1)) / L of the stage layers (about N / 4 + 1 with the defaults: keep 0.222
and 0.111 are out of reach) raise `BudgetError` naming the smallest reachable keep: pass earlier `layers`; budgets
within one token below the floor run at the floor (the budget rule's tolerance). `ratios` sets the counts the
official way instead, n_k = max(1, int(N r_k)) (ignoring `keep`).

Every image of a sample is ranked and counted on its own (the official code handles one image per sample); a video
is one item. Positions are compacted at every stage on LLaVA-1.5 / OneVision (official LLaVA code) and stay the
original M-RoPE ids on Qwen2.5-VL. `score_dtype="model"` reproduces the official fp16 numerics (logits, softmax
output and head mean rounded to the model dtype); ties go to the lower index (the official `torch.topk` leaves
them unspecified).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, geometric_schedule, infeasible_budget, item_budget
from ..contexts import LLMStageContext, Plan, Selection
from ..errors import PolicyOptionError
from ..ops.topk import topk_keep_order
from .base import Choice, Float, Int, Policy, Tuple
from .nominal import Nominal, staged
from .registry import register

OFFICIAL_RATIOS = (0.5, 0.25, 0.125)  # image_token_ratio_list of every released script (lambda = 0.5)


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The stage layers of the released scripts scaled to the LLM: round(k L / 4), k = 1, 2, 3 (8, 16, 24 of 32)."""
    return tuple(round(k * n_layers / 4) for k in (1, 2, 3))


def stage_widths(layers: tuple[int, ...], n_layers: int) -> list[int]:
    """[b_1, b_2 - b_1, ..., L - b_S]: the number of layers that run on N, n_1, ..., n_S tokens."""
    edges = (0, *layers, n_layers)
    return [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]


def pdrop_floor(n_tokens: int, layers: tuple[int, ...], n_layers: int) -> float:
    """The smallest layer average the stages reach: all N tokens before layers[0], one token from there on."""
    return (layers[0] * n_tokens + (n_layers - layers[0])) / n_layers


def ratio_counts(n_tokens: int, ratios: tuple[float, ...]) -> list[int]:
    """The official counts n_k = int(N r_k) (floor), at least 1 and never more than the stage before."""
    counts, last = [], n_tokens
    for r in ratios:
        last = min(last, max(1, int(n_tokens * r)))
        counts.append(last)
    return counts


def pdrop_schedule(target: float, n_tokens: int, layers: tuple[int, ...], n_layers: int) -> list[int]:
    """Tokens one item keeps from each stage layer on so that its layer average equals `target`.

    n_k = round(N lambda^k) with lambda from b_1 N + sum_k w_k max(1, N lambda^k) = L target (w_k: the layers of
    stage k); the last count absorbs the rounding, counts are >= 1 and non-increasing (`budget.geometric_schedule`).
    """
    if n_tokens <= 0:
        return [0] * len(layers)
    return geometric_schedule(n_layers * target, n_tokens, stage_widths(layers, n_layers), floor=1, spread=True)


def check_pdrop_budget(
    keep: Keep, target: float, n_tokens: int, layers: tuple[int, ...], n_layers: int, sizes: list[int]
) -> None:
    """`BudgetError` naming the smallest reachable keep when `target` lies more than one token (the budget rule's
    tolerance) below `pdrop_floor`: the first layers[0] layers see every token."""
    floor = pdrop_floor(n_tokens, layers, n_layers)
    if target < floor - 1:
        reason = (
            f"stages at decoder layers {layers} of {n_layers}: layers 0..{layers[0] - 1} see all {n_tokens} tokens; "
            "pass earlier layers"
        )
        raise infeasible_budget("pdrop", reason, keep, target, floor, sizes)


def last_token_mask(valid: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, L]: each sample's last real slot (the last prompt token; the layout is left-padded)."""
    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(1)
    return (positions == last[:, None]) & valid


def pdrop_select(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring of one item's visual tokens (scores [n]: the attention the last prompt token pays
    each), ties to the lower index, in ascending (sequence) order."""
    return topk_keep_order(scores, count)


@dataclass(frozen=True)
class PDropState:
    """What `PDropPolicy.plan` derives for one model."""

    layers: tuple[int, ...]
    n_llm_layers: int


@register
@dataclass(frozen=True)
class PDropPolicy(Policy):
    """PyramidDrop: before each of the stage `layers`, keep the visual tokens of each image that the last prompt
    token attends to most at that layer; the counts decay geometrically so that the layer-averaged budget is `keep`,
    or follow the official `ratios`. `score_dtype` sets the scoring numerics (see the module docstring)."""

    name = "pdrop"
    description = "PyramidDrop: last-token attention ranking at 3 LLM stages, geometric (pyramid) counts."

    layers: tuple[int, ...] | None = Tuple(
        None,
        Int(1, ge=1),
        min_length=1,
        increasing=True,
        none=True,
        doc="decoder layers the stages drop tokens before (None: round(k L / 4), k = 1..3: 8, 16, 24 of 32)",
    )
    ratios: tuple[float, ...] | None = Tuple(
        None,
        Float(0.5, gt=0, le=1),
        min_length=1,
        none=True,
        doc="official counts n_k = int(N r_k) per stage, ignoring keep (e.g. (0.5, 0.25, 0.125)); None: from keep",
    )
    score_dtype: str = Choice("float32", ("float32", "model"), doc="scoring numerics ('model': the official fp16)")

    def validate(self) -> None:
        ratios = self.ratios
        if ratios is None:
            return
        if any(b > a for a, b in itertools.pairwise(ratios)):
            raise PolicyOptionError(f"pdrop: ratios={ratios!r} must be non-increasing (each stage keeps a subset)")
        n_stages = len(self.layers) if self.layers is not None else 3
        if len(ratios) != n_stages:
            raise PolicyOptionError(
                f"pdrop: ratios={ratios!r} needs one value per stage layer ({n_stages}: layers="
                f"{self.layers if self.layers is not None else 'round(k L / 4), k = 1..3'})"
            )

    def default_positions(self, info: ModelInfo) -> str:
        return "compact" if info.supports_compact_positions else "original"

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        layers = tuple(self.layers or default_layers(info.n_llm_layers))
        if layers[-1] >= info.n_llm_layers:
            raise PolicyOptionError(
                f"pdrop: layers {layers} exceed the LLM's decoder layers 0..{info.n_llm_layers - 1}"
            )
        if layers[0] < 1 or len(set(layers)) != len(layers):
            raise PolicyOptionError(
                f"pdrop: the {info.n_llm_layers}-layer LLM is too shallow for the default stages {layers}; pass layers"
            )
        return Plan(llm_layers=layers, state=PDropState(layers, info.n_llm_layers))

    def counts(self, state: PDropState, keep: Keep, n_tokens: int) -> list[int]:
        """Tokens an item of `n_tokens` content tokens keeps from each stage layer on."""
        if self.ratios is not None:
            return ratio_counts(n_tokens, self.ratios)
        target = item_budget(keep, n_tokens)
        check_pdrop_budget(keep, target, n_tokens, state.layers, state.n_llm_layers, [n_tokens])
        return pdrop_schedule(target, n_tokens, state.layers, state.n_llm_layers)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Exact: all content tokens before the first stage layer, the stage counts after; structural tokens kept."""
        state: PDropState = self.plan(info, keep).state
        n = shape.n_content
        counts = self.counts(state, keep, n)
        return Nominal(staged(n, counts, state.layers, info.n_llm_layers, shape.length - n))

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        state: PDropState = ctx.state
        stage = state.layers.index(ctx.layer)
        layout = ctx.layout
        with torch.no_grad():
            attention = ctx.attention_received(last_token_mask(layout.valid), self.score_dtype)  # [B, L]
        out = []
        for b, items in enumerate(ctx.items.per_sample):
            visual = layout.visual_slots(b)
            kept = []
            for j, item in enumerate(items):
                slots = visual[layout.item[b, visual] == j]
                count = self.counts(state, ctx.keep, item.shape.n_content)[stage]
                scores = attention[b, slots.to(attention.device)]
                kept.append(slots[pdrop_select(scores, count).to(slots.device)])
            out.append(Selection(torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)))
        return out
