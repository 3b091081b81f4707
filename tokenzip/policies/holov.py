"""HoloV (arXiv 2510.02912, NeurIPS 2025; official code obananas/HoloV @ 1d2e65e), training-free, pre-LLM.

The visual tokens, in the order they enter the LLM, are cut into C contiguous chunks ("crops"). Each crop's
share of the budget comes from a holistic score: 1000 x attention plus beta x gamma x the variance of the
tokens' cosine similarities inside the crop. Inside a crop the tokens with the highest raw attention are kept,
in descending-attention order; crops are emitted in order (the output is not re-sorted spatially).

Per family:

* LLaVA-1.5 (official family, `compat="official"`): attention = the CLS query's row at the feature layer
  (patch keys), features = projector outputs; a crop whose share exceeds its size keeps all its tokens and the
  shortfall is filled with zero rows (`patch.stats` reports them as `padded`). Compact positions.
* Qwen2.5-VL (`compat="fixed"` by default): attention = mean received at the last vision block, pooled per 2x2
  unit in raster order; K = round(N * keep); the shortfall is redistributed over unsaturated crops; original
  M-RoPE positions. `compat="official"` reproduces the released code: scores left in the tower's window
  order, K = int(N * keep), zero rows at the window's last position, and the window shifted to start at
  `<|vision_start|>` (so that token can be pruned and the last image token is always kept).
* LLaVA-OneVision (adaptation, fixed): mean received at the feature layer carried through the anyres packing;
  one HoloV run over base + high-resolution tokens (newlines dropped, as HoloV's own LLaVA-NeXT path); a video
  is one run over all its frames, its trailing newline kept.

C = max(1, floor(16 N / (9 K))) capped at N (the paper's floor(1024 / K) at N = 576). `order="raster"` re-sorts the
kept tokens into sequence order (the released code does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget
from ..contexts import Plan, PreLLMItem, Selection, VisionSignal
from ..errors import PolicyOptionError, UnsupportedInputError
from ..ops.grad import differentiable_values
from ..ops.topk import topk_stable
from ..signals.checks import require_finite
from .base import Choice, Float, Int, Policy
from .common import NEWLINE_MODES, structural_to_keep
from .nominal import Nominal, structural
from .registry import register

EPS = 1e-6


def crop_sizes(n: int, crops: int) -> list[int]:
    """Sizes of `crops` contiguous chunks of n tokens; the first n mod crops chunks get one extra token."""
    base, extra = divmod(n, crops)
    return [base + (1 if c < extra else 0) for c in range(crops)]


def crop_count(n: int, k: int) -> int:
    """HoloV's crop count: max(1, floor(16 n / (9 k))) (= int(1024/576 * n / k)), capped at n."""
    return min(n, max(1, (16 * n) // (9 * k)))


def crop_score(z: torch.Tensor, a: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean holistic score of one crop: mean(1000 a + beta * gamma * v) (float32 scalar).

    z: [M, D] features, a: [M] attention. v = variance of each token's cosine similarities to the others (the
    zeroed self-similarity included in the sum, divided by M - 1); gamma = mean|1000 a| / (mean|v| + 1e-6).
    A crop of one token scores mean(a) unscaled.
    """
    m = z.shape[0]
    if m <= 1:
        return a.float().mean()
    u = z.float() / (z.float().norm(dim=1, keepdim=True) + EPS)
    sim = u @ u.T
    sim = sim * (1 - torch.eye(m, device=z.device))
    mean = sim.sum(1) / (m - 1)
    var = ((sim - mean[:, None]) ** 2).sum(1) / (m - 1)
    scaled = a.float() * 1e3
    gamma = scaled.abs().mean() / (var.abs().mean() + EPS)
    return (scaled + beta * gamma * var).mean()


def crop_quotas(weights: torch.Tensor, budget: int) -> torch.Tensor:
    """floor(w * K) per crop, then +1 for each of the top min(r, C) crops by w (r = what the floor left)."""
    quotas = torch.floor(weights * budget).long()
    remaining = budget - int(quotas.sum())
    if remaining > 0:
        quotas[topk_stable(weights, min(remaining, weights.numel()))] += 1
    return quotas


def redistribute(quotas: torch.Tensor, sizes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Move the surplus of saturated crops to unsaturated ones by weight (same floor / +1 rule), repeatedly.

    quotas / sizes: LongTensor [C]; weights: float [C], finite and >= 0. Each pass fills at least one free slot or
    ends, so at most sum(sizes) + 1 passes run; weights that break this raise `UnsupportedInputError`.
    """
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise UnsupportedInputError(f"holov: crop weights must be finite and >= 0, got {weights.tolist()}")
    quotas = quotas.clone()
    carry = 0
    for _ in range(int(sizes.sum()) + 2):
        carry += int((quotas - sizes).clamp_min(0).sum())
        quotas = torch.minimum(quotas, sizes)
        open_crops = (quotas < sizes).nonzero().flatten()
        if carry == 0 or open_crops.numel() == 0:
            return quotas
        w = weights[open_crops]
        total = float(w.sum())
        add = torch.floor(w / total * carry).long() if total > 0 else torch.zeros_like(open_crops)
        rest = carry - int(add.sum())
        quotas[open_crops] += add
        bump = topk_stable(w, min(rest, open_crops.numel()))
        quotas[open_crops[bump]] += 1
        carry = rest - bump.numel()
    raise UnsupportedInputError(f"holov: the crop quotas did not settle (weights {weights.tolist()})")


def holov_select(
    features: torch.Tensor,
    attention: torch.Tensor,
    budget: int,
    crops: int,
    beta: float = 0.09,
    shortfall: str = "zeros",
) -> tuple[torch.Tensor, int]:
    """HoloV's selection. Returns (kept indices in output order, number of zero rows to append).

    features: [N, D]; attention: [N]; budget: K; crops: C. Output order: crop order, descending attention inside
    a crop (ties -> lower index), whole saturated crops in original order. shortfall "zeros" (official) appends
    K - kept zero rows; "redistribute" (fixed) re-splits saturated crops' surplus so min(K, N) real tokens are
    kept. C > N acts as C = N (the official code skips the empty crops).
    """
    require_finite(attention, "holov", "the pre_llm stage", "attention scores")
    require_finite(features, "holov", "the pre_llm stage", "features")
    n = attention.numel()
    sizes_list = crop_sizes(n, min(crops, n))
    sizes = torch.tensor(sizes_list)
    starts = [0, *torch.tensor(sizes_list).cumsum(0).tolist()[:-1]]
    scores = torch.stack(
        [crop_score(features[s : s + m], attention[s : s + m], beta) for s, m in zip(starts, sizes_list, strict=True)]
    )
    weights = (scores / (scores.sum() + EPS)).cpu()  # quotas live on the CPU, beside `sizes` (any device input)
    quotas = crop_quotas(weights, budget)
    if shortfall == "redistribute":
        quotas = redistribute(quotas, sizes, weights)
    out = []
    for c, (start, size) in enumerate(zip(starts, sizes_list, strict=True)):
        q = int(quotas[c])
        if q <= 0:
            continue
        if q >= size:
            out.append(torch.arange(start, start + size))
        else:
            out.append(start + topk_stable(attention[start : start + size], q).cpu())
    kept = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    kept = kept[:budget]
    return kept, max(0, budget - kept.numel())


@dataclass(frozen=True)
class HoloVState:
    """What `HoloVPolicy.plan` derives for one model."""

    signal: VisionSignal  # the attention score per token
    official: bool  # the released rules (compat "official")
    qwen_official: bool  # the released Qwen2.5-VL path (window order, shifted window)


@register
@dataclass(frozen=True)
class HoloVPolicy(Policy):
    name = "holov"
    description = "HoloV: crop-wise budgets from attention + feature variance, attention top-k per crop (pre-LLM)."

    beta: float = Float(0.09, ge=0, doc="weight of the similarity-variance term in the crop score")
    crops: int | None = Int(None, ge=1, none=True, doc="number of crops C; None = max(1, floor(16 N / (9 K)))")
    compat: str | None = Choice(
        None, (None, "official", "fixed"), doc="released behaviour or tokenzip's fixes; None = per family"
    )
    shortfall: str | None = Choice(
        None, (None, "zeros", "redistribute"), doc="saturated crops: zero rows or re-split; None = from compat"
    )
    newlines: str = Choice(
        "drop", tuple(m for m in NEWLINE_MODES if m != "keep"), doc="OneVision per-row newline tokens"
    )
    order: str = Choice("official", ("official", "raster"), doc="crop order (released) or sequence order")
    score_dtype: str = Choice(
        "float32",
        ("float32", "model"),
        doc="attention-score numerics: float32, or 'model' = the official fp16 / bf16 scoring (rounded to the "
        "model dtype)",
    )

    def validate(self) -> None:
        if self.newlines == "keep_nonempty_rows" and self.shortfall == "zeros":
            raise PolicyOptionError(
                "holov: newlines='keep_nonempty_rows' re-sorts tokens; use shortfall='redistribute'"
            )

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        official = self.rules(info) == "official"
        if info.vision_windowed and official and self.order != "official":
            raise PolicyOptionError(
                f"holov: order={self.order!r} is not available with compat='official' on Qwen2.5-VL "
                "(the released path keeps window order); use compat='fixed' or order='official'"
            )
        # the CLS query's row where the tower has one (LLaVA-1.5), else the mean received, at the projected layer
        kind = "cls" if info.vision_has_cls else "received"
        signal = VisionSignal(kind, info.vision_feature_layer, self.score_dtype)
        state = HoloVState(signal, official, qwen_official=official and info.vision_windowed)
        return Plan(pre_llm=True, vision_signals=(signal,), state=state)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """K rows per item (zero rows of the official shortfall included); the trailing newline of a video."""
        budget = item_budget(keep, shape.n_content)
        return Nominal([budget + structural(shape, self.newlines)] * info.n_llm_layers)

    def rules(self, info: ModelInfo) -> str:
        """`compat`, or the family default: "official" on LLaVA-1.5, "fixed" elsewhere."""
        if self.compat is not None:
            return self.compat
        return "official" if info.reference_architecture else "fixed"

    @differentiable_values()  # zero-padded / shifted-window values keep their autograd graph
    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        state: HoloVState = ctx.state
        official, qwen_official = state.official, state.qwen_official
        # 'keep_nonempty_rows' re-sorts the output into raster order, which has no place for zero rows
        raster_rows = self.newlines == "keep_nonempty_rows" and not qwen_official
        shortfall = self.shortfall or ("zeros" if official and not raster_rows else "redistribute")
        shape = ctx.item.shape
        content = ctx.content_available  # item-local, sequence order (raster per grid, frames in order)
        scores = ctx.signals[state.signal.key]
        attention = scores[content.to(scores.device)]
        features = ctx.embeds[content.to(ctx.embeds.device)]
        n = content.numel()
        budget = min(n, int(n * ctx.keep)) if qwen_official and isinstance(ctx.keep, float) else ctx.budget
        budget = max(1, budget)
        crops = min(n, self.crops) if self.crops else crop_count(n, budget)
        if qwen_official:
            return self._qwen_official(ctx, scores, budget, crops, shortfall)
        kept, n_pad = holov_select(features, attention, budget, crops, self.beta, shortfall)
        local = content[kept]
        if self.order == "raster":  # kept tokens back in sequence order, zero rows after them
            local = torch.sort(local).values
        extra = structural_to_keep(shape, local, self.newlines)
        if self.newlines == "keep_nonempty_rows":  # raster order, row newlines in place
            return Selection(torch.cat([local, extra]))
        # official order: kept tokens, structural tokens (a video's trailing newline), then zero rows standing
        # at the last kept token's position
        order = torch.cat([local, extra, local[-1:].expand(n_pad)])
        if not n_pad:
            return Selection(order, ordered=True)
        values = ctx.embeds[order.to(ctx.embeds.device)].clone()
        values[order.numel() - n_pad :] = 0
        return Selection(order, values, ordered=True, padding=n_pad)

    def _qwen_official(self, ctx: PreLLMItem, scores: torch.Tensor, budget: int, crops: int, shortfall: str):
        """The released Qwen path: window-order scores over the window [<|vision_start|>, pad_0 .. pad_{N-2}]."""
        shape = ctx.item.shape
        if ctx.before is None:
            raise PolicyOptionError("holov compat='official' on Qwen2.5-VL needs <|vision_start|> before the image")
        raster = scores[torch.arange(shape.length).to(scores.device)]
        window_scores = raster[shape.window_order.to(raster.device)] if shape.window_order is not None else raster
        features = torch.cat([ctx.before[None], ctx.embeds[:-1]])  # the shifted window's embeddings
        kept, n_pad = holov_select(features, window_scores, budget, crops, self.beta, shortfall)
        values = features[kept]
        if n_pad:  # zero rows at position index -1 = the window's last element
            values = torch.cat([values, features.new_zeros(n_pad, features.shape[-1])])
            kept = torch.cat([kept, torch.full((n_pad,), shape.length - 1)])
        return Selection(kept, values, ordered=True, padding=n_pad, offset=-1)
