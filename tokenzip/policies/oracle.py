"""`oracle`: the reference selection that reads the synthetic generator's ground truth. NOT deployable.

It keeps the tokens that show what the question needs, as the generator of `tokenzip.synthetic` knows it: it is
the upper bound a selector can reach at a given keep on tokenzip's synthetic tasks, and it runs nowhere else (an
arbitrary image has no ground truth). Use it as the top row of an accuracy table, never as a compression method.

Ground truth is supplied around the forward / `generate` call, one coverage raster per visual item:

    with tokenzip.policies.oracle.ground_truth([[needed_raster(sample)] for sample in batch]):
        model.generate(**inputs)

`truth[b][j]` is a float tensor [T, H, W] (T = 1 for an image, source frames for a video) over item j (prompt
order) of batch sample b, in image coordinates (`tokenzip.synthetic.truth.needed_raster`,
`tokenzip.synthetic.truth.doc_truth` for an lmms-eval document). A patched call without it, or with other counts of
samples / items than the batch holds, raises `UnsupportedInputError` saying what is missing.

Selection per item (pre_llm only): the raster is area-pooled onto every `GridPart` of the item
(`tokenzip.synthetic.truth.coverage`: LLaVA's patch grid, Qwen2.5-VL's merge units with token frames = groups of
source frames, OneVision's base grid then its packed high-res grid) and concatenated in content order. The
informative tokens (coverage > 0) are kept by coverage, highest first (ties: lower index), up to the budget; the
rest of the budget goes to non-informative tokens evenly spaced in index order (`(arange(r) * m) // r` over the m
candidates). Only content tokens that reached the LLM input are chosen; structural tokens follow `newlines` as in
`random`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget
from ..contexts import Plan, PreLLMItem, Selection
from ..errors import UnsupportedInputError
from ..items import ItemShape
from .base import Choice, Policy
from .common import NEWLINE_MODES, structural_to_keep
from .nominal import Nominal, structural
from .registry import register

Truth = Sequence[Sequence[torch.Tensor]]  # per batch sample, per visual item: float [T, H, W]

_TRUTH: contextvars.ContextVar[Truth | None] = contextvars.ContextVar("tokenzip_oracle_truth", default=None)

HOW = (
    "wrap the call in `with tokenzip.policies.oracle.ground_truth(truth):`, truth = one list per batch sample "
    "(batch order) of one float [T, H, W] coverage raster per visual item (prompt order), e.g. "
    "tokenzip.synthetic.truth.needed_raster(sample); the oracle only runs on tokenzip's synthetic data"
)


@contextlib.contextmanager
def ground_truth(truth: Truth) -> Iterator[None]:
    """Make `truth` (per batch sample, per visual item: float [T, H, W] coverage raster in image coordinates) the
    ground truth the `oracle` policy reads inside the `with` block (a context variable: thread- and task-local)."""
    if isinstance(truth, torch.Tensor) or not isinstance(truth, Sequence):
        raise UnsupportedInputError(f"oracle ground truth must be a list (per sample) of lists of tensors; {HOW}")
    for b, items in enumerate(truth):
        if isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
            raise UnsupportedInputError(
                f"oracle ground truth of sample {b} is a {type(items).__name__}, not a list of tensors (one per "
                f"visual item); {HOW}"
            )
        for j, raster in enumerate(items):
            if not isinstance(raster, torch.Tensor) or raster.dim() != 3 or raster.shape[0] < 1:
                what = tuple(raster.shape) if isinstance(raster, torch.Tensor) else type(raster).__name__
                raise UnsupportedInputError(
                    f"oracle ground truth of sample {b}, item {j} must be a float tensor [T, H, W] with T >= 1, got "
                    f"{what}; {HOW}"
                )
    token = _TRUTH.set([list(items) for items in truth])
    try:
        yield
    finally:
        _TRUTH.reset(token)


def current_truth() -> Truth | None:
    """The ground truth set by the innermost active `ground_truth` block, or None."""
    return _TRUTH.get()


def _group(raster: torch.Tensor, frames: int, where: str) -> torch.Tensor:
    """raster [T, H, W] with T a multiple of `frames`: T source frames cover `frames` token frames. A count that
    falls short by less than one group is padded by repeating the last frame (Qwen2.5-VL's processor pads an odd
    frame count this way)."""
    t = raster.shape[0]
    group = -(-t // frames)
    missing = group * frames - t
    if missing >= group:
        raise UnsupportedInputError(
            f"oracle: the ground truth of {where} has {t} frames, which cannot cover the item's {frames} token "
            f"frames; supply one raster per source frame of that item ({HOW})"
        )
    if missing:
        raster = torch.cat([raster, raster[-1:].expand(missing, -1, -1)])
    return raster


def item_coverage(shape: ItemShape, raster: torch.Tensor, where: str = "the item") -> torch.Tensor:
    """float [n_content]: the share of each content token's cell covered by `raster` [T, H, W], in content order
    (the order of `shape.content_mask()`: part by part, raster order within a part, newlines excluded)."""
    from ..synthetic.truth import coverage

    raster = raster.detach().float().cpu()
    out = []
    for part in shape.parts:
        out.append(coverage(_group(raster, part.frames, where), part.frames, part.rows, part.cols))
    return torch.cat(out) if out else torch.zeros(0)


def oracle_choice(candidates: torch.Tensor, cov: torch.Tensor, budget: int) -> torch.Tensor:
    """The oracle's rule on one item.

    candidates: LongTensor [m] distinct item-local indices of the selectable content tokens; cov: float [m] their
    coverage. Returns LongTensor [min(budget, m)]: the informative candidates (cov > 0) by coverage descending
    (ties: lower index) up to `budget`, then the rest of the budget from the non-informative candidates, evenly
    spaced in index order (`(arange(r) * n) // r` over the n of them)."""
    order = torch.argsort(candidates)
    candidates, cov = candidates[order], cov[order]
    informative = cov > 0
    ranked = torch.sort(-cov[informative], stable=True).indices
    kept = candidates[informative][ranked][:budget]
    rest = candidates[~informative]
    r = min(budget - kept.numel(), rest.numel())
    if r > 0:
        kept = torch.cat([kept, rest[(torch.arange(r) * rest.numel()) // r]])
    return kept


@register
@dataclass(frozen=True)
class OraclePolicy(Policy):
    name = "oracle"
    description = (
        "NOT deployable: reads the synthetic generator's ground truth (tokenzip.policies.oracle.ground_truth) and "
        "keeps the tokens the question needs, filled evenly; the upper bound a selector can reach at a keep."
    )

    newlines: str = Choice("keep_nonempty_rows", NEWLINE_MODES, doc="OneVision per-row newlines")

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        return Plan(pre_llm=True)

    def nominal(self, info: ModelInfo, shape: ItemShape, keep: Keep) -> Nominal:
        """Exact counts; newlines assumed kept in every row ('keep_nonempty_rows')."""
        budget = item_budget(keep, shape.n_content)
        return Nominal([budget + structural(shape, self.newlines)] * info.n_llm_layers)

    def _raster(self, ctx: PreLLMItem) -> torch.Tensor:
        """The ground truth of ctx's item, after checking the supplied truth against the batch."""
        truth = _TRUTH.get()
        if truth is None:
            raise UnsupportedInputError(f"policy 'oracle' needs the generator's ground truth for every input: {HOW}")
        b, j = ctx.item.sample, ctx.item.index_in_sample
        if ctx.batch is not None:
            counts = [len(items) for items in ctx.batch.per_sample]
            given = [len(items) for items in truth]
            if counts != given:
                raise UnsupportedInputError(
                    f"oracle ground truth does not match the batch: it gives {given} rasters per sample, the batch "
                    f"holds {counts} visual items per sample; {HOW}"
                )
        elif b >= len(truth) or j >= len(truth[b]):
            raise UnsupportedInputError(
                f"oracle ground truth has no raster for sample {b}'s item {j} (it gives "
                f"{[len(items) for items in truth]} per sample); {HOW}"
            )
        return truth[b][j]

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        shape = ctx.item.shape
        where = f"sample {ctx.item.sample}'s {ctx.item.modality} {ctx.item.index_in_sample}"
        cov = item_coverage(shape, self._raster(ctx), where)  # [n_content]
        content = ctx.content_available.cpu()
        rank = torch.cumsum(shape.content_mask().long(), 0) - 1  # item-local index -> content index
        kept = oracle_choice(content, cov[rank[content]], ctx.budget)
        extra = structural_to_keep(shape, kept, self.newlines)
        extra = extra[torch.isin(extra, ctx.available.cpu())]
        return Selection(torch.cat([kept, extra]).to(ctx.available.device))
