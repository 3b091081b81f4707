"""SparseVLM (ICML 2025, arXiv 2410.04417; official code Gumpest/SparseVLMs, branch v1.5 @ 535f8ba), training-free.

Text-guided sparsification inside the LLM, after decoder layers p = (2, 6, 15) of 32 (round(p L / 32) otherwise,
see `default_prune_layers`), with token recycling. Spec: docs/specs/sparsevlm.md.

1. Raters (once, at the LLM input): M = V T^T between the input embeddings of the sample's visual tokens V and of
   its text tokens after the last visual token T; r = softmax of M over the text axis, averaged over the visual
   tokens; the raters are the text tokens with r_j > mean(r) (`select_raters`).
2. At each pruning layer p: the head-mean attention of that layer (full causal softmax rows, from its own q/k)
   from the raters to the current visual tokens, averaged over the raters, scores every visual token (recycled
   ones included). The top k are kept in sequence order (`sparsevlm_select`).
3. Recycling: of the dropped tokens, the int(0.3 d) + 1 best scored are clustered (density-peak clustering with
   k-nearest-neighbour density, int(m / 10) + 1 clusters, on layer p's output hidden states, `dpc_knn`) and each
   cluster's mean becomes one recycled token, placed after the item's kept tokens (cluster centre order); it
   stands at its centre's slot and is a candidate of the next stage like any visual token.

`keep` is the layer-averaged visual budget K (recycled tokens counted). `schedule="budget"` (default): the visual
tokens left after each stage (kept + recycled) decay geometrically so that the true layer average is K
(`sparsevlm_schedule`); the scored count k of a stage is the one whose kept + recycled total hits the stage's
total (`scored_count`). `schedule="official"`: the official kept counts (64: 66/30/17, 128: 303/110/36, 192:
300/200/110 at 576 tokens, scaled by N / 576), for keep values meaning 64 / 128 / 192 tokens per 576; these meet
keep only in the official logged accounting (layer p counted as already pruned), not the true average.

Deviations (spec §7): ties go to the lower index / earlier candidate (torch.topk's order is unspecified) and the
clustering's random density noise (1e-6) is replaced by that deterministic tie rule; scores, raters and clustering
in float32; a sample without a rater above the mean (one text token, equal r) uses all its text tokens; a stage
whose total is every current token keeps them all (official: drops and recycles one); multi-item samples: one
pooled visual set per sample, recycled tokens placed after their centre's item. Positions compact on LLaVA-1.5
(official), original M-RoPE positions on Qwen2.5-VL; OneVision newline tokens are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, geometric_schedule, infeasible_budget, item_budget
from ..contexts import LLMSignal, LLMStageContext, Plan, Selection
from ..errors import PolicyOptionError
from ..ops.grad import differentiable_values
from ..ops.topk import topk_stable
from .atp import stage_widths
from .base import Choice, Int, Policy, Tuple
from .nominal import Nominal, staged
from .registry import register

OFFICIAL_LAYERS = (2, 6, 15)  # of 32 (LLaVA-1.5-7B)
OFFICIAL_KEPT = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}  # scored tokens kept, of 576
RECYCLE_SHARE = 0.3  # share of the dropped tokens that are recycled (official `* 0.3`)
CLUSTER_DIV = 10  # recycled candidates per cluster (official `/ 10`)
RATERS = LLMSignal("hidden", 0)  # the LLM input embeddings


# ------------------------------------------------------------------------------------------ maths
def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices of the text tokens whose relevance r_j = mean_i softmax_j(v_i . t_j) exceeds mean(r) (strictly).

    visual: [Nv, D], text: [Nt, D] (LLM input embeddings). Returns LongTensor, ascending.
    """
    m = visual.float() @ text.float().t()  # [Nv, Nt]
    r = m.softmax(dim=1).mean(dim=0)
    return (r > r.mean()).nonzero().flatten()


def recycled_candidates(dropped: int) -> int:
    """Dropped tokens that enter the clustering: int(0.3 d) + 1 (official; 0 when nothing is dropped)."""
    return int(dropped * RECYCLE_SHARE) + 1 if dropped > 0 else 0


def cluster_count(candidates: int) -> int:
    """Recycled tokens made from `candidates` clustered tokens: int(m / 10) + 1 (0 when m = 0)."""
    return int(candidates / CLUSTER_DIV) + 1 if candidates > 0 else 0


def stage_total(v: int, k: int) -> int:
    """Visual tokens after a stage that keeps k of v by score: k kept + the recycled tokens of the v - k dropped."""
    return k + cluster_count(recycled_candidates(v - k))


def scored_count(v: int, total: int) -> int:
    """The scored count k in [0, v - 1] whose `stage_total` is `total` (the smallest such k; `stage_total` rises
    by 0 or 1 per k, so every total in [stage_total(v, 0), v] is reached); v when total >= v (nothing dropped)."""
    if total >= v:
        return v
    lo, hi = 0, v - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if stage_total(v, mid) >= total:
            hi = mid
        else:
            lo = mid + 1
    return lo


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (k = `clusters`), as the official recycling.

    x: [m, C]. d_ij = ||x_i - x_j|| / sqrt(C); density rho_i = exp(-mean of the squared distances to its k nearest
    tokens, itself included); delta_i = min distance to a denser token (rho_j > rho_i, or equal and j < i), the
    largest distance of the matrix when none; centres = the `clusters` largest rho * delta (ties -> lower index),
    in that order; every token joins its nearest centre (ties -> earlier centre), a centre joins itself.
    Returns (centres [c] indices into x, assignment [m] in 0..c-1).
    """
    m, c = x.shape[0], min(clusters, x.shape[0])
    work = x.float()
    dist = torch.cdist(work, work) / work.shape[1] ** 0.5
    near = torch.topk(dist, k=c, dim=1, largest=False).values
    density = torch.exp(-(near**2).mean(dim=1))
    idx = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )  # [i, j]: j is denser than i
    masked = torch.where(denser, dist, torch.full_like(dist, float("inf")))
    delta = masked.min(dim=1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = topk_stable(delta * density, c)
    assign = dist[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


def merge_clusters(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """Cluster means with the official weights 1 / (count + 1e-6). x: [m, C] -> [clusters, C] (float32 or wider)."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    counts = torch.zeros(clusters, dtype=work.dtype, device=x.device).index_add_(
        0, assign, torch.ones(x.shape[0], dtype=work.dtype, device=x.device)
    )
    weights = 1.0 / (counts + 1e-6)
    return torch.zeros(clusters, x.shape[1], dtype=work.dtype, device=x.device).index_add_(
        0, assign, work * weights[assign, None]
    )


def sparsevlm_select(
    scores: torch.Tensor, hidden: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stage on n visual tokens: keep the top k by score, recycle the best dropped ones.

    scores: [n] rater attention; hidden: [n, D] the pruning layer's output. Returns (kept [k] ascending, centres
    [c] (indices into n, cluster order), merged values [c, D], groups [2, m - c]: candidate -> its centre).
    """
    n = scores.shape[0]
    k = min(k, n)
    top = topk_stable(scores, k)
    kept = torch.sort(top).values
    mask = torch.ones(n, dtype=torch.bool, device=scores.device)
    mask[top] = False
    dropped = mask.nonzero().flatten()  # sequence order
    m = recycled_candidates(int(dropped.numel()))
    empty = torch.zeros(0, dtype=torch.long, device=scores.device)
    if m == 0:
        return kept, empty, hidden[:0], torch.zeros(2, 0, dtype=torch.long, device=scores.device)
    cand = dropped[topk_stable(scores[dropped], m)]  # descending score
    c = cluster_count(m)
    centres, assign = dpc_knn(hidden[cand].detach(), c)
    merged = merge_clusters(hidden[cand], assign, c)
    members = torch.ones(m, dtype=torch.bool, device=scores.device)
    members[centres] = False
    groups = torch.stack([cand[members], cand[centres][assign[members]]])
    return kept, cand[centres], merged, groups


# ------------------------------------------------------------------------------------------ schedule
def default_prune_layers(n_layers: int) -> tuple[int, ...]:
    """round(p L / 32) for the official (2, 6, 15), made distinct and increasing with the last at most L - 2 (a layer
    must run after it): (2, 5, 13) at L = 28, (2, 4, 11) at L = 24, (0, 1, 2) at L = 4, (0,) at L = 2."""
    if n_layers < 2:
        raise PolicyOptionError(f"sparsevlm needs an LLM of at least 2 layers to prune in, got {n_layers}")
    stages = min(len(OFFICIAL_LAYERS), n_layers - 1)
    layers: list[int] = []
    for p in OFFICIAL_LAYERS[:stages]:
        layers.append(max(round(p * n_layers / 32), layers[-1] + 1 if layers else 0))
    for i in range(stages - 1, -1, -1):
        layers[i] = min(layers[i], n_layers - 2 - (stages - 1 - i))
    return tuple(layers)


def floor_totals(n: int, stages: int) -> list[int]:
    """The smallest totals the stages can reach: each drops every scored token (only recycled ones remain)."""
    out, v = [], n
    for _ in range(stages):
        v = min(v, stage_total(v, 0))
        out.append(v)
    return out


def layer_average(n: int, totals: list[int], prune_layers: tuple[int, ...], n_layers: int) -> float:
    """True layer average: layers 0..p1 see n, then each stage's total until the next pruning layer."""
    w = stage_widths(prune_layers, n_layers)
    return (w[0] * n + sum(wi * t for wi, t in zip(w[1:], totals, strict=True))) / n_layers


def sparsevlm_schedule(target: float, n: int, prune_layers: tuple[int, ...], n_layers: int) -> list[int]:
    """Visual tokens after each stage (kept + recycled), geometric, with true layer average `target`.

    `geometric_schedule` (floor 1, spread) on the totals, then each total raised to at least what the stage can
    reach (recycling leaves at least `stage_total(v, 0)` tokens). The caller checks feasibility (`check_budget`).
    """
    widths = stage_widths(prune_layers, n_layers)
    totals = geometric_schedule(n_layers * target, n, widths, floor=1, spread=True)
    v = n
    for i, t in enumerate(totals):
        totals[i] = min(v, max(t, stage_total(v, 0)))
        v = totals[i]
    return totals


def official_totals(preset: int, n: int) -> list[int]:
    """Totals of the official schedule: kept counts of `preset` scaled by n / 576 (k <= v - 1), plus recycling."""
    out, v = [], n
    for kept in OFFICIAL_KEPT[preset]:
        k = min(round(kept * n / 576), v - 1)
        v = stage_total(v, k)
        out.append(v)
    return out


def check_budget(
    keep: Keep, target: float, n: int, sizes: list[int], prune_layers: tuple[int, ...], n_layers: int
) -> list[int]:
    """The budget schedule's totals, or `BudgetError` naming the smallest reachable keep when its layer average
    overshoots `target` by more than half a token (the first p1 + 1 layers see every token; recycling leaves at
    least int((int(0.3 v) + 1) / 10) + 1 tokens per stage)."""
    totals = sparsevlm_schedule(target, n, prune_layers, n_layers)
    if layer_average(n, totals, prune_layers, n_layers) > target + 0.5:
        floor = layer_average(n, floor_totals(n, len(prune_layers)), prune_layers, n_layers)
        reason = (
            f"pruning after layers {prune_layers} of {n_layers}: layers 0..{prune_layers[0]} see all {n} tokens and "
            "every stage leaves its recycled tokens; pass earlier prune_layers"
        )
        raise infeasible_budget("sparsevlm", reason, keep, target, max(floor, target + 0.51), sizes)
    return totals


@dataclass(frozen=True)
class SparseVLMState:
    """What `SparseVLMPolicy.plan` derives for one model."""

    prune_layers: tuple[int, ...]  # decoder layers whose attention decides (the stage acts after each)
    preset: int | None  # official schedule: 64 / 128 / 192 (None: budget schedule)


@register
@dataclass(frozen=True)
class SparseVLMPolicy(Policy):
    """SparseVLM: text raters score the visual tokens at three decoder layers; the dropped tokens' best part is
    clustered and recycled (see the module docstring and docs/specs/sparsevlm.md)."""

    name = "sparsevlm"
    description = "SparseVLM: text-rater attention at 3 LLM layers, top-k + recycled cluster means (in-LLM)"

    schedule: str = Choice(
        "budget", ("budget", "official"), doc="geometric totals meeting keep, or the official 64/128/192 counts"
    )
    prune_layers: tuple[int, ...] | None = Tuple(
        None,
        Int(0, ge=0),
        min_length=1,
        increasing=True,
        none=True,
        doc="decoder layers after which tokens are pruned; None = round(p L / 32) for p in (2, 6, 15)",
    )

    def validate(self) -> None:
        if self.schedule == "official" and self.prune_layers is not None and len(self.prune_layers) != 3:
            raise PolicyOptionError(
                f"sparsevlm: schedule='official' has three stages (one count each); got prune_layers="
                f"{self.prune_layers!r}"
            )

    def _preset(self, keep: Keep) -> int | None:
        if self.schedule != "official":
            return None
        tokens = keep if isinstance(keep, int) else item_budget(keep, 576)
        if tokens not in OFFICIAL_KEPT:
            raise PolicyOptionError(
                f"sparsevlm: schedule='official' exists for 64, 128 and 192 tokens of 576 (keep=64/128/192 or "
                f"0.111/0.222/0.333); keep={keep!r} means {tokens}; use schedule='budget' for any other keep"
            )
        return tokens

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        layers = tuple(self.prune_layers or default_prune_layers(info.n_llm_layers))
        if layers[-1] + 1 >= info.n_llm_layers:
            raise PolicyOptionError(f"sparsevlm: prune layers {layers} leave no layer after the last one")
        if self.schedule == "official" and len(layers) != 3:
            raise PolicyOptionError(
                f"sparsevlm: schedule='official' needs three pruning layers; this {info.n_llm_layers}-layer LLM "
                f"gets {layers}"
            )
        state = SparseVLMState(layers, self._preset(keep))
        return Plan(
            llm_layers=tuple(p + 1 for p in layers),
            llm_signals=(RATERS, *(LLMSignal("rows_from_visual", p) for p in layers)),
            state=state,
        )

    def _totals(self, state: SparseVLMState, keep: Keep, n: int, sizes: list[int], n_layers: int) -> list[int]:
        if state.preset is not None:
            return official_totals(state.preset, n)
        target = sum(item_budget(keep, s) for s in sizes)
        return check_budget(keep, target, n, sizes, state.prune_layers, n_layers)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Exact for both schedules (the counts do not depend on the data)."""
        state = self.plan(info, keep).state
        n = shape.n_content
        totals = self._totals(state, keep, n, [n], info.n_llm_layers)
        stages = tuple(p + 1 for p in state.prune_layers)
        return Nominal(staged(n, totals, stages, info.n_llm_layers, shape.length - n))

    def _rater_slots(self, ctx: LLMStageContext, b: int) -> torch.Tensor:
        """LLM-input slots of sample b's raters (all its text tokens after the last visual one if none is above the
        mean; all its text tokens if none follows the last visual one)."""
        layout0 = ctx.input_layout
        embeds = ctx.signals[RATERS.key][b]
        visual = layout0.visual_slots(b)
        slots = torch.arange(layout0.length, device=visual.device)
        text_mask = layout0.valid[b] & (layout0.item[b] < 0)
        text = (text_mask & (slots > int(visual.max()))).nonzero().flatten()
        if text.numel() == 0:
            text = text_mask.nonzero().flatten()
        raters = text[select_raters(embeds[visual], embeds[text]).to(text.device)]
        return raters if raters.numel() else text

    @differentiable_values()  # recycled cluster means keep their autograd graph (tokenzip.ops.grad)
    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        state: SparseVLMState = ctx.state
        stage = ctx.layer - 1
        index = state.prune_layers.index(stage)
        rows = ctx.signals[LLMSignal("rows_from_visual", stage).key]
        layout = ctx.layout
        out = []
        for b, items in enumerate(ctx.items.per_sample):
            visual = layout.visual_slots(b)
            if not items or visual.numel() == 0:
                out.append(Selection(torch.zeros(0, dtype=torch.long)))
                continue
            raters_lm = self._rater_slots(ctx, b)
            raters = torch.isin(layout.lm_src[b], raters_lm.to(layout.lm_src.device)) & layout.valid[b]
            scores = rows[b][raters.nonzero().flatten()][:, visual].detach().float().mean(0)
            input_visual = int(ctx.input_layout.visual_counts()[b])
            sizes = [it.shape.n_content for it in items]
            total = self._totals(state, ctx.keep, input_visual, sizes, ctx.info.n_llm_layers)[index]
            v = int(visual.numel())
            k = scored_count(v, total)
            if k >= v:
                out.append(Selection(visual))
                continue
            hidden = ctx.hidden_states[b, visual.to(ctx.hidden_states.device)]
            kept, centres, merged, groups = sparsevlm_select(scores, hidden, k)
            dev = visual.device
            keep_slots = torch.cat([visual[kept.to(dev)], visual[centres.to(dev)]])
            values = torch.cat([hidden[kept.to(hidden.device)], merged.to(hidden.dtype)])
            out.append(Selection(keep_slots, values, ordered=True, groups=visual[groups.to(dev)]))
        return out
