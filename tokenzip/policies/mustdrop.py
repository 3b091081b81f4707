"""MustDrop (arXiv 2411.10803; official code liuting20/MustDrop @ 909afa5), training-free, three stages.

1. Vision: 3x3 windows of the patch grid whose mean pairwise cosine similarity is >= 0.8 are merged into one
   token each (plain mean), emitted first in descending similarity, then every other patch in raster order.
   A key set (top 8% of the merged tokens by CLS attention at the tower's last layer on LLaVA-1.5, by mean
   attention received elsewhere) is protected from later dropping.
2. Prefill: after layers p (2, 6, 10, 14 of 32; round(p L / 32) otherwise, see `default_prune_layers`) the text
   rows' attention to the visual tokens (a[t, j], from layer p's own q/k) filters tokens: the official dual
   threshold drops j iff sum_t a[t, j] < global_thr * total and max_t a[t, j] < individual_thr
   (`schedule="thresholds"`, presets by name); the default `schedule="budget"` keeps the key set plus the top
   tokens by u_j = max(g_j / sum g, p_j / c_ratio) -- the same test with one threshold per stage -- with counts
   that make the layer-averaged count equal `keep` (`mustdrop_schedule`).
3. Decode: once after prefill the KV caches of the pruning layers are cut to the final surviving tokens.

LLaVA-1.5 (official family): merge inside CLIP before layer 1, CLS key row at the last layer, compact positions;
with `compat="official"` a new token's position in an edited layer is that layer's own cache length. Qwen2.5-VL
and LLaVA-OneVision (tokenzip adaptation): merge on the post-projector grids (per image part / frame; a merged
token stands at its window's centre), key scores = mean received at the last / feature vision layer (a merged
window's = mean of its 9), Qwen keeps original M-RoPE positions, OneVision compacts and drops newline tokens
(a video's trailing newline stays).

Budget (`schedule="budget"`): each sample's layer-averaged visual count (`SampleRecord.visual_mean`) equals the
sum of its items' budgets within one token per item, or the first forward raises `BudgetError` naming the smallest
reachable keep. Deviations from the spec (§11.7) this needs (the pure `mustdrop_schedule` still reproduces every
cell of the spec's worked table, its infeasible flag included):
- infeasible budgets (the first p1 + 1 layers see every merged token and the key set survives every prune, so the
  average cannot go below (w_0 N_m + (L - w_0) n_key) / L; 96.6 tokens on 576 unmerged LLaVA-1.5 tokens) raise
  `BudgetError` instead of silently keeping only the key set (the spec's `budget_infeasible`);
- the merge takes at most floor((N - budget) / 8) windows per item (the most similar ones), so that the merge
  alone never leaves an item below its budget (the spec merges every window >= merge_thr and then skips the LLM
  filter, landing under budget); the thresholds schedule, which ignores keep, merges uncapped;
- shallow LLMs: round(p L / 32) collides ((0, 2, 2, 4) at L = 8, one stage applied twice, 7-11 % over budget);
  colliding layers move to the next free layer, (0, 2, 3, 4) at L = 8 (values at L = 24, 28, 32, 36 unchanged).
`budget_count="official_log"` meets keep in the paper's logged accounting (`visual_mean_logged`); its true
average is higher by design (opt-in for reproducing logged numbers). `schedule="thresholds"` ignores keep.

Options of the spec not offered: `schedule="single_gamma"` (§11.2: one gamma per sample, bisected until the
layer average matches keep) cannot be implemented faithfully here: each bisection step must re-run decoder
layers 0..p4 of the prefill with that gamma's pruning, because the attention at a later pruning layer depends on
what the earlier ones dropped; tokenzip policies select inside one hooked forward pass (they never run modules),
and the engine has no re-run primitive. It is refused with `PolicyOptionError` saying so. `r_scope="batch"` (the
official minimum merge count over the tower's batch) is offered on LLaVA-1.5 only, where one tower call holds the
batch's images; on Qwen2.5-VL / OneVision the merge runs per item after the projector and the option is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, geometric_schedule, infeasible_budget, item_budget
from ..contexts import (
    DecodeContext,
    LLMSignal,
    LLMStageContext,
    Plan,
    PreLLMItem,
    Selection,
    VisionSignal,
    VisionStageContext,
)
from ..errors import PolicyOptionError
from ..ops.grad import differentiable_values
from ..ops.topk import topk_stable
from .base import Choice, Float, Int, Policy, Tuple
from .nominal import Nominal, staged
from .registry import register
from .units import grid_units

PRESETS = {  # official LLaVA-1.5-7B scripts: (global_thr, individual_thr)
    "textvqa-192": (0.001, 0.001),
    "textvqa-128": (0.0012, 0.001),
    "textvqa-64": (0.011, 0.01),
    "vizwiz-64": (0.005, 0.001),
}
OFFICIAL_PRUNE_LAYERS = (2, 6, 10, 14)  # of 32


# ------------------------------------------------------------------------------------------ stage 1
def window_index(rows: int, cols: int, size: int = 3) -> torch.Tensor:
    """Raster indices of the non-overlapping size x size windows tiling a rows x cols grid from the top-left
    (windows row-major; border rows / columns that do not fill a window are left out). [n_windows, size^2]."""
    wr, wc = rows // size, cols // size
    r = torch.arange(wr)[:, None, None, None] * size + torch.arange(size)[None, None, :, None]
    c = torch.arange(wc)[None, :, None, None] * size + torch.arange(size)[None, None, None, :]
    return (r * cols + c).reshape(wr * wc, size * size)


def window_similarity(tokens: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the ordered pairs of distinct tokens of each window. tokens: [N, C]."""
    if windows.numel() == 0:
        return torch.zeros(0, device=tokens.device)
    work = torch.promote_types(tokens.dtype, torch.float32)
    unit = tokens.to(work) / tokens.to(work).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = unit[windows.to(tokens.device)]  # [nw, k, C]
    gram = w @ w.transpose(1, 2)
    k = windows.shape[1]
    return (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / (k * (k - 1))


def spatial_merge(
    tokens: torch.Tensor,
    windows: torch.Tensor,
    sims: torch.Tensor,
    threshold: float = 0.8,
    count: int | None = None,
    representative: str = "first",
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Merge the windows with similarity >= threshold (or the `count` most similar) into their mean.

    Returns (representative token index per output token, values [N - (k^2 - 1) r, C], r): merged tokens
    first in descending similarity (ties -> lower window), each standing at its window's first cell
    (`representative="first"`) or centre cell ("center"), then the unmerged tokens in ascending order.
    """
    r = int((sims >= threshold).sum()) if count is None else count
    chosen = topk_stable(sims, r)
    dev = tokens.device
    members = windows.to(dev)[chosen.to(dev)]  # [r, k^2]
    covered = torch.zeros(tokens.shape[0], dtype=torch.bool, device=dev)
    covered[members.flatten()] = True
    rest = (~covered).nonzero().flatten()
    slot = 0 if representative == "first" else windows.shape[1] // 2
    reps = torch.cat([members[:, slot], rest])
    merged = tokens[members].to(torch.promote_types(tokens.dtype, torch.float32)).mean(1).to(tokens.dtype)
    return reps, torch.cat([merged, tokens[rest]]), r


def key_set(scores: torch.Tensor, rate: float = 0.08) -> torch.Tensor:
    """Indices of the top ceil(rate * n) scores (ties -> lower index), descending."""
    return topk_stable(scores, math.ceil(rate * scores.numel()))


# ------------------------------------------------------------------------------------------ stage 2
def dual_filter(a: torch.Tensor, key: torch.Tensor, global_thr: float, individual_thr: float) -> torch.Tensor:
    """Official test: drop j iff sum_t a[t, j] < global_thr * sum(a) and max_t a[t, j] < individual_thr.

    a: [m text rows, n visual tokens]; key: indices that always survive. Returns kept indices, ascending.
    """
    g = a.sum(0)
    p = a.max(0).values if a.shape[0] else torch.zeros_like(g)
    keep = ~((g < global_thr * g.sum()) & (p < individual_thr))
    keep[key.to(keep.device)] = True
    return keep.nonzero().flatten()


def budget_filter(a: torch.Tensor, key: torch.Tensor, n_keep: int, c_ratio: float = 1.0) -> torch.Tensor:
    """Key set plus the top (n_keep - |key|) other tokens by u_j = max(g_j / sum g, p_j / c_ratio).

    This is the dual test with global_thr = gamma and individual_thr = c_ratio * gamma, gamma chosen so that
    n_keep tokens survive. Ties -> lower index. Returns kept indices, ascending.
    """
    g = a.sum(0)
    p = a.max(0).values if a.shape[0] else torch.zeros_like(g)
    u = torch.maximum(g / g.sum().clamp_min(1e-30), p / c_ratio)
    is_key = torch.zeros_like(g, dtype=torch.bool)
    is_key[key.to(g.device)] = True
    others = (~is_key).nonzero().flatten()
    extra = others[topk_stable(u[others], max(0, n_keep - int(is_key.sum())))]
    return torch.sort(torch.cat([key.to(g.device), extra])).values


def layer_weights(prune_layers: tuple[int, ...], n_layers: int, accounting: str = "true") -> list[int]:
    """Layers running on each count: 'true' = p1 + 1, p2 - p1, ..., L - 1 - p4 (layer p still sees the
    pre-prune set); 'official_log' = p1, ..., L - p4 (as the official code logs it)."""
    p = prune_layers
    if accounting == "true":
        return [p[0] + 1, *[p[i + 1] - p[i] for i in range(len(p) - 1)], n_layers - 1 - p[-1]]
    return [p[0], *[p[i + 1] - p[i] for i in range(len(p) - 1)], n_layers - p[-1]]


def mustdrop_schedule(
    target: float,
    n_merged: int,
    n_key: int,
    prune_layers: tuple[int, ...],
    n_layers: int,
    accounting: str = "true",
) -> tuple[list[int], bool]:
    """Tokens kept after each pruning layer so that the layer-averaged count equals `target`.

    Solves lambda in (0, 1) from w_0 N + sum_i w_i max(n_key, N lambda^i) = L target (N = tokens after the
    merge); n_i = max(n_key, round(N lambda^i)) and the last count absorbs the rounding. Returns (counts,
    infeasible): infeasible when even keeping only the key set from the first pruning layer on exceeds the
    target (every stage then keeps the key set). No pruning is needed (counts = N) when N <= target.
    """
    w = layer_weights(prune_layers, n_layers, accounting)
    stages = len(prune_layers)
    goal = n_layers * target
    if w[0] * n_merged + (n_layers - w[0]) * n_key > goal:
        return [n_key] * stages, True
    return geometric_schedule(goal, n_merged, w, floor=n_key), False


def default_prune_layers(n_layers: int) -> tuple[int, ...]:
    """round(p * L / 32) for the official (2, 6, 10, 14): 2, 5, 9, 12 at L = 28; 2, 4, 8, 10 at L = 24.

    Made distinct and increasing for shallow LLMs (a layer that rounds onto its predecessor moves to the next
    one, and the last stays at most L - 2 so that a layer runs on the final set): (0, 2, 3, 4) at L = 8,
    (1, 2, 4, 5) at L = 12. An LLM with fewer than 6 layers gets min(4, L - 1) stages 0, 1, ..."""
    if n_layers < 2:
        raise PolicyOptionError(f"mustdrop needs an LLM of at least 2 layers to prune in, got {n_layers}")
    stages = min(len(OFFICIAL_PRUNE_LAYERS), n_layers - 1)
    layers: list[int] = []
    for p in OFFICIAL_PRUNE_LAYERS[:stages]:
        layers.append(max(round(p * n_layers / 32), layers[-1] + 1 if layers else 0))
    for i in range(stages - 1, -1, -1):  # pull back from the end: the last at most L - 2, still increasing
        layers[i] = min(layers[i], n_layers - 2 - (stages - 1 - i))
    return tuple(layers)


def merge_counts(
    sims: list[torch.Tensor], threshold: float, r_scope: str = "image", caps: list[int | None] | None = None
) -> list[int]:
    """Windows to merge per grid: #(sim >= threshold), at most caps[i] (None = no cap); with
    r_scope="batch" (the official code) every grid merges the minimum over the grids (§2.3).

    sims: one [n_windows_i] tensor per grid (image row of the tower call)."""
    counts = [int((s >= threshold).sum()) for s in sims]
    if caps is not None:
        counts = [c if cap is None else min(c, cap) for c, cap in zip(counts, caps, strict=True)]
    if r_scope == "batch" and counts:
        counts = [min(counts)] * len(counts)
    return counts


def merge_cap(n_tokens: int, budget: int, window: int = 9) -> int:
    """Most windows of `window` tokens that may merge while n_tokens - (window - 1) r stays >= budget."""
    return max(0, (n_tokens - budget) // (window - 1))


def cap_across_units(sims: list[torch.Tensor], threshold: float, cap: int) -> list[int]:
    """Per grid unit of one item: its windows among the `cap` most similar windows >= threshold over all the
    item's units (ties -> earlier unit, lower window), i.e. the item's merges capped at `cap` in total."""
    counts = [int((s >= threshold).sum()) for s in sims]
    if sum(counts) <= cap:
        return counts
    flat = torch.cat([s.float().cpu() for s in sims]) if sims else torch.zeros(0)
    chosen = topk_stable(flat, cap)
    unit = torch.repeat_interleave(torch.arange(len(sims)), torch.tensor([s.numel() for s in sims]))
    return torch.bincount(unit[chosen], minlength=len(sims)).tolist()


SINGLE_GAMMA_UNAVAILABLE = (
    "mustdrop: schedule='single_gamma' is not available: it bisects one gamma per sample, and every bisection step "
    "must re-run the decoder layers 0..p4 of the prefill on that gamma's pruned sequences (the attention at a later "
    "pruning layer depends on what the earlier ones dropped); tokenzip policies select from one pass of hooks and "
    "cannot re-run layers. Use schedule='budget' (the same dual test, one gamma per stage, exact counts) or "
    "schedule='thresholds' (one fixed pair for all stages)"
)


@dataclass(frozen=True)
class MustDropState:
    """What `MustDropPolicy.plan` derives for one model."""

    prune_layers: tuple[int, ...]  # decoder layers whose text attention decides (the filter acts after each)
    key_signal: VisionSignal  # scores of the key set


@register
@dataclass(frozen=True)
class MustDropPolicy(Policy):
    """MustDrop: 3x3 window merging with a protected key set, a text-attention filter after four decoder layers,
    and KV-cache trimming after prefill (see the module docstring per family)."""

    name = "mustdrop"
    description = "MustDrop: 3x3 window merging + key set, text-attention filter at 4 LLM layers, KV trimming."

    schedule: str = Choice(
        "budget",
        ("budget", "thresholds"),
        doc="'budget': counts that meet keep; 'thresholds': the official dual test with fixed thresholds",
        refused={"single_gamma": SINGLE_GAMMA_UNAVAILABLE},
    )
    global_thr: float | None = Float(None, ge=0, none=True, doc="official global threshold (schedule='thresholds')")
    individual_thr: float | None = Float(
        None, ge=0, none=True, doc="official individual threshold (schedule='thresholds')"
    )
    preset: str | None = Choice(
        None, (None, *PRESETS), doc="an official script's threshold pair (implies 'thresholds')"
    )
    c_ratio: float = Float(1.0, gt=0, doc="individual_thr / global_thr of the budget schedule's single test")
    merge_thr: float = Float(0.8, gt=0, le=1, doc="mean pairwise cosine similarity at which a 3x3 window merges")
    key_rate: float = Float(0.08, gt=0, le=1, doc="share of each item's merged tokens protected as the key set")
    prune_layers: tuple[int, ...] | None = Tuple(
        None, Int(0, ge=0), min_length=1, increasing=True, none=True, doc="filter after these layers; None = auto"
    )
    compat: str | None = Choice(
        None, (None, "official", "fixed"), doc="decode positions of edited layers; None = family"
    )
    budget_count: str = Choice("true", ("true", "official_log"), doc="layer-average accounting keep is met in")
    newlines: str = Choice("drop", ("drop",), doc="OneVision newline tokens are dropped at the LLM input")
    r_scope: str = Choice(
        "image", ("image", "batch"), doc="merge count per image, or the batch minimum (official; LLaVA-1.5)"
    )

    def validate(self) -> None:
        if self.preset is not None:
            self._apply_preset()
        if self.schedule == "thresholds":
            if self.global_thr is None or self.individual_thr is None:
                raise PolicyOptionError(
                    "mustdrop: schedule='thresholds' needs global_thr and individual_thr (or a preset: "
                    f"{sorted(PRESETS)}); the official CLI default (1.0, 0.0) keeps every token"
                )
            if self.c_ratio != 1.0 or self.budget_count != "true":
                raise PolicyOptionError(
                    "mustdrop: c_ratio and budget_count shape the 'budget' schedule only; with "
                    "schedule='thresholds' the thresholds decide (leave c_ratio=1.0, budget_count='true')"
                )
        elif self.global_thr is not None or self.individual_thr is not None:
            raise PolicyOptionError(
                "mustdrop: global_thr / individual_thr are used by schedule='thresholds' only; the 'budget' schedule "
                "picks one threshold per stage from keep (ratio set by c_ratio)"
            )

    def _apply_preset(self) -> None:
        """A preset names an official script's threshold pair: it implies schedule='thresholds'."""
        official = PRESETS[self.preset]
        given = (self.global_thr, self.individual_thr)
        if any(g is not None and g != want for g, want in zip(given, official, strict=True)):
            raise PolicyOptionError(
                f"mustdrop: preset={self.preset!r} sets (global_thr, individual_thr) = {official}; got "
                f"{given}: pass either the preset or the thresholds"
            )
        self._normalise(schedule="thresholds", global_thr=official[0], individual_thr=official[1])

    # ------------------------------------------------------------------------------------------ planning
    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        layers = tuple(self.prune_layers or default_prune_layers(info.n_llm_layers))
        if layers[-1] + 1 >= info.n_llm_layers:
            raise PolicyOptionError(f"mustdrop: prune layers {layers} leave no layer after the last one")
        signals = tuple(LLMSignal("rows_from_visual", p) for p in layers)
        in_tower = info.supports_vision_stage and info.vision_has_cls  # CLIP rows merged in the tower (LLaVA-1.5)
        if self.r_scope == "batch" and not in_tower:
            raise PolicyOptionError(
                f"mustdrop: r_scope='batch' (the official minimum merge count over the tower's batch) exists for "
                f"LLaVA-1.5 only, whose merge runs on all images of a call at once; on {info.family} the merge runs "
                "per item after the projector (r_scope='image')"
            )
        if in_tower:
            state = MustDropState(layers, VisionSignal("cls", info.n_vision_layers - 1))
            return Plan(
                vision_layer=1,
                llm_layers=tuple(p + 1 for p in layers),
                decode=True,
                vision_signals=(state.key_signal,),
                llm_signals=signals,
                state=state,
            )
        state = MustDropState(layers, VisionSignal("received", info.vision_feature_layer))
        return Plan(
            pre_llm=True,
            llm_layers=tuple(p + 1 for p in layers),
            decode=True,
            vision_signals=(state.key_signal,),
            llm_signals=signals,
            state=state,
        )

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Budget schedule assuming no window reaches the merge threshold (r = 0; real images merge some, which
        only lowers the counts); a video's trailing newline stays; caches trimmed to the final count."""
        prune = self.plan(info, keep).state.prune_layers
        n = shape.n_content
        n_key = math.ceil(self.key_rate * n)
        if self.schedule == "thresholds":
            counts = [n] * len(prune)  # thresholds are data-dependent: priced as no dropping
        else:
            counts = self._counts(prune, item_budget(keep, n), n, n_key, info.n_llm_layers, keep, [n])
        extra = shape.trailing
        tokens = staged(n, counts, tuple(p + 1 for p in prune), info.n_llm_layers, extra)
        cache = list(tokens)
        for layer in range(prune[0], prune[-1] + 1):
            cache[layer] = counts[-1] + extra
        return Nominal(tokens, cache)

    def _counts(
        self,
        prune: tuple[int, ...],
        target: int,
        n_merged: int,
        n_key: int,
        n_layers: int,
        keep: Keep,
        sizes: list[int],
    ) -> list[int]:
        """`mustdrop_schedule` counts for pruning layers `prune`, or `BudgetError` naming the smallest reachable
        keep when even keeping only the key set from the first pruning layer on overshoots `target` (`sizes`:
        content tokens per item)."""
        accounting = self.budget_count
        counts, infeasible = mustdrop_schedule(target, n_merged, n_key, prune, n_layers, accounting)
        if infeasible:
            w0 = layer_weights(prune, n_layers, accounting)[0]
            floor = (w0 * n_merged + (n_layers - w0) * n_key) / n_layers
            reason = (
                f"the first {w0} of {n_layers} layers see all {n_merged} visual "
                f"tokens left after the merge and the key set ({n_key} tokens, key_rate) survives every prune at "
                f"layers {prune}; {accounting!r} accounting"
            )
            raise infeasible_budget("mustdrop", reason, keep, target, floor, sizes)
        return counts

    def rules(self, info: ModelInfo) -> str:
        """`compat`, or the family default: "official" on LLaVA-1.5, "fixed" elsewhere."""
        if self.compat is not None:
            return self.compat
        return "official" if info.reference_architecture else "fixed"

    def decode_positions(self, info: ModelInfo) -> str:
        return "cache_length" if self.rules(info) == "official" else "layout"

    # ------------------------------------------------------------------------------------------ stage 1
    def _merge_cap(self, keep: Keep, n_content: int) -> int | None:
        """Most windows an item of `n_content` tokens may merge under the budget schedule (so the merge alone never
        takes it below its budget); None (no cap) under the thresholds schedule, which does not use keep."""
        if self.schedule == "thresholds":
            return None
        return merge_cap(n_content, item_budget(keep, n_content))

    @differentiable_values()  # merged window means keep their autograd graph (tokenzip.ops.grad)
    def select_vision(self, ctx: VisionStageContext) -> list[Selection]:
        patches = ctx.hidden_states[:, int(ctx.has_cls) :]
        side = math.isqrt(patches.shape[1])
        windows = window_index(side, side)
        sims = [window_similarity(patches[r], windows) for r in range(patches.shape[0])]
        cap = self._merge_cap(ctx.keep, patches.shape[1])
        counts = merge_counts(sims, self.merge_thr, self.r_scope, [cap] * len(sims))
        out = []
        for r in range(patches.shape[0]):
            reps, values, merged = spatial_merge(patches[r], windows, sims[r], count=counts[r])
            members = windows[topk_stable(sims[r], merged).cpu()]  # [merged, k^2]: the windows, first cell = rep
            rest = members.shape[1] - 1
            groups = torch.stack([members[:, 1:].flatten(), members[:, :1].expand(-1, rest).flatten()])
            out.append(Selection(reps, values, ordered=True, groups=groups))
        return out

    @differentiable_values()  # merged window means keep their autograd graph (tokenzip.ops.grad)
    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        dev = ctx.embeds.device
        scores = ctx.signals[ctx.state.key_signal.key]
        keep, values, notes, groups = [], [], [], []
        units = grid_units(ctx.item.shape)
        unit_windows = [window_index(unit.rows, unit.cols) for unit in units]
        unit_sims = [
            window_similarity(ctx.embeds[u.cells.to(dev)], w) for u, w in zip(units, unit_windows, strict=True)
        ]
        cap = self._merge_cap(ctx.keep, ctx.item.shape.n_content)
        thr = self.merge_thr
        counts = merge_counts(unit_sims, thr) if cap is None else cap_across_units(unit_sims, thr, cap)
        for unit, windows, sims, count in zip(units, unit_windows, unit_sims, counts, strict=True):
            cells = unit.cells.to(dev)
            tokens = ctx.embeds[cells]
            reps, vals, r = spatial_merge(tokens, windows, sims, count=count, representative="center")
            unit_scores = scores[cells].float()
            members = windows.to(dev)[topk_stable(sims, r).to(dev)]  # [r, k^2] the merged windows
            merged_scores = unit_scores[members].mean(1)
            notes.append(torch.cat([merged_scores, unit_scores[reps[r:]]]))
            keep.append(cells[reps])
            values.append(vals)
            joined = cells[members.flatten()]
            groups.append(torch.stack([joined, cells[reps[:r]].repeat_interleave(members.shape[1])]))
        shape = ctx.item.shape
        tail = torch.arange(shape.length - shape.trailing, shape.length, device=dev)  # a video's newline
        annotations = torch.cat([*notes, torch.full((tail.numel(),), float("nan"), device=dev)])
        merges = torch.cat(groups, dim=1) if groups else torch.zeros(2, 0, dtype=torch.long, device=dev)
        merges = merges[:, merges[0] != merges[1]]  # a window's representative is one of its members
        return Selection(
            torch.cat([*keep, tail]),
            torch.cat([*values, ctx.embeds[tail]]),
            ordered=True,
            annotations=annotations,
            groups=merges,
        )

    # ------------------------------------------------------------------------------------------ stage 2
    def _key_scores(self, ctx: LLMStageContext, b: int) -> torch.Tensor:
        """Key score per slot of the LLM-input layout for sample b (NaN for non-visual slots)."""
        layout = ctx.input_layout
        if layout.annotation is not None:
            return torch.where(layout.visual[b], layout.annotation[b], float("nan"))
        out = torch.full((layout.length,), float("nan"), device=layout.valid.device)
        for j, item in enumerate(ctx.items.per_sample[b]):
            slots = (layout.valid[b] & layout.visual[b] & (layout.item[b] == j)).nonzero().flatten()
            local = layout.orig[b, slots] - item.start
            signal = ctx.item_signals[(b, j)][ctx.state.key_signal.key].to(out.device)
            out[slots] = signal[local]
        return out

    def _key_slots(self, ctx: LLMStageContext, b: int) -> torch.Tensor:
        """LLM-input slots of sample b's key tokens: the top ceil(key_rate * N') of each item by key score."""
        layout = ctx.input_layout
        scores = self._key_scores(ctx, b)
        keys = []
        for j in range(len(ctx.items.per_sample[b])):
            slots = (layout.valid[b] & layout.visual[b] & (layout.item[b] == j)).nonzero().flatten()
            item_scores = torch.nan_to_num(scores[slots], nan=float("-inf"))
            keys.append(slots[key_set(item_scores, self.key_rate)])
        return torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        stage = ctx.layer - 1  # the pruning layer whose attention decides
        prune = ctx.state.prune_layers
        index = prune.index(stage)
        rows = ctx.signals[LLMSignal("rows_from_visual", stage).key]
        layout = ctx.layout
        out = []
        for b, items in enumerate(ctx.items.per_sample):
            visual = layout.visual_slots(b)
            if not items or visual.numel() == 0:
                out.append(Selection(torch.zeros(0, dtype=torch.long)))
                continue
            key_lm = self._key_slots(ctx, b)
            key = torch.isin(layout.lm_src[b, visual], key_lm.to(visual.device)).nonzero().flatten()
            last_visual = int(visual.max())
            text = layout.valid[b] & (torch.arange(layout.length, device=visual.device) > last_visual)
            a = rows[b][text.nonzero().flatten()][:, visual]
            if self.schedule == "thresholds":
                kept = dual_filter(a, key, self.global_thr, self.individual_thr)
            else:
                input_visual = int((ctx.input_layout.valid[b] & ctx.input_layout.visual[b]).sum())
                sizes = [it.shape.n_content for it in items]
                target = sum(item_budget(ctx.keep, n) for n in sizes)
                n_key, n_layers = int(key_lm.numel()), ctx.info.n_llm_layers
                counts = self._counts(prune, target, input_visual, n_key, n_layers, ctx.keep, sizes)
                kept = budget_filter(a, key, min(counts[index], visual.numel()), self.c_ratio)
            out.append(Selection(visual[kept]))
        return out

    # ------------------------------------------------------------------------------------------ stage 3
    def select_decode(self, ctx: DecodeContext) -> dict[int, list[Selection]]:
        final = ctx.layer_layouts[-1]
        first = ctx.stage_layers[0] - 1  # the first pruning layer: its cache holds the pre-prune set
        edits: dict[int, list[Selection]] = {}
        for layer in range(first, ctx.stage_layers[-1]):
            layout = ctx.layer_layouts[layer]
            if layout is final:
                continue
            per_sample = []
            for b in range(layout.batch):
                visual = layout.visual_slots(b)
                survivors = final.lm_src[b][final.valid[b] & final.visual[b]]
                per_sample.append(Selection(visual[torch.isin(layout.lm_src[b, visual], survivors)]))
            edits[layer] = per_sample
        return edits
