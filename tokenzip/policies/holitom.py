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
tau = 0.65 when rho <= 0.10, else 0.80. Images (tokenzip adaptation; the official outer stage passes them
through): the single-frame case, top ceil(N rho) tokens by attention in raster order (`image_mode="topk"`), or
untouched (`"passthrough"`, official). Qwen2.5-VL videos use the temporal slices as frames and keep original
M-RoPE positions; LLaVA-1.5 and OneVision compact positions at the outer stage.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget
from ..contexts import LLMSignal, LLMStageContext, Plan, PreLLMItem, Selection, VisionSignal
from ..errors import PolicyOptionError
from ..ops.topk import topk_stable
from .base import Policy
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
    mean of centre and members).
    """
    n, d = points.shape
    if centres_wanted <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.long), points[:0]
    z = points.float()
    dist = torch.cdist(z, z) / math.sqrt(d)
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
        counts = torch.bincount(assign, minlength=centres.numel()).float()[:, None]
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
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """HoliTom's outer stage on one video. frames: [F, N, d] features; attention: [F, N].

    Returns (representatives [n_out, 2] = (frame, position) each output token stands at, values [n_out, d],
    segments). `noise(n)` gives the density tie-breaking noise of a clustering call (None: no noise).
    """
    n_frames, n_tokens, _ = frames.shape
    sim = temporal_similarity(frames) if n_frames > 1 else frames.new_zeros(0, n_tokens)
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
        z = frames[s : e + 1, static_pos].float().mean(0).to(frames.dtype)
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
    absorbs q_1 < ... < q_m ends as h / 2^m + sum_i h_{q_i} / 2^(m - i + 1).
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
        unit = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
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


@register
class HoliTomPolicy(Policy):
    name = "holitom"
    description = "HoliTom: temporal DP segmentation + static clustering + dynamic top-k; inner LLM merge (video)."
    defaults: ClassVar[dict[str, Any]] = {
        "rho": None,
        "tau": None,
        "beta": 0.6,
        "D": 0,
        "knn": 7,
        "max_window": 1024,
        "inner": True,
        "inner_layer": None,
        "inner_r": 0.5,
        "tie_noise": None,
        "noise_seed": 0,
        "noncausal_km1": False,
        "image_mode": "topk",
    }

    def validate(self) -> None:
        o = self.options
        self._check_choice("tie_noise", (None, "seeded", "global", "off"))
        self._check_choice("image_mode", ("topk", "passthrough"))
        self._check_int("knn", 1)
        self._check_int("max_window", 2)
        self._check_int("inner_layer", 1, allow_none=True)
        if o["D"] != 0:
            raise PolicyOptionError(
                "holitom: D > 0 (contextual clustering of dynamic tokens) is not implemented: its merge rule is "
                "unverified and no official preset uses it; D must be 0"
            )
        if o["beta"] is not None and not 0 <= o["beta"] <= 1:
            raise PolicyOptionError(f"holitom: beta must lie in [0, 1] or be None, got {o['beta']!r}")
        if not 0 <= o["inner_r"] < 1:
            raise PolicyOptionError(f"holitom: inner_r must lie in [0, 1), got {o['inner_r']!r}")
        if o["rho"] is not None and not 0 < o["rho"] <= 1:
            raise PolicyOptionError(f"holitom: rho must lie in (0, 1], got {o['rho']!r}")

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        self._info = info
        layer = self.options["inner_layer"] or default_inner_layer(info.n_llm_layers)
        if self.options["inner"] and not 1 <= layer < info.n_llm_layers:
            raise PolicyOptionError(f"holitom: inner_layer={layer} is outside 1..{info.n_llm_layers - 1}")
        self._layer = layer
        if info.family == "qwen2_5_vl":
            self._signal = VisionSignal("received", info.n_vision_layers - 1)
        else:
            self._signal = VisionSignal("received", info.vision_feature_layer)
        inner = self.options["inner"]
        return Plan(
            pre_llm=True,
            llm_layers=(layer,) if inner else (),
            vision_signals=(self._signal,),
            llm_signals=(LLMSignal("last_row", layer - 1),) if inner else (),
            llm_structural=True,
            llm_keep_positions=True,
            noncausal_layers=(layer - 1,) if inner and self.options["noncausal_km1"] else (),
        )

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Outer: ceil(N_frame rho) per frame (no static tokens assumed: the DP saves nothing) or ceil(N rho) for an
        image (+ its newlines, every row assumed kept); inner: round(n (1 - r)) of the span from layer K on."""
        self.plan(info, keep)
        rho, _, r = self._ratios(keep, shape.n_content)
        if shape.modality == "video":
            part = shape.parts[0]
            outer = part.frames * math.ceil(part.rows * part.cols * rho) + shape.trailing
        elif self.options["image_mode"] == "passthrough":
            outer = shape.length
        else:
            outer = image_count(shape.n_content, rho) + (shape.length - shape.n_content)
        if not self.options["inner"]:
            return Nominal([outer] * info.n_llm_layers)
        inner = max(1, round(outer * (1 - r)))
        return Nominal(staged(outer, [inner], (self._layer,), info.n_llm_layers, 0))

    def _fraction(self, keep: Keep, n_content: int) -> float:
        return item_budget(keep, n_content) / n_content

    def _ratios(self, keep: Keep, n_content: int) -> tuple[float, float, float]:
        """(rho, tau, inner r) for an item of n_content tokens."""
        rho, r = holitom_ratio(
            self._fraction(keep, n_content),
            self._info.n_llm_layers,
            self._layer,
            self.options["inner_r"],
            self.options["inner"],
        )
        if self.options["rho"] is not None:
            rho = self.options["rho"]
        tau = self.options["tau"] if self.options["tau"] is not None else (0.65 if rho <= 0.10 else 0.80)
        return rho, tau, r

    def _noise(self):
        mode = self.options["tie_noise"] or ("off" if self._info.family == "qwen2_5_vl" else "seeded")
        if mode == "off":
            return None
        if mode == "global":
            return lambda n: torch.rand(n) * 1e-6
        seed = self.options["noise_seed"]
        return lambda n: torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1e-6

    # ------------------------------------------------------------------------------------------ outer
    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        shape = ctx.item.shape
        video = ctx.item.modality == "video"
        if not video and self.options["image_mode"] == "passthrough":
            return Selection(ctx.available, ordered=True)
        rho, tau, _ = self._ratios(ctx.keep, shape.n_content)
        dev = ctx.embeds.device
        scores = ctx.signals[self._signal.key]
        content = ctx.content_available
        if video:
            part = shape.parts[0]
            per_frame = part.rows * part.cols
            frames = ctx.embeds[content.to(dev)].reshape(part.frames, per_frame, -1)
            attention = scores[content.to(dev)].reshape(part.frames, per_frame)
            reps, values, _ = holitom_outer(
                frames,
                attention,
                rho,
                tau,
                self.options["beta"],
                self.options["knn"],
                self.options["max_window"],
                self._noise(),
            )
            local = content.to(dev)[reps[:, 0] * per_frame + reps[:, 1]]
            tail = torch.arange(shape.length - shape.trailing, shape.length, device=dev)  # trailing newline
            return Selection(torch.cat([local, tail]), torch.cat([values, ctx.embeds[tail]]), ordered=True)
        count = image_count(content.numel(), rho)
        kept = content[torch.sort(topk_stable(scores[content.to(dev)], count)).values.cpu()]
        extra = structural_to_keep(shape, kept, "keep_nonempty_rows")  # HoliTom's grid newline rule
        return Selection(torch.cat([kept, extra]))

    # ------------------------------------------------------------------------------------------ inner
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
            _, _, r = self._ratios(ctx.keep, n_content)
            kept, values = inner_merge(ctx.hidden_states[b, span], weights[b, span], r)
            out.append(Selection(span[kept], values))
        return out
