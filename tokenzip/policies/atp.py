"""ATP-TF: a training-free adaptation of ATP-LLaVA (arXiv 2412.00447, CVPR 2025).

ATP-LLaVA prunes visual tokens inside the LLM with *trained* modules that predict per-instance, per-layer
thresholds; no official code exists. ATP-TF keeps its structure and replaces the learned thresholds by
statistics of the attention: after layers p (2, 8, 16 of 32; round(p L / 32) otherwise), from that layer's own
q/k, every visual token j gets

    c_j = mean over text rows t (tokens after the last visual token) of A[t, j]          (cross-modal)
    s_j = mean over visual rows i >= j of A[i, j]   (causally de-biased self-modal importance)
    S_j = (s_j / sum s + c_j / sum c) / 2

and the kept set = redundancy set (by S) united with a spatial set (tokens whose ORIGINAL grid coordinates are
multiples of k = round(1 / sqrt(R)) in both axes, per image part / frame), original positions kept.

`schedule="topk"` (default): per stage exactly n_l tokens (the spatial set plus the best other tokens by S),
with n_l geometrically decaying so that the layer-averaged count equals `keep` (`atp_schedule`). Deviation from
the spec's mapping (tokenzip's budget rule): where the bounds 1 <= n_3 <= n_2 <= n_1 stop the last count from
absorbing the rounding, the earlier counts absorb it, so the average stays within half a token of the budget;
a budget more than half a token below the schedule's floor (layers 0..p_1 see every token: on an 8-layer LLM the
prune layers are 0 / 2 / 4 and the floor is N / 8 + 7 / 8, e.g. 18.9 of 144 tokens against keep 0.111's 16)
raises `BudgetError` naming the smallest reachable keep instead of running off budget.
`schedule="adaptive"`: the ATP-like per-instance rule -- the smallest prefix of tokens by S holding a mass
p_l(gamma) (or, `rule="z"`, S_j >= 1/n + beta std(S)) united with the spatial set at rate R_l(gamma) -- needs a
scalar gamma calibrated for the model and keep (`calibrate_gamma`); without one it raises an error. Its counts
vary per instance by design: it meets `keep` on average over the calibration set, not per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, geometric_schedule, infeasible_budget, item_budget
from ..contexts import LLMSignal, LLMStageContext, Plan, Selection
from ..errors import PolicyOptionError
from ..ops.topk import topk_stable
from .base import Choice, Float, Int, Policy, Tuple
from .nominal import Nominal, staged
from .registry import register

OFFICIAL_LAYERS = (2, 8, 16)  # of 32 (tokenzip's starting point; ATP's insertion layers are unpublished)


def atp_scores(rows: torch.Tensor, visual_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
    """S over the visual tokens from head-mean attention.

    rows: [L, L] attention (query row, key column) of one sample; visual_rows: LongTensor [n] sequence
    indices of the visual tokens (ascending); text_rows: LongTensor [m]. Returns S [n] (sums to 1).
    """
    a_vis = rows[visual_rows][:, visual_rows]  # [n (queries), n (keys)]
    n = visual_rows.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=rows.device).tril()  # query i >= key j
    attenders = causal.sum(0).clamp_min(1)
    s = (a_vis * causal).sum(0) / attenders
    c = rows[text_rows][:, visual_rows].mean(0) if text_rows.numel() else torch.zeros_like(s)
    s_hat = s / s.sum().clamp_min(1e-30)
    c_hat = c / c.sum().clamp_min(1e-30) if c.sum() > 0 else torch.zeros_like(c)
    return 0.5 * (s_hat + c_hat)


def spatial_mask(coords: torch.Tensor, rate: float) -> torch.Tensor:
    """Tokens whose grid (row, col) are both multiples of k = round(1 / sqrt(rate)); rate 0 disables.

    coords: LongTensor [n, 4] (part, frame, row, col) of each visual token (-1 for none). Returns BoolTensor [n].
    """
    if rate <= 0:
        return torch.zeros(coords.shape[0], dtype=torch.bool, device=coords.device)
    k = max(1, round(1 / math.sqrt(rate)))
    return (coords[:, 2] >= 0) & (coords[:, 2] % k == 0) & (coords[:, 3] % k == 0)


def mass_prefix(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Indices of the smallest prefix of tokens by descending score (ties -> lower index) with cumulative
    score >= mass. scores sum to 1."""
    order = topk_stable(scores, scores.numel())
    cumulative = torch.cumsum(scores[order].double(), 0)
    count = int((cumulative < mass - 1e-12).sum()) + 1
    return order[: min(count, scores.numel())]


def clamp_count(keep: torch.Tensor, scores: torch.Tensor, spatial: torch.Tensor, n_min: int, n_max: int):
    """Bring a kept mask [n] to between n_min and n_max tokens: add the highest-S missing tokens, or drop
    the lowest-S non-spatial tokens first, then the lowest-S spatial ones. Returns the mask."""
    keep = keep.clone()
    count = int(keep.sum())
    if count < n_min:
        missing = (~keep).nonzero().flatten()
        keep[missing[topk_stable(scores[missing], n_min - count)]] = True
    elif count > n_max:
        excess = count - n_max
        for group in (keep & ~spatial, keep & spatial):
            if excess == 0:
                break
            idx = group.nonzero().flatten()
            drop = idx[topk_stable(-scores[idx], min(excess, idx.numel()))]
            keep[drop] = False
            excess -= drop.numel()
    return keep


def atp_select(
    scores: torch.Tensor,
    spatial: torch.Tensor,
    count: int | None = None,
    mass: float | None = None,
    z_beta: float | None = None,
    n_min: int = 1,
) -> torch.Tensor:
    """ATP-TF's selection on one sample's visual tokens. Returns kept indices, ascending.

    `count` (topk schedule): exactly `count` tokens = the spatial set plus the best other tokens by S (the
    spatial set alone is cut by S if it exceeds the count). `mass` (adaptive, mass rule) or `z_beta`
    (adaptive, z rule): redundancy set united with the spatial set, at least n_min tokens.
    """
    n = scores.numel()
    keep = spatial.clone()
    if count is not None:
        others = (~spatial).nonzero().flatten()
        extra = others[topk_stable(scores[others], max(0, count - int(spatial.sum())))]
        keep[extra] = True
        keep = clamp_count(keep, scores, spatial, count, count)
    else:
        if mass is not None:
            keep[mass_prefix(scores, mass)] = True
        else:
            keep |= scores >= 1.0 / n + z_beta * scores.std(unbiased=False)
        keep = clamp_count(keep, scores, spatial, min(n_min, n), n)
    return keep.nonzero().flatten()


def stage_widths(prune_layers: tuple[int, ...], n_layers: int) -> list[int]:
    """[w_0, ..., w_S]: layers 0..p_1 (w_0 = p_1 + 1) see every token, then w_i = p_{i+1} - p_i layers see n_i,
    the last w_S = L - 1 - p_S layers n_S."""
    p = prune_layers
    return [p[0] + 1, *[p[i + 1] - p[i] for i in range(len(p) - 1)], n_layers - 1 - p[-1]]


def atp_floor(n_visual: int, prune_layers: tuple[int, ...], n_layers: int) -> float:
    """The smallest layer average the schedule reaches: every token in the first w_0 layers, one token after."""
    w = stage_widths(prune_layers, n_layers)
    return (w[0] * n_visual + sum(w[1:])) / n_layers


def atp_schedule(target: float, n_visual: int, prune_layers: tuple[int, ...], n_layers: int) -> list[int]:
    """Tokens kept after each pruning layer so the layer-averaged count equals `target` (counts >= 1).

    Layers 0..p1 see all n; w_i = p_{i+1} - p_i layers then see n_i; n_i = round(n lambda^i) with lambda from
    w_0 n + sum_i w_i max(1, n lambda^i) = L target (no stage keeps fewer than one token); the last count
    absorbs the rounding. Where the bounds 1 <= n_S <= ... <= n_1 <= n stop the last count from absorbing it
    (shallow LLMs, budgets near the floor), the earlier counts take the rest, last to first, so the layer average
    stays within half a token of `target` whenever `target` >= `atp_floor` - 1/2 (tokenzip's budget rule).
    """
    widths = stage_widths(prune_layers, n_layers)
    return geometric_schedule(n_layers * target, n_visual, widths, floor=1, spread=True)


def check_atp_budget(
    keep: Keep, target: float, n_visual: int, sizes: list[int], prune_layers: tuple[int, ...], n_layers: int
) -> None:
    """`BudgetError` naming the smallest reachable keep when `target` lies more than half a token below the
    schedule's floor (`atp_floor`): the first p_1 + 1 layers see every token."""
    floor = atp_floor(n_visual, prune_layers, n_layers)
    if target < floor - 0.5:
        reason = (
            f"pruning after layers {prune_layers} of {n_layers}: layers 0..{prune_layers[0]} see all {n_visual} "
            "tokens; pass earlier prune_layers"
        )
        raise infeasible_budget("atp", reason, keep, target, floor, sizes)


def adaptive_parameters(gamma: float, p0: Iterable[float], r0: Iterable[float]) -> tuple[list[float], list[float]]:
    """p_l(gamma) = clip(1 - (1 - p_l) / gamma, 0.05, 0.999), R_l(gamma) = min(1, gamma R_l)."""
    masses = [min(0.999, max(0.05, 1 - (1 - p) / gamma)) for p in p0]
    rates = [min(1.0, gamma * r) for r in r0]
    return masses, rates


def default_prune_layers(n_layers: int) -> tuple[int, ...]:
    return tuple(round(p * n_layers / 32) for p in OFFICIAL_LAYERS)


@register
@dataclass(frozen=True)
class ATPPolicy(Policy):
    """ATP-TF: a training-free ATP-LLaVA -- after three decoder layers keep the union of the tokens that survive the
    self- and cross-modal redundancy scores and a spatial sampling lattice (see the module docstring)."""

    name = "atp"
    description = "ATP-TF: training-free ATP-LLaVA -- self+cross-modal redundancy U spatial sampling at 3 LLM layers."

    schedule: str = Choice(
        "topk", ("topk", "adaptive"), doc="exact geometric counts, or the calibrated per-instance rule"
    )
    prune_layers: tuple[int, ...] | None = Tuple(
        None,
        Int(0, ge=0),
        min_length=1,
        increasing=True,
        none=True,
        doc="decoder layers after which tokens are pruned; None = round(p L / 32) for p in (2, 8, 16)",
    )
    p: tuple[float, ...] = Tuple(
        (0.90, 0.75, 0.55), Float(0.5, gt=0, le=1), min_length=1, doc="adaptive mass rule: mass per pruning layer"
    )
    spatial_rates: tuple[float, ...] = Tuple(
        (1 / 16, 1 / 36, 0.0),
        Float(0.0, ge=0, le=1),
        min_length=1,
        doc="spatial sampling rate R per pruning layer (lattice stride round(1 / sqrt(R)); 0 disables)",
    )
    gamma: float | None = Float(None, gt=0, none=True, doc="adaptive: calibrated scale of p and R (calibrate_gamma)")
    rule: str = Choice("mass", ("mass", "z"), doc="adaptive redundancy rule: score mass p, or S >= 1/n + z_beta std")
    z_beta: float = Float(0.5, doc="adaptive z rule: the std multiple")
    n_min: int = Int(1, ge=1, doc="adaptive: fewest tokens kept per stage")

    def validate(self) -> None:
        o = self.options
        layers = o["prune_layers"]
        n_stages = len(layers) if layers is not None else len(OFFICIAL_LAYERS)
        for name in ("p", "spatial_rates"):
            if len(o[name]) != n_stages:
                raise PolicyOptionError(
                    f"atp: {name}={o[name]!r} needs one value per pruning layer ({n_stages}: prune_layers="
                    f"{layers if layers is not None else OFFICIAL_LAYERS})"
                )
        if o["schedule"] == "adaptive" and o["gamma"] is None:
            raise PolicyOptionError(
                "atp: schedule='adaptive' needs a gamma calibrated for this model and keep "
                "(tokenzip.policies.atp.calibrate_gamma); use schedule='topk' for an exact budget without one"
            )
        unused = []  # options the chosen schedule / rule would silently ignore
        if o["schedule"] == "topk":
            unused = [k for k in ("p", "gamma", "rule", "z_beta", "n_min") if o[k] != self.option_defaults()[k]]
        elif o["rule"] == "mass" and o["z_beta"] != self.option_defaults()["z_beta"]:
            unused = ["z_beta"]
        elif o["rule"] == "z" and o["p"] != self.option_defaults()["p"]:
            unused = ["p"]
        if unused:
            raise PolicyOptionError(
                f"atp: option(s) {unused} are not used with schedule={o['schedule']!r}, rule={o['rule']!r} "
                "(p, gamma, rule, z_beta and n_min belong to schedule='adaptive'; z_beta to rule='z', p to "
                "rule='mass'); drop them or change the schedule / rule"
            )

    def default_positions(self, info: ModelInfo) -> str:
        return "original"  # ATP keeps original position ids

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        """Plan.state: the pruning layers (a tuple of 0-based decoder layers; each stage acts after one)."""
        layers = tuple(self.prune_layers or default_prune_layers(info.n_llm_layers))
        if layers[-1] + 1 >= info.n_llm_layers:
            raise PolicyOptionError(f"atp: prune layers {layers} leave no layer after the last one")
        return Plan(
            llm_layers=tuple(p + 1 for p in layers),
            llm_signals=tuple(LLMSignal("rows_from_visual", p) for p in layers),
            state=layers,
        )

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """The topk schedule (exact); adaptive schedules vary per instance and are priced at the topk counts."""
        prune = self.plan(info, keep).state
        n = shape.n_content
        target = item_budget(keep, n)
        if self.schedule == "topk":
            check_atp_budget(keep, target, n, [n], prune, info.n_llm_layers)
        counts = atp_schedule(target, n, prune, info.n_llm_layers)
        stages = tuple(p + 1 for p in prune)
        return Nominal(staged(n, counts, stages, info.n_llm_layers, shape.length - n))

    def _coords(self, ctx: LLMStageContext, b: int, visual: torch.Tensor) -> torch.Tensor:
        """Original (part, frame, row, col) of each visual slot of sample b (unique per item and grid)."""
        layout = ctx.layout
        coords = torch.full((visual.numel(), 4), -1, dtype=torch.long)
        for j, item in enumerate(ctx.items.per_sample[b]):
            in_item = layout.item[b, visual] == j
            local = (layout.orig[b, visual[in_item]] - item.start).cpu()
            coords[in_item.cpu()] = item.shape.coords()[local]
        return coords.to(visual.device)

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        stage = ctx.layer - 1
        prune = ctx.state
        index = prune.index(stage)
        rows = ctx.signals[LLMSignal("rows_from_visual", stage).key]
        layout = ctx.layout
        adaptive = self.schedule == "adaptive"
        if adaptive:
            masses, rates = adaptive_parameters(self.gamma, self.p, self.spatial_rates)
        else:
            rates = list(self.spatial_rates)
        out = []
        for b, items in enumerate(ctx.items.per_sample):
            visual = layout.visual_slots(b)
            if not items or visual.numel() == 0:
                out.append(Selection(torch.zeros(0, dtype=torch.long)))
                continue
            positions = torch.arange(layout.length, device=visual.device)
            text = (layout.valid[b] & (positions > int(visual.max()))).nonzero().flatten()
            scores = atp_scores(rows[b], visual, text)
            spatial = spatial_mask(self._coords(ctx, b, visual), rates[index])
            if adaptive:
                mass = masses[index] if self.rule == "mass" else None
                z = self.z_beta if self.rule == "z" else None
                kept = atp_select(scores, spatial, mass=mass, z_beta=z, n_min=self.n_min)
            else:
                input_visual = int((ctx.input_layout.valid[b] & ctx.input_layout.visual[b]).sum())
                sizes = [it.shape.n_content for it in items]
                target = sum(item_budget(ctx.keep, n) for n in sizes)
                check_atp_budget(ctx.keep, target, input_visual, sizes, prune, ctx.info.n_llm_layers)
                counts = atp_schedule(target, input_visual, prune, ctx.info.n_llm_layers)
                kept = atp_select(scores, spatial, count=min(counts[index], visual.numel()))
            out.append(Selection(visual[kept]))
        return out


def calibrate_gamma(
    run_prefill: Callable[[float], float],
    target: float,
    lo: float = 1e-3,
    hi: float = 1e3,
    steps: int = 30,
) -> float:
    """Bisect log(gamma) in [lo, hi] until the mean layer-averaged visual count equals `target`.

    run_prefill(gamma) must return the mean layer-averaged visual count over a calibration set with
    `schedule="adaptive", gamma=gamma` (e.g. from `patch.stats`); the count is non-decreasing in gamma.
    """
    log_lo, log_hi = math.log(lo), math.log(hi)
    for _ in range(steps):
        mid = (log_lo + log_hi) / 2
        if run_prefill(math.exp(mid)) < target:
            log_lo = mid
        else:
            log_hi = mid
    return math.exp((log_lo + log_hi) / 2)
