"""Dominant selection + contextual merging (VisionZip, CVPR 2025), shared by `visionzip` and `visiondrop`.

A set of n tokens becomes d "dominant" tokens (the highest-scoring ones, kept in sequence order) followed by c
"contextual" tokens: c targets spaced evenly through the tokens that were not dominant, every other such token
joined to its most similar target (cosine of a similarity metric, usually head-mean keys), each target's value
plus the mean of its members. `merge_contextual` is the merge on one token set; `dominant_contextual_rows`
applies it to the feature-layer rows of a CLIP tower before the projector (CLS optionally one of the dominant
tokens), `dominant_contextual_item` to one item's content tokens at the LLM input.
"""

from __future__ import annotations

import torch

from ..contexts import PreLLMItem, ProjectorInputContext, Selection
from ..ops.grad import differentiable_values
from ..ops.topk import topk_stable


def merge_contextual(
    values: torch.Tensor, metric: torch.Tensor, dominant: torch.Tensor, contextual: int, with_groups: bool = False
) -> tuple[torch.Tensor, ...]:
    """Dominant tokens in order, then up to `contextual` merged tokens.

    values: [n, D]; metric: [n, dk] (similarity features); dominant: LongTensor of indices in [0, n).
    The remaining R tokens (original order) give targets rest[0], rest[step], ... (step = max(1, R // c), the
    first c); every other remaining token joins the target of highest cosine similarity (ties -> the first
    target); a contextual token's value is its target's value plus the mean of its members (target alone if
    it has none). Returns (representative indices [d + c'] = sorted dominant then targets, values [d + c', D]),
    plus with `with_groups` the merges [2, m]: (merged index, its target's index) for every joined token.
    The output values are differentiable in `values` (autograd re-enabled inside a policy call); indices and
    assignments come from `metric` without gradient.
    """
    with differentiable_values():
        return _merge_contextual(values, metric.detach(), dominant, contextual, with_groups)


def _merge_contextual(
    values: torch.Tensor, metric: torch.Tensor, dominant: torch.Tensor, contextual: int, with_groups: bool
) -> tuple[torch.Tensor, ...]:
    n = values.shape[0]
    dominant = torch.sort(dominant.to(values.device)).values
    is_dom = torch.zeros(n, dtype=torch.bool, device=values.device)
    is_dom[dominant] = True
    rest = (~is_dom).nonzero().flatten()
    none = torch.zeros(2, 0, dtype=torch.long, device=values.device)
    if contextual <= 0 or rest.numel() == 0:
        return (dominant, values[dominant], none) if with_groups else (dominant, values[dominant])
    step = max(1, rest.numel() // contextual)
    targets = rest[::step][:contextual]
    is_target = torch.zeros(n, dtype=torch.bool, device=values.device)
    is_target[targets] = True
    others = rest[~is_target[rest]]
    work = torch.promote_types(values.dtype, torch.float32)  # half precision is merged in float32
    merged = values[targets].to(work).clone()
    groups = none
    if others.numel():
        met = metric.to(torch.promote_types(metric.dtype, torch.float32))
        unit = met / met.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        assign = (unit[others] @ unit[targets].T).argmax(1)  # first maximum = lowest target index
        sums = torch.zeros_like(merged).index_add_(0, assign, values[others].to(work))
        counts = torch.bincount(assign, minlength=targets.numel()).to(work)
        merged += torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], 0.0)
        groups = torch.stack([others, targets[assign]])
    reps = torch.cat([dominant, targets])
    out = torch.cat([values[dominant].to(work), merged]).to(values.dtype)
    return (reps, out, groups) if with_groups else (reps, out)


def dominant_contextual_rows(
    ctx: ProjectorInputContext, score_key: str, metric_key: str, dominant: int, contextual: int, include_cls: bool
) -> list[Selection]:
    """One `Selection` per tower row of a CLIP feature layer (index 0 = CLS), values in vision space.

    Scores `ctx.signals[score_key]` ([R, T], the CLS query's attention row) rank the patches; `metric_key` gives the
    [R, T, dk] similarity features. With `include_cls` the CLS token is the first dominant token (it counts in
    `dominant`, so dominant - 1 patches are chosen) and every other token (patches only) is a merge candidate;
    without it CLS is left out entirely and `dominant` patches are chosen. Kept indices are row indices (CLS = 0),
    in output order: dominant ascending, then the contextual targets; `groups` lists every merged token.
    """
    out = []
    for r in range(ctx.hidden.shape[0]):
        scores = ctx.signals[score_key][r]
        metric = ctx.signals[metric_key][r]
        if include_cls:
            top = topk_stable(scores[1:], dominant - 1) + 1
            chosen = torch.cat([torch.zeros(1, dtype=torch.long, device=top.device), top])
            reps, values, groups = merge_contextual(ctx.hidden[r], metric, chosen, contextual, True)
        else:
            chosen = topk_stable(scores[1:], dominant)
            reps, values, groups = merge_contextual(ctx.hidden[r, 1:], metric[1:], chosen, contextual, True)
            reps, groups = reps + 1, groups + 1
        out.append(Selection(reps, values, ordered=True, groups=groups))
    return out


def dominant_contextual_item(
    ctx: PreLLMItem, score_key: str, metric_key: str, dominant: int, contextual: int
) -> Selection:
    """The item's content tokens at the LLM input as `dominant` top-scoring tokens + `contextual` merged ones.

    Scores and metric are the item's mapped vision signals; the values merged are the LLM-input embeddings. Kept
    indices are item-local, in output order (dominant ascending, then targets); structural tokens are dropped,
    except a video's trailing newline, which stays last.
    """
    shape = ctx.item.shape
    dev = ctx.embeds.device
    content = ctx.content_available.to(dev)
    scores = ctx.signals[score_key][content]
    metric = ctx.signals[metric_key][content]
    chosen = topk_stable(scores, dominant)
    reps, values, groups = merge_contextual(ctx.embeds[content], metric, chosen, contextual, True)
    tail = torch.arange(shape.length - shape.trailing, shape.length, device=dev)  # a video's newline
    return Selection(
        torch.cat([content[reps], tail]), torch.cat([values, ctx.embeds[tail]]), ordered=True, groups=content[groups]
    )
