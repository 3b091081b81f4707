"""MustDrop (arXiv 2411.10803; official code liuting20/MustDrop @ 909afa5), training-free, three stages.

1. Vision: 3x3 windows of the patch grid whose mean pairwise cosine similarity is >= 0.8 are merged into one
   token each (plain mean), emitted first in descending similarity, then every other patch in raster order.
   A key set (top 8% of the merged tokens by CLS attention at the tower's last layer on LLaVA-1.5, by mean
   attention received elsewhere) is protected from later dropping.
2. Prefill: after layers p (2, 6, 10, 14 of 32; round(p L / 32) otherwise) the text rows' attention to the
   visual tokens (a[t, j], from layer p's own q/k) filters tokens: the official dual threshold drops j iff
   sum_t a[t, j] < global_thr * total and max_t a[t, j] < individual_thr (`schedule="thresholds"`, presets by
   name); the default `schedule="budget"` keeps the key set plus the top tokens by
   u_j = max(g_j / sum g, p_j / c_ratio) -- the same test with one threshold per stage -- with counts that
   make the layer-averaged count equal `keep` (`mustdrop_schedule`).
3. Decode: once after prefill the KV caches of the pruning layers are cut to the final surviving tokens.

LLaVA-1.5 (official family): merge inside CLIP before layer 1, CLS key row at the last layer, compact positions;
with `compat="official"` a new token's position in an edited layer is that layer's own cache length. Qwen2.5-VL
and LLaVA-OneVision (tokenzip adaptation): merge on the post-projector grids (per image part / frame; a merged
token stands at its window's centre), key scores = mean received at the last / feature vision layer (a merged
window's = mean of its 9), Qwen keeps original M-RoPE positions, OneVision compacts and drops newline tokens
(a video's trailing newline stays).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget
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
from ..ops.topk import topk_stable
from .base import Policy
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
    if n_merged <= target:
        return [n_merged] * stages, False

    def total(lam: float) -> float:
        return w[0] * n_merged + sum(w[i] * max(n_key, n_merged * lam**i) for i in range(1, stages + 1))

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < goal else (lo, mid)
    lam = (lo + hi) / 2
    counts = [max(n_key, round(n_merged * lam**i)) for i in range(1, stages)]
    last = (goal - w[0] * n_merged - sum(w[i] * counts[i - 1] for i in range(1, stages))) / w[stages]
    counts.append(max(n_key, round(last)))
    for i in range(1, stages):
        counts[i] = min(counts[i], counts[i - 1])
    return counts, False


def default_prune_layers(n_layers: int) -> tuple[int, ...]:
    """round(p * L / 32) for the official (2, 6, 10, 14): 2, 5, 9, 12 at L = 28; 2, 4, 8, 10 at L = 24."""
    return tuple(round(p * n_layers / 32) for p in OFFICIAL_PRUNE_LAYERS)


@register
class MustDropPolicy(Policy):
    name = "mustdrop"
    description = "MustDrop: 3x3 window merging + key set, text-attention filter at 4 LLM layers, KV trimming."
    defaults: ClassVar[dict[str, Any]] = {
        "schedule": "budget",
        "global_thr": None,
        "individual_thr": None,
        "preset": None,
        "c_ratio": 1.0,
        "merge_thr": 0.8,
        "key_rate": 0.08,
        "prune_layers": None,
        "compat": None,
        "budget_count": "true",
        "newlines": "drop",
    }

    def validate(self) -> None:
        o = self.options
        self._check_choice("schedule", ("budget", "thresholds"))
        self._check_choice("compat", (None, "official", "fixed"))
        self._check_choice("budget_count", ("true", "official_log"))
        self._check_choice("newlines", ("drop",))
        if o["preset"] is not None:
            if o["preset"] not in PRESETS:
                raise PolicyOptionError(f"mustdrop: unknown preset {o['preset']!r}; presets: {sorted(PRESETS)}")
            o["schedule"] = "thresholds"
            o["global_thr"], o["individual_thr"] = PRESETS[o["preset"]]
        if o["schedule"] == "thresholds" and (o["global_thr"] is None or o["individual_thr"] is None):
            raise PolicyOptionError(
                "mustdrop: schedule='thresholds' needs global_thr and individual_thr (or a preset: "
                f"{sorted(PRESETS)}); the official CLI default (1.0, 0.0) keeps every token"
            )
        for name in ("c_ratio", "merge_thr", "key_rate"):
            value = o[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise PolicyOptionError(f"mustdrop: {name} must be a positive number, got {value!r}")
        layers = o["prune_layers"]
        if layers is not None and (not layers or list(layers) != sorted(set(layers))):
            raise PolicyOptionError(f"mustdrop: prune_layers must be increasing layer indices, got {layers!r}")

    # ------------------------------------------------------------------------------------------ planning
    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        self._info = info
        layers = tuple(self.options["prune_layers"] or default_prune_layers(info.n_llm_layers))
        if layers[-1] + 1 >= info.n_llm_layers:
            raise PolicyOptionError(f"mustdrop: prune layers {layers} leave no layer after the last one")
        self._prune = layers
        signals = tuple(LLMSignal("rows_from_visual", p) for p in layers)
        if info.family == "llava":
            self._key_signal = VisionSignal("cls", info.n_vision_layers - 1)
            return Plan(
                vision_layer=1,
                llm_layers=tuple(p + 1 for p in layers),
                decode=True,
                vision_signals=(self._key_signal,),
                llm_signals=signals,
            )
        layer = info.n_vision_layers - 1 if info.family == "qwen2_5_vl" else info.vision_feature_layer
        self._key_signal = VisionSignal("received", layer)
        return Plan(
            pre_llm=True,
            llm_layers=tuple(p + 1 for p in layers),
            decode=True,
            vision_signals=(self._key_signal,),
            llm_signals=signals,
        )

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Budget schedule assuming no window reaches the merge threshold (r = 0; real images merge some, which
        only lowers the counts); a video's trailing newline stays; caches trimmed to the final count."""
        self.plan(info, keep)
        n = shape.n_content
        n_key = math.ceil(self.options["key_rate"] * n)
        if self.options["schedule"] == "thresholds":
            counts = [n] * len(self._prune)  # thresholds are data-dependent: priced as no dropping
        else:
            counts, _ = mustdrop_schedule(
                item_budget(keep, n), n, n_key, self._prune, info.n_llm_layers, self.options["budget_count"]
            )
        extra = shape.trailing
        tokens = staged(n, counts, tuple(p + 1 for p in self._prune), info.n_llm_layers, extra)
        cache = list(tokens)
        for layer in range(self._prune[0], self._prune[-1] + 1):
            cache[layer] = counts[-1] + extra
        return Nominal(tokens, cache)

    def compat(self) -> str:
        if self.options["compat"] is not None:
            return self.options["compat"]
        return "official" if self._info.family == "llava" else "fixed"

    def decode_positions(self, info: ModelInfo) -> str:
        return "cache_length" if self.compat() == "official" else "layout"

    # ------------------------------------------------------------------------------------------ stage 1
    def select_vision(self, ctx: VisionStageContext) -> list[Selection]:
        patches = ctx.hidden_states[:, int(ctx.has_cls) :]
        side = math.isqrt(patches.shape[1])
        windows = window_index(side, side)
        out = []
        for r in range(patches.shape[0]):
            sims = window_similarity(patches[r], windows)
            reps, values, merged = spatial_merge(patches[r], windows, sims, self.options["merge_thr"])
            members = windows[topk_stable(sims, merged).cpu()]  # [merged, k^2]: the windows, first cell = rep
            rest = members.shape[1] - 1
            groups = torch.stack([members[:, 1:].flatten(), members[:, :1].expand(-1, rest).flatten()])
            out.append(Selection(reps, values, ordered=True, groups=groups))
        return out

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        dev = ctx.embeds.device
        scores = ctx.signals[self._key_signal.key]
        keep, values, notes, groups = [], [], [], []
        for unit in grid_units(ctx.item.shape):
            cells = unit.cells.to(dev)
            tokens = ctx.embeds[cells]
            windows = window_index(unit.rows, unit.cols)
            sims = window_similarity(tokens, windows)
            reps, vals, r = spatial_merge(tokens, windows, sims, self.options["merge_thr"], representative="center")
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
            signal = ctx.item_signals[(b, j)][self._key_signal.key].to(out.device)
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
            keys.append(slots[key_set(item_scores, self.options["key_rate"])])
        return torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        stage = ctx.layer - 1  # the pruning layer whose attention decides
        index = self._prune.index(stage)
        rows = ctx.signals[LLMSignal("rows_from_visual", stage).key]
        layout = ctx.layout
        out = []
        for b, items in enumerate(ctx.items.per_sample):
            visual = (layout.valid[b] & layout.visual[b]).nonzero().flatten()
            if not items or visual.numel() == 0:
                out.append(Selection(torch.zeros(0, dtype=torch.long)))
                continue
            key_lm = self._key_slots(ctx, b)
            key = torch.isin(layout.lm_src[b, visual], key_lm.to(visual.device)).nonzero().flatten()
            last_visual = int(visual.max())
            text = layout.valid[b] & (torch.arange(layout.length, device=visual.device) > last_visual)
            a = rows[b][text.nonzero().flatten()][:, visual]
            if self.options["schedule"] == "thresholds":
                kept = dual_filter(a, key, self.options["global_thr"], self.options["individual_thr"])
            else:
                input_visual = int((ctx.input_layout.valid[b] & ctx.input_layout.visual[b]).sum())
                target = sum(item_budget(ctx.keep, it.shape.n_content) for it in items)
                counts, infeasible = mustdrop_schedule(
                    target,
                    input_visual,
                    int(key_lm.numel()),
                    self._prune,
                    ctx.info.n_llm_layers,
                    self.options["budget_count"],
                )
                if infeasible:
                    ctx.note(
                        f"mustdrop: keep={ctx.keep!r} is below what the key set allows ({key_lm.numel()} key tokens "
                        f"of {input_visual}); every stage keeps only the key set (budget_infeasible)"
                    )
                kept = budget_filter(a, key, min(counts[index], visual.numel()), self.options["c_ratio"])
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
                visual = (layout.valid[b] & layout.visual[b]).nonzero().flatten()
                survivors = final.lm_src[b][final.valid[b] & final.visual[b]]
                per_sample.append(Selection(visual[torch.isin(layout.lm_src[b, visual], survivors)]))
            edits[layer] = per_sample
        return edits
