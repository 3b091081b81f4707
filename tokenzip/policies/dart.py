"""`dart`: DART, duplication-aware pruning inside the LLM (Wen et al., EMNLP 2025; docs/specs/dart.md).

Before decoder layer K (default 2) a few pivot tokens are chosen by the L1 norm of their layer K-1 keys: the
`image_pivots` largest among the sample's visual tokens and the `text_pivots` largest among the text after its
last image. Taking the pivots one at a time, each claims the not-yet-kept visual tokens least similar to it
(cosine similarity of the hidden states entering layer K, passed through the LLM's final norm); the image pivots
and every claimed token are kept, with their original positions. The kept count R per sample is the FastV
schedule of the layer-averaged budget (`tokenzip.budget.one_stage_count`); R minus the image pivots is split
evenly over the pivots, the remainder going one each to the first pivots in processing order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters.base import ModelInfo
from ..contexts import LLMSignal, LLMStageContext, Selection
from ..errors import TokenzipError
from ..ops.topk import topk_stable
from ..signals.checks import require_finite
from .base import Int
from .registry import register
from .scorer import LLMScorerPolicy


def pivot_order(image_positions: list[int], text_positions: list[int]) -> list[int]:
    """The order the pivots claim tokens in, as indices into `image_positions + text_positions`.

    The official code iterates over a Python `set` of the pivots' prompt positions (built from the image pivots,
    then the text pivots, each in descending key norm), so the order is CPython's set order of those integers
    (by value modulo the table size, insertion order on collisions). It is reproduced here on purpose: with
    several pivots competing for the same dissimilar tokens, the order changes which tokens are kept."""
    positions = image_positions + text_positions
    where = {pos: i for i, pos in enumerate(positions)}
    if len(where) != len(positions):
        raise TokenzipError(f"dart: pivot positions must be distinct, got {positions}")
    return [where[pos] for pos in set(positions)]


def dart_select(
    image_norms: torch.Tensor,
    text_norms: torch.Tensor,
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    image_positions: torch.Tensor,
    text_positions: torch.Tensor,
    count: int,
    image_pivots: int = 4,
    text_pivots: int = 4,
) -> torch.Tensor:
    """Indices (ascending) of the `count` visual tokens DART keeps out of N.

    image_norms [N] / text_norms [T]: key L1 norms (pivot scores); image_states [N, D] / text_states [T, D]: the
    normed hidden states compared by cosine similarity; *_positions: prompt positions (they fix the pivot order,
    see `pivot_order`). Ties go to the lower index, for the pivots and for the claimed tokens alike.
    """
    n = int(image_norms.numel())
    if count >= n:
        return torch.arange(n)
    p = min(image_pivots, count)
    image_piv = topk_stable(image_norms.float().cpu(), p)
    text_piv = topk_stable(text_norms.float().cpu(), min(text_pivots, int(text_norms.numel())))
    vectors = torch.cat([image_states[image_piv], text_states[text_piv]]).float()
    order = pivot_order(image_positions[image_piv].tolist(), text_positions[text_piv].tolist())
    base, extra = divmod(count - p, len(order))
    states = image_states.float()
    alive = torch.ones(n, dtype=torch.bool)
    alive[image_piv] = False
    kept = [image_piv]
    for rank, i in enumerate(order):
        want = base + (1 if rank < extra else 0)
        if want == 0:
            continue
        candidates = alive.nonzero().flatten()
        similarity = F.cosine_similarity(vectors[i][None], states[candidates.to(states.device)], dim=-1)
        picked = candidates[topk_stable(-similarity.cpu(), want)]
        alive[picked] = False
        kept.append(picked)
    return torch.sort(torch.cat(kept)).values


def text_after_images(ctx: LLMStageContext, b: int) -> torch.Tensor:
    """Slots of sample b's real text tokens after its last visual item's last token (DART's text pivots)."""
    layout = ctx.layout
    valid, item = layout.valid[b], layout.item[b]
    in_item = (valid & (item >= 0)).nonzero().flatten()
    start = int(in_item[-1]) + 1 if in_item.numel() else 0
    text = (valid & (item < 0)).nonzero().flatten()
    return text[text >= start]


@register
@dataclass(frozen=True)
class DARTPolicy(LLMScorerPolicy):
    """DART: before decoder layer K keep the visual tokens least similar to a few pivots (largest layer K-1 key
    norms; image and text pivots), the image pivots included."""

    name = "dart"
    description = "DART: at LLM layer K keep the visual tokens least similar to key-norm pivots (deduplication)"

    layer: int = Int(2, ge=1, doc="decoder layer K the tokens are dropped before (key norms from layer K-1)")
    image_pivots: int = Int(4, ge=1, doc="pivots among the visual tokens (largest key L1 norm), kept")
    text_pivots: int = Int(4, ge=0, doc="pivots among the text after the last image (largest key L1 norm), not kept")

    def signals(self, info: ModelInfo) -> tuple[LLMSignal, ...]:
        return (LLMSignal("key_l1", self.layer - 1),)

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        layout = ctx.layout
        norms = ctx.signals[LLMSignal("key_l1", self.layer - 1).key]
        where = f"layer {ctx.layer}"
        out = []
        for b, target in enumerate(ctx.item_targets()):
            slots = layout.visual_slots(b)
            if not slots.numel():
                out.append(Selection(slots))
                continue
            sizes = [it.shape.n_content for it in ctx.items.per_sample[b]]
            count = self.count(slots.numel(), target, ctx.info.n_llm_layers, ctx.keep, sizes)
            text = text_after_images(ctx, b)
            both = torch.cat([slots, text])
            scores = norms[b, both.to(norms.device)].float().cpu()
            require_finite(scores, self.name, where, f"key norms of sample {b}'s visual and text tokens")
            states = ctx.final_norm(ctx.hidden_states[b : b + 1, both.to(ctx.hidden_states.device)])[0].float()
            require_finite(states, self.name, where, f"normed hidden states of sample {b}")
            n = slots.numel()
            orig = layout.orig[b].cpu()
            orig = orig[both.cpu()] - orig[layout.valid[b].cpu()].min()  # position in the sample's own prompt
            keep = dart_select(
                scores[:n], scores[n:], states[:n], states[n:], orig[:n], orig[n:], count,
                self.image_pivots, self.text_pivots,
            )  # fmt: skip
            out.append(Selection(slots[keep.to(slots.device)]))
        return out
