"""HoliTom (arXiv 2505.21334, NeurIPS 2025; official code cokeshao/HoliTom @ e9b2972), training-free.

Outer stage (before the LLM, per video): a global dynamic programme splits the frames into segments that
maximise the number of "static" tokens saved (a token is static over a segment when its cosine similarity
between consecutive frames stays > tau); inside a segment the static positions are averaged over time and
reduced by density-peak (DPC-kNN) clustering (merged token = beta * centre + (1 - beta) * mean of members), and
every frame keeps its highest-attention dynamic tokens; single frames keep their top-attention tokens. The
retain ratio is rescaled so the total meets the budget. Output per segment: [static merged tokens, frame s
dynamic tokens, ..., frame e dynamic tokens].

Inner stage (optional, default on): before decoder layer K (18 of 28, round(18 L / 28) otherwise) the visual
span keeps the top round(n (1 - r)) tokens by the last prompt token's attention at layer K - 1; every other
token is averaged, one after the other in ascending order, into its most similar kept token
(h <- (h + h_q) / 2). Kept tokens keep their positions.

`keep` is the layer-averaged budget: rho (the fraction entering the LLM) = keep L / (K + (L - K)(1 - r));
tau = 0.65 when rho <= 0.10, else 0.80. Deviation from the spec's mapping (tokenzip's budget rule): the inner stage
does not keep round(n (1 - r)) of the span but the content count that makes the layer average meet the budget
given what the outer stage actually let through, n_K = round((L T - K n_0) / (L - K)) in [1, n_0] (T = the sum
of the item budgets, n_0 = the content tokens entering layer K): the content tokens keep their top n_K by weight
and the others are averaged into them, while the structural tokens of the span (OneVision's newlines) are kept
as they are (official: they are ranked and merged like content), so that the counts are exact. When the outer
count at the mapped rho is too large for any n_K to reach the budget (K n_0 + L - K > L (T + 1): per-frame ceilings
of a short video), rho is lowered (rho <- rho cap / n_0 until the outer count fits; tau stays that of the mapped
rho). With r = 0.5 fixed the ceilings per frame / image and the newlines in the span overshot keep by 4-5 %;
with a 576-token LLaVA image the solved n_K is within two tokens of round(n_0 / 2) (keep 0.111, L 32: 78 -> 37
instead of 39). An explicit `rho` and
`image_mode="passthrough"` keep the official fixed r (the layer average then follows them, not keep; `patch.stats`
marks it off budget). A budget below what the first K layers allow even at one outer token per frame raises
`BudgetError` naming the smallest reachable keep.

Images (tokenzip adaptation; the official outer stage passes them through): the single-frame case, top
ceil(N rho) tokens by attention in raster order (`image_mode="topk"`), or untouched (`"passthrough"`,
official). Qwen2.5-VL videos use the temporal slices as frames and keep original M-RoPE positions; LLaVA-1.5
and OneVision compact positions at the outer stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, infeasible_budget, item_budget
from ..contexts import LLMSignal, LLMStageContext, Plan, PreLLMItem, Selection, VisionSignal
from ..errors import PolicyOptionError
from ..ops.grad import differentiable_values
from ..ops.topk import topk_stable
from .base import Bool, Choice, Float, Int, Policy
from .common import structural_to_keep
from .nominal import Nominal, staged
from .registry import register


# ------------------------------------------------------------------------------------------ outer stage
def temporal_similarity(frames: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token with the same position in the next frame: [F - 1, N] (float32)."""
    unit = frames.float() / frames.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit[:-1] * unit[1:]).sum(-1)


def segment_frames(sim: torch.Tensor, tau: float, max_window: int = 1024) -> tuple[list[tuple[int, int]], float]:
    """Global DP over frames: segments (s, e) maximising the static-token saving, and that saving R.

    A token is static over [s, e] iff sim[t] > tau for all t in [s, e - 1]; the window saves
    (#static)(e - s) tokens. best[i] = max(best[i - 1], max_L best[i - L] + gain(i - L + 1, i)) with strict >
    comparisons in increasing L (ties prefer the single frame, then the shorter window).
    """
    n_frames = sim.shape[0] + 1
    static = sim > tau
    best = [0.0] * (n_frames + 1)  # best[i + 1] = optimum over frames 0..i; best[0] = empty prefix
    start = list(range(n_frames))
    for i in range(n_frames):
        best[i + 1], start[i] = best[i], i
        run = torch.ones(static.shape[1], dtype=torch.bool, device=static.device)
        for length in range(2, min(i + 1, max_window) + 1):
            s = i - length + 1
            run &= static[s]  # static over pairs s .. i - 1
            value = best[s] + float(int(run.sum()) * (length - 1))
            if value > best[i + 1]:
                best[i + 1], start[i] = value, s
    segments, i = [], n_frames - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1], float(torch.tensor(best[n_frames], dtype=torch.float32))


def rescaled_ratio(rho: float, n_frames: int, n_tokens: int, saved: float) -> float:
    """rho' = min(rho / ((F N - R) / (F N)), 1) in Python (double) arithmetic, in that order, as the official
    code does; a float32 evaluation moves ceil(N rho') by one token when N rho' is an integer in double."""
    total = n_frames * n_tokens
    return min(rho / ((total - saved) / total), 1.0)


def dpc_knn_merge(
    points: torch.Tensor, centres_wanted: int, knn: int, beta: float | None, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours; returns (centre indices ascending, merged [k, d]).

    distance = ||z_i - z_j|| / sqrt(d); density_i = exp(-mean of the k smallest squared distances, self
    included) (+ noise); delta_i = distance to the nearest denser point (max distance for the densest); centres
    = the top `centres_wanted` of density * delta; others join their nearest centre (ties -> lower index);
    merged = beta * centre + (1 - beta) * mean(members) (centre alone without members; beta None: the plain
    mean of centre and members). Merged values are differentiable in `points` (float64 stays float64); the
    clustering itself is computed without gradient.
    """
    n, d = points.shape
    if centres_wanted <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.long), points[:0]
    z = points.to(torch.promote_types(points.dtype, torch.float32))
    zd = z.detach()
    dist = torch.cdist(zd, zd) / math.sqrt(d)
    k = max(1, min(knn, n))
    density = torch.exp(-(torch.sort(dist**2, dim=1).values[:, :k]).mean(1))
    if noise is not None:
        density = density + noise.to(density.device)
    denser = density[None, :] > density[:, None]  # [i, j]: j denser than i
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).min(1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = torch.sort(topk_stable(density * delta, min(centres_wanted, n))).values
    is_centre = torch.zeros(n, dtype=torch.bool, device=z.device)
    is_centre[centres] = True
    members = (~is_centre).nonzero().flatten()
    merged = z[centres].clone()
    if members.numel():
        assign = dist[members][:, centres].argmin(1)
        counts = torch.bincount(assign, minlength=centres.numel()).to(z.dtype)[:, None]
        # members are summed in ascending order (index_add_ on CPU), in the official expression order
        if beta is None:  # mean over [centre, members...]: the centre is the first term of the sum
            merged = merged.clone().index_add_(0, assign, z[members]) / (1 + counts)
        else:
            means = torch.zeros_like(merged).index_add_(0, assign, z[members]) / counts.clamp_min(1)
            merged = torch.where(counts > 0, beta * merged + (1 - beta) * means, merged)
    return centres, merged.to(points.dtype)


def holitom_outer(
    frames: torch.Tensor,
    attention: torch.Tensor,
    rho: float,
    tau: float,
    beta: float | None = 0.6,
    knn: int = 7,
    max_window: int = 1024,
    noise: callable | None = None,
    segmentation: tuple[list[tuple[int, int]], float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """HoliTom's outer stage on one video. frames: [F, N, d] features; attention: [F, N].

    Returns (representatives [n_out, 2] = (frame, position) each output token stands at, values [n_out, d],
    segments). `noise(n)` gives the density tie-breaking noise of a clustering call (None: no noise). The values
    are differentiable in `frames` (segmentation, clustering and top-k are computed without gradient).
    `segmentation`: (segments, saved) of `segment_frames` for these frames and tau, when already computed.
    """
    n_frames, n_tokens, _ = frames.shape
    sim = temporal_similarity(frames.detach()) if n_frames > 1 else frames.new_zeros(0, n_tokens)
    if segmentation is not None:
        segments, saved = segmentation
    else:
        segments, saved = segment_frames(sim, tau, max_window) if n_frames > 1 else ([(0, 0)], 0.0)
    ratio = rescaled_ratio(rho, n_frames, n_tokens, saved)
    static = sim > tau
    reps: list[torch.Tensor] = []
    values: list[torch.Tensor] = []

    def frame_topk(t: int, positions: torch.Tensor, count: int) -> None:
        chosen = torch.sort(positions[topk_stable(attention[t, positions], count)]).values
        reps.append(torch.stack([torch.full_like(chosen, t), chosen], 1))
        values.append(frames[t, chosen])

    for s, e in segments:
        if s == e:
            frame_topk(s, torch.arange(n_tokens, device=frames.device), math.ceil(n_tokens * ratio))
            continue
        is_static = static[s:e].all(0)
        static_pos = is_static.nonzero().flatten()
        z = frames[s : e + 1, static_pos].to(torch.promote_types(frames.dtype, torch.float32)).mean(0).to(frames.dtype)
        k_static = round(static_pos.numel() * ratio)
        draw = noise(z.shape[0]) if noise is not None and k_static > 0 else None  # drawn only when clustering
        centres, merged = dpc_knn_merge(z, k_static, min(knn, k_static), beta, draw)
        reps.append(torch.stack([torch.full_like(centres, s), static_pos[centres]], 1))
        values.append(merged)
        dynamic = (~is_static).nonzero().flatten()
        k_dynamic = math.ceil(dynamic.numel() * ratio)
        for t in range(s, e + 1):
            frame_topk(t, dynamic, k_dynamic)
    return torch.cat(reps), torch.cat(values), segments


def outer_count(segments: list[tuple[int, int]], static: torch.Tensor, n_tokens: int, ratio: float) -> int:
    """Tokens `holitom_outer` emits for `segments` at the rescaled ratio `ratio` (static: [F - 1, N] static pairs):
    ceil(N ratio) per single frame; round(n_static ratio) + (e - s + 1) ceil(n_dynamic ratio) per window."""
    total = 0
    for s, e in segments:
        n_static = 0 if s == e else int(static[s:e].all(0).sum())
        total += (0 if s == e else round(n_static * ratio)) + (e - s + 1) * math.ceil((n_tokens - n_static) * ratio)
    return total


def image_count(n_tokens: int, rho: float) -> int:
    """Tokens an image keeps: ceil(N rho), with N rho rounded to 9 decimals first so that a ratio derived from an
    integer budget (rho = k / N) gives k, not k + 1 from a float artefact (tokenzip adaptation: the official outer
    stage passes images through)."""
    return math.ceil(round(n_tokens * rho, 9))


# ------------------------------------------------------------------------------------------ inner stage
def inner_merge(hidden: torch.Tensor, weights: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top round(n (1 - r)) tokens by `weights`; fold every other token, in ascending order, into its
    most similar kept token by h <- (h + h_q) / 2 (similarities computed once, before any update).

    hidden: [n, D]; weights: [n]. Returns (kept indices ascending, their values [k, D]). A kept token that
    absorbs q_1 < ... < q_m ends as h / 2^m + sum_i h_{q_i} / 2^(m - i + 1). The values are differentiable in
    `hidden` (the assignment is computed without gradient).
    """
    n = hidden.shape[0]
    count = max(1, round(n * (1 - r)))
    top = topk_stable(weights, count)  # descending weight: argmax ties go to the higher-weight token
    is_top = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    is_top[top] = True
    rest = (~is_top).nonzero().flatten()
    work = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(work)
    values = h[top].clone()
    if rest.numel():
        unit = h.detach() / h.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        assign = (unit[rest] @ unit[top].T).argmax(1)  # [n_rest] index into `top`
        m = torch.bincount(assign, minlength=top.numel())
        order = torch.argsort(assign * n + rest, stable=True)  # grouped by target, ascending source index
        sorted_assign = assign[order]
        group_start = torch.cumsum(m, 0) - m
        position = torch.arange(rest.numel(), device=h.device) - group_start[sorted_assign]
        exponent = (m[sorted_assign] - position).to(work)  # m - i + 1 with i = position + 1
        contrib = h[rest[order]] * torch.pow(0.5, exponent)[:, None]
        values = values * torch.pow(0.5, m.to(work))[:, None]
        values.index_add_(0, sorted_assign, contrib)
    ascending = torch.argsort(top)
    return top[ascending], values[ascending].to(hidden.dtype)


# ------------------------------------------------------------------------------------------ keep mapping
def holitom_ratio(keep_fraction: float, n_layers: int, layer: int, r: float, inner: bool) -> tuple[float, float]:
    """(rho, r) realising a layer-averaged fraction `keep_fraction` (see the module docstring)."""
    if not inner:
        return keep_fraction, 0.0
    rho = keep_fraction * n_layers / (layer + (n_layers - layer) * (1 - r))
    if rho > 1:
        r = min(r, max(0.0, 1 - (keep_fraction * n_layers - layer) / (n_layers - layer)))
        rho = 1.0
    return rho, r


def default_inner_layer(n_layers: int) -> int:
    """round(18 L / 28): 18 of 28 (OneVision-7B, Qwen2.5-VL-7B), 15 of 24, 21 of 32, 23 of 36."""
    return round(18 * n_layers / 28)


@dataclass(frozen=True)
class HoliTomState:
    """What `HoliTomPolicy.plan` derives for one model."""

    n_llm_layers: int
    layer: int  # decoder layer K of the inner merge
    signal: VisionSignal  # the outer stage's attention scores
    noise: str  # density tie noise: "off", "global" or "seeded"


@register
@dataclass(frozen=True)
class HoliTomPolicy(Policy):
    """HoliTom: outside the LLM, temporal segmentation of a video with static tokens merged per segment and
    dynamic ones clustered per frame (images: attention top-k); inside it, a merge at decoder layer K."""

    name = "holitom"
    description = "HoliTom: temporal DP segmentation + static clustering + dynamic top-k; inner LLM merge (video)."

    rho: float | None = Float(
        None, gt=0, le=1, none=True, doc="fraction entering the LLM (official presets); None = derived from keep"
    )
    tau: float | None = Float(
        None, ge=-1, le=1, none=True, doc="static-token cosine threshold; None = 0.65 if rho <= 0.10 else 0.80"
    )
    beta: float | None = Float(
        0.6, ge=0, le=1, none=True, doc="merged = beta centre + (1 - beta) mean; None = plain mean"
    )
    D: int = Int(0, ge=0, doc="contextual clustering of dynamic tokens (only 0, the official default)")
    knn: int = Int(7, ge=1, doc="neighbours of the DPC-kNN density")
    max_window: int = Int(1024, ge=2, doc="longest segment of the temporal DP (frames)")
    inner: bool = Bool(True, doc="run the inner-LLM merge")
    inner_layer: int | None = Int(
        None, ge=1, none=True, doc="decoder layer K of the inner merge; None = round(18 L / 28)"
    )
    inner_r: float = Float(
        0.5, ge=0, lt=1, doc="inner merge ratio r: sets rho from keep (the count is then solved); fixed with rho"
    )
    tie_noise: str | None = Choice(
        None, (None, "seeded", "global", "off"), doc="density tie noise; None = off on Qwen2.5-VL, else seeded"
    )
    noise_seed: int = Int(0, ge=0, doc="seed of tie_noise='seeded'")
    noncausal_km1: bool = Bool(False, doc="layer K - 1 attends non-causally for the inner scores (official option)")
    image_mode: str = Choice("topk", ("topk", "passthrough"), doc="images: top ceil(N rho), or untouched (official)")

    def validate(self) -> None:
        o = self.options
        if o["D"] != 0:
            raise PolicyOptionError(
                "holitom: D > 0 (contextual clustering of dynamic tokens) is not implemented: its merge rule is "
                "unverified and no official preset uses it; D must be 0"
            )
        unused = []  # options another option's value would silently ignore
        if not o["inner"]:
            unused += [k for k in ("inner_layer", "inner_r", "noncausal_km1") if o[k] != self.option_defaults()[k]]
        if o["tie_noise"] in ("global", "off") and o["noise_seed"] != self.option_defaults()["noise_seed"]:
            unused.append("noise_seed")
        if unused:
            raise PolicyOptionError(
                f"holitom: option(s) {unused} are not used with inner={o['inner']!r}, tie_noise={o['tie_noise']!r} "
                "(inner_layer, inner_r and noncausal_km1 need inner=True; noise_seed needs tie_noise 'seeded' or "
                "None); drop them"
            )

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        layer = self.inner_layer or default_inner_layer(info.n_llm_layers)
        if self.inner and not 1 <= layer < info.n_llm_layers:
            raise PolicyOptionError(f"holitom: inner_layer={layer} is outside 1..{info.n_llm_layers - 1}")
        signal = VisionSignal("received", info.vision_feature_layer)
        noise = self.tie_noise or ("off" if info.vision_windowed else "seeded")  # the released Qwen port: none
        state = HoliTomState(info.n_llm_layers, layer, signal, noise)
        inner = self.inner
        return Plan(
            state=state,
            pre_llm=True,
            llm_layers=(layer,) if inner else (),
            vision_signals=(signal,),
            llm_signals=(LLMSignal("last_row", layer - 1),) if inner else (),
            llm_structural=True,
            llm_keep_positions=True,
            noncausal_layers=(layer - 1,) if inner and self.noncausal_km1 else (),
        )

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Outer: ceil(N_frame rho) per frame (no static tokens assumed: the DP saves nothing) or ceil(N rho) for an
        image (+ its newlines, every row assumed kept), rho lowered by `_fit_rho` when the inner stage could not
        reach the budget from that count; inner: the structural tokens + the content count `_inner_count` solves
        from the outer one (round(n (1 - r)) of the span with an explicit `rho`)."""
        state: HoliTomState = self.plan(info, keep).state
        rho, _, r = self._ratios(state, keep, shape.n_content)
        cap = self._outer_cap(state, keep, shape.n_content)
        if shape.modality == "video":
            part = shape.parts[0]
            per_frame = part.rows * part.cols
            singles = [(f, f) for f in range(part.frames)]
            no_static = torch.zeros(max(part.frames - 1, 0), per_frame, dtype=torch.bool)
            rho = self._fit_rho(
                state, keep, shape.n_content, rho, cap, lambda x: outer_count(singles, no_static, per_frame, x)
            )
            outer = part.frames * math.ceil(per_frame * rho) + shape.trailing
        elif self.image_mode == "passthrough":
            outer = shape.length
        else:
            outer = self._image_keep(shape.n_content, rho, cap) + (shape.length - shape.n_content)
        if not self.inner:
            return Nominal([outer] * info.n_llm_layers)
        if not self._solves_inner():
            inner = max(1, round(outer * (1 - r)))
        else:
            structural = shape.length - shape.n_content if shape.modality != "video" else shape.trailing
            n0 = outer - structural
            target = item_budget(keep, shape.n_content)
            inner = structural + self._inner_count(state, keep, target, n0, [shape.n_content])
        return Nominal(staged(outer, [inner], (state.layer,), info.n_llm_layers, 0))

    def _outer_cap(self, state: HoliTomState, keep: Keep, n_content: int) -> int | None:
        """The most content tokens the outer stage may let through for the solved inner count to reach the item's
        budget T within one token: K n_0 + (L - K) <= L (T + 1) (None: no cap, the inner count is not solved)."""
        if not (self.inner and self._solves_inner()):
            return None
        n_layers, layer = state.n_llm_layers, state.layer
        target = item_budget(keep, n_content)
        return (n_layers * (target + 1) - (n_layers - layer)) // layer

    def _fit_rho(self, state: HoliTomState, keep: Keep, n_content: int, rho: float, cap: int | None, count_of) -> float:
        """rho, or a lower ratio when `count_of(rho)` (the outer count) exceeds `cap`: rho <- rho cap / count until
        it fits (the per-frame ceilings of a short video can push the outer count past what the inner stage can
        bring back to the budget). Raises `BudgetError` when even the smallest outer count does not fit."""
        if cap is None:
            return rho
        for _ in range(64):
            count = count_of(rho)
            if count <= cap:
                return rho
            rho = rho * cap / count if cap > 0 else 0.0
            if rho <= 0:
                break
        floor = count_of(1e-12)  # the smallest outer count (one token per frame / dynamic run)
        if floor <= cap:
            return 1e-12
        n_layers, layer = state.n_llm_layers, state.layer
        reason = (
            f"the first {layer} of {n_layers} layers see at least the {floor} tokens the outer stage keeps; pass a "
            "later inner_layer or inner=False"
        )
        raise infeasible_budget(
            "holitom",
            reason,
            keep,
            item_budget(keep, n_content),
            (layer * floor + n_layers - layer) / n_layers,
            [n_content],
        )

    @staticmethod
    def _image_keep(n_content: int, rho: float, cap: int | None) -> int:
        """ceil(N rho) image tokens, at most `cap` (and at least 1)."""
        count = image_count(n_content, rho)
        return count if cap is None else max(1, min(count, cap))

    def _solves_inner(self) -> bool:
        """Whether the inner count is solved for `keep` (not with an explicit `rho` or image_mode="passthrough",
        which follow the official fixed r and let the layer average follow them, not keep)."""
        return self.rho is None and self.image_mode == "topk"

    def _inner_count(self, state: HoliTomState, keep: Keep, target: int, n0: int, sizes: list[int]) -> int:
        """Content tokens the inner stage keeps so that the layer average (K layers of n0, L - K of the result)
        meets `target`: round((L target - K n0) / (L - K)) within [1, n0] (tokenzip: the fixed r = inner_r
        misses the budget when the outer stage overshoots it -- ceilings per frame, newlines in the span).
        Raises `BudgetError` when even one token would overshoot `target` by more than one token per item."""
        if n0 <= 0:
            return 0
        n_layers, layer = state.n_llm_layers, state.layer
        count = min(n0, max(1, round((n_layers * target - layer * n0) / (n_layers - layer))))
        average = (layer * n0 + (n_layers - layer) * count) / n_layers
        if average - target > len(sizes):
            reason = (
                f"the first {layer} of {n_layers} layers see the {n0} tokens the outer stage kept; pass a later "
                "inner_layer or inner=False"
            )
            raise infeasible_budget("holitom", reason, keep, target, average, sizes)
        return count

    def _fraction(self, keep: Keep, n_content: int) -> float:
        return item_budget(keep, n_content) / n_content

    def _ratios(self, state: HoliTomState, keep: Keep, n_content: int) -> tuple[float, float, float]:
        """(rho, tau, inner r) for an item of n_content tokens."""
        rho, r = holitom_ratio(
            self._fraction(keep, n_content),
            state.n_llm_layers,
            state.layer,
            self.inner_r,
            self.inner,
        )
        if self.rho is not None:
            rho = self.rho
        tau = self.tau if self.tau is not None else (0.65 if rho <= 0.10 else 0.80)
        return rho, tau, r

    def _noise(self, mode: str):
        """The density tie noise of `mode` ("off", "global" or "seeded"), a function n -> [n] noise, or None."""
        if mode == "off":
            return None
        if mode == "global":
            return lambda n: torch.rand(n) * 1e-6
        seed = self.noise_seed
        return lambda n: torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1e-6

    # ------------------------------------------------------------------------------------------ outer
    @differentiable_values()  # merged values keep their autograd graph
    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        shape = ctx.item.shape
        video = ctx.item.modality == "video"
        if not video and self.image_mode == "passthrough":
            return Selection(ctx.available, ordered=True)
        state: HoliTomState = ctx.state
        rho, tau, _ = self._ratios(state, ctx.keep, shape.n_content)
        dev = ctx.embeds.device
        scores = ctx.signals[state.signal.key]
        content = ctx.content_available
        if video:
            part = shape.parts[0]
            per_frame = part.rows * part.cols
            frames = ctx.embeds[content.to(dev)].reshape(part.frames, per_frame, -1)
            attention = scores[content.to(dev)].reshape(part.frames, per_frame)
            segmentation, cap = None, self._outer_cap(state, ctx.keep, shape.n_content)
            if cap is not None and part.frames > 1:  # lower rho if the inner stage could not reach the budget
                static = temporal_similarity(frames.detach())
                segmentation = segment_frames(static, tau, self.max_window)
                static = static > tau
            else:
                static = torch.zeros(0, per_frame, dtype=torch.bool, device=dev)
            segments, saved = segmentation or ([(0, 0)], 0.0)
            rho = self._fit_rho(
                state,
                ctx.keep,
                shape.n_content,
                rho,
                cap,
                lambda x: outer_count(segments, static, per_frame, rescaled_ratio(x, part.frames, per_frame, saved)),
            )
            reps, values, _ = holitom_outer(
                frames,
                attention,
                rho,
                tau,
                self.beta,
                self.knn,
                self.max_window,
                self._noise(state.noise),
                segmentation,
            )
            local = content.to(dev)[reps[:, 0] * per_frame + reps[:, 1]]
            tail = torch.arange(shape.length - shape.trailing, shape.length, device=dev)  # trailing newline
            return Selection(torch.cat([local, tail]), torch.cat([values, ctx.embeds[tail]]), ordered=True)
        count = self._image_keep(content.numel(), rho, self._outer_cap(state, ctx.keep, shape.n_content))
        kept = content[torch.sort(topk_stable(scores[content.to(dev)], count)).values.cpu()]
        extra = structural_to_keep(shape, kept, "keep_nonempty_rows")  # HoliTom's grid newline rule
        return Selection(torch.cat([kept, extra]))

    # ------------------------------------------------------------------------------------------ inner
    @differentiable_values()  # merged values keep their autograd graph
    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        weights = ctx.signals[LLMSignal("last_row", ctx.layer - 1).key]
        layout = ctx.layout
        out = []
        for b, items in enumerate(ctx.items.per_sample):
            span = (layout.valid[b] & (layout.item[b] >= 0)).nonzero().flatten()
            if not items or span.numel() == 0:
                out.append(Selection(torch.zeros(0, dtype=torch.long)))
                continue
            n_content = sum(it.shape.n_content for it in items)
            _, _, r = self._ratios(ctx.state, ctx.keep, n_content)
            if not self._solves_inner():  # official: top round(n (1 - r)) of the whole span, newlines included
                kept, values = inner_merge(ctx.hidden_states[b, span], weights[b, span], r)
                out.append(Selection(span[kept], values))
                continue
            # keep-derived: the structural tokens stay, the content keeps the count that meets the budget
            is_content = layout.visual[b, span]
            content, structural = span[is_content], span[~is_content]
            sizes = [it.shape.n_content for it in items]
            target = sum(item_budget(ctx.keep, n) for n in sizes)
            want = self._inner_count(ctx.state, ctx.keep, target, content.numel(), sizes)
            if want == 0:
                out.append(Selection(span))
                continue
            kept, values = inner_merge(ctx.hidden_states[b, content], weights[b, content], 1 - want / content.numel())
            keep_idx = torch.cat([content[kept], structural])
            values = torch.cat([values, ctx.hidden_states[b, structural].to(values.dtype)])
            out.append(Selection(keep_idx, values))
        return out
