"""DivPrune (CVPR 2025, arXiv 2503.02175; official code vbdi/divprune @ 799e2d9), training-free, pre-LLM.

Keeps the most diverse visual tokens: a greedy max-min selection on the cosine distance d(i, j) = 1 - cos(x_i, x_j)
of the LLM-input embeddings (projector outputs). The first pick is the token farthest from its nearest neighbour
(the second-smallest distance of its column, the smallest being its own); every next pick maximises the distance
to the nearest token already picked. K = round(keep * N) picks per item, kept in sequence order. Ties go to the
lower index (`torch.argmax` of the released code returns the first maximum).

Per family (docs/specs/divprune.md): LLaVA-1.5 is the official family (576 candidates, compact positions).
Qwen2.5-VL and LLaVA-OneVision are tokenzip adaptations: the same selection on each image / video's content tokens
(merged 2x2 units; OneVision's base grid and packed tiles together, frames together), original M-RoPE positions
on Qwen2.5-VL, OneVision row newlines kept where their row keeps a token (`newlines`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget
from ..contexts import Plan, PreLLMItem, Selection
from ..items import ItemShape
from ..signals.checks import require_finite
from .base import Choice, Policy
from .common import NEWLINE_MODES, structural_to_keep
from .nominal import Nominal, structural
from .registry import register


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """[N, N] 1 - cosine similarity of the rows of `features` [N, D] (each row divided by its norm, then a matrix
    product, as the released code computes it)."""
    unit = features / features.norm(dim=1, keepdim=True)
    return 1.0 - unit @ unit.t()


def divprune_select(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min selection of `k` of N candidates from their distance matrix [N, N]; indices in pick order.

    Pick 0 maximises each column's second-smallest entry; pick i maximises the column minimum over the rows picked
    so far (kept as a running minimum: the same values as recomputing it). Ties -> the lower index. A picked token
    is never picked again (tokenzip fix: the released code can re-pick one when the rest are exact duplicates of
    picks, e.g. identical background patches, since its own distance 1 - cos(x, x) rounds to a tiny positive
    number; it would then enter the LLM twice). The picks are sequential by nature: k steps, each vectorised over
    the N candidates."""
    n = distances.shape[0]
    k = min(k, n)
    picks = torch.empty(k, dtype=torch.long, device=distances.device)
    if k == 0:
        return picks
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=distances.device)
    nearest = torch.topk(distances, 2, dim=0, largest=False).values[1]  # [N] distance to the nearest other token
    picks[0] = torch.argmax(nearest)
    closest = distances[picks[0]].clone()  # [N] distance of each candidate to its nearest pick
    closest[picks[0]] = float("-inf")
    for i in range(1, k):
        picks[i] = torch.argmax(closest)
        closest = torch.minimum(closest, distances[picks[i]])
        closest[picks[i]] = float("-inf")
    return picks


@register
@dataclass(frozen=True)
class DivPrunePolicy(Policy):
    """DivPrune: the K most diverse visual tokens of each image (greedy max-min cosine distance of the LLM-input
    embeddings), before the LLM; kept tokens stay in sequence order."""

    name = "divprune"
    description = "DivPrune: greedy max-min cosine diversity of the projected visual tokens, per image (pre-LLM)."

    newlines: str = Choice("keep_nonempty_rows", NEWLINE_MODES, doc="OneVision per-row newline tokens")
    distance_dtype: str = Choice(
        "float32", ("float32", "model"), doc="distance numerics: float32, or 'model' = the embeddings' own dtype"
    )

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        return Plan(pre_llm=True)

    def nominal(self, info: ModelInfo, shape: ItemShape, keep: Keep) -> Nominal:
        """K per item (exact); newlines as `newlines` ('keep_nonempty_rows' assumes every row kept)."""
        return Nominal([item_budget(keep, shape.n_content) + structural(shape, self.newlines)] * info.n_llm_layers)

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        content = ctx.content_available
        features = ctx.embeds[content.to(ctx.embeds.device)].detach()
        if self.distance_dtype == "float32":
            features = features.float()
        where = f"sample {ctx.item.sample}'s {ctx.item.modality} {ctx.item.index_in_sample}"
        distances = cosine_distances(features)
        require_finite(distances, self.name, "the pre_llm stage", f"cosine distances of {where} (a zero embedding?)")
        picks = divprune_select(distances, ctx.budget)
        kept = torch.sort(content[picks.cpu()]).values
        extra = structural_to_keep(ctx.item.shape, kept, self.newlines)
        extra = extra[torch.isin(extra, ctx.available.cpu())]
        return Selection(torch.cat([kept, extra]).to(ctx.available.device))
