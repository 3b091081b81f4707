"""`pool`: spatial average pooling of each image's token grid (per frame for video) to the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget, unreachable_budget
from ..contexts import Plan, PreLLMItem, Selection
from ..errors import PolicyOptionError
from ..items import GridPart
from ..ops.grad import differentiable_values
from ..ops.pool import pool_grid, pool_windows, pooled_grid_shape
from .base import Choice, Policy
from .common import split_budget
from .nominal import Nominal
from .registry import register


@register
@dataclass(frozen=True)
class PoolPolicy(Policy):
    """Average-pool every grid (each frame of a video, each part of an anyres image) to a smaller grid.

    The item's budget is split over its grids in proportion to their size; each grid is pooled to the largest
    aspect-preserving rows' x cols' grid with rows' * cols' <= its share. An item whose pooled grids fall more than
    one token short of its budget (8x8 at keep 0.222: 14 asked, 3x4 = 12 reachable) raises `BudgetError` naming the
    nearest keeps the grids do reach (`check_pool_budget`). A pooled token stands at its window's
    top-left cell (its position); per-row newline tokens follow the pooled rows unless `newlines="drop"`.
    Degenerate grids: a 1-row (1-column) grid pools along its length only, so a thin image still meets its
    budget; an empty grid (0 rows or 0 columns, LLaVA-OneVision's tile grid of a 4000x1 px image) takes no
    share of the budget and contributes no token. Pooled values are differentiable in the embeddings.
    """

    name = "pool"
    description = "Spatial average pooling of each image's token grid to the budget (pre-LLM)."

    newlines: str = Choice("keep", ("keep", "drop"), doc="OneVision per-row newline tokens after the pooled rows")

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        return Plan(pre_llm=True)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Exact: the pooled grids of every part / frame (+ their newlines)."""
        units = _grid_units(shape)
        check_pool_budget(keep, shape.n_content, units, item_budget(keep, shape.n_content))
        shares = split_budget(item_budget(keep, shape.n_content), [p.rows * p.cols for p, _ in units])
        total = shape.leading + shape.trailing
        for (part, _), share in zip(units, shares, strict=True):
            r, c = pooled_grid_shape(part.rows, part.cols, share)
            total += r * c + (r if part.newline_per_row and self.newlines == "keep" else 0)
        return Nominal([total] * info.n_llm_layers)

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        shape = ctx.item.shape
        if ctx.available.numel() != shape.length:
            raise PolicyOptionError("pool needs every token of the grid; it cannot follow a vision-stage pruning")
        with differentiable_values():  # pooled tokens are means of the embeddings: keep their autograd graph
            return self._pool_item(ctx)

    def _pool_item(self, ctx: PreLLMItem) -> Selection:
        shape = ctx.item.shape
        units = _grid_units(shape)
        check_pool_budget(ctx.keep, shape.n_content, units, ctx.budget)
        shares = split_budget(ctx.budget, [p.rows * p.cols for p, _ in units])
        keep_idx: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        groups: list[torch.Tensor] = [torch.zeros(2, 0, dtype=torch.long)]
        if shape.leading:
            keep_idx.append(torch.arange(shape.leading))
            values.append(ctx.embeds[: shape.leading])
        for (part, frame), share in zip(units, shares, strict=True):
            out_r, out_c = pooled_grid_shape(part.rows, part.cols, share)
            if out_r * out_c == 0:
                continue
            width = part.cols + int(part.newline_per_row)
            base = part.offset + frame * part.rows * width
            cells = base + (torch.arange(part.rows)[:, None] * width + torch.arange(part.cols)[None]).flatten()
            pooled = pool_grid(ctx.embeds[cells.to(ctx.embeds.device)], part.rows, part.cols, out_r, out_c)
            windows = pool_windows(part.rows, part.cols, out_r, out_c)
            reps = torch.tensor([base + r0 * width + c0 for r0, _, c0, _ in windows])
            grid = base + torch.arange(part.rows)[:, None] * width + torch.arange(part.cols)[None]
            members = [grid[r0:r1, c0:c1].flatten() for r0, r1, c0, c1 in windows]
            joined = torch.cat(members)
            groups.append(torch.stack([joined, reps.repeat_interleave(torch.tensor([m.numel() for m in members]))]))
            for row in range(out_r):
                keep_idx.append(reps[row * out_c : (row + 1) * out_c])
                values.append(pooled[row * out_c : (row + 1) * out_c])
                if part.newline_per_row and self.newlines == "keep":
                    last_row = windows[row * out_c][1] - 1
                    newline = base + last_row * width + part.cols
                    keep_idx.append(torch.tensor([newline]))
                    values.append(ctx.embeds[newline : newline + 1])
        if shape.trailing:
            tail = torch.arange(shape.length - shape.trailing, shape.length)
            keep_idx.append(tail)
            values.append(ctx.embeds[tail.to(ctx.embeds.device)])
        merges = torch.cat(groups, dim=1)
        merges = merges[:, merges[0] != merges[1]]  # a window's representative is its first cell
        if not keep_idx:  # nothing to pool (every grid empty) and no structural tokens
            return Selection(torch.zeros(0, dtype=torch.long), ctx.embeds[:0], ordered=True, groups=merges)
        return Selection(torch.cat(keep_idx), torch.cat(values), ordered=True, groups=merges)


def _grid_units(shape) -> list[tuple[GridPart, int]]:
    """(part, frame) of every non-empty grid of an item. A grid with 0 rows or 0 columns (the tile grid of an
    extreme-aspect image on LLaVA-OneVision, e.g. 4000x1 px) has no content and takes no share of the budget;
    its newline tokens (if any) are dropped with it, as those of every row that pools away."""
    return [(part, f) for part in shape.parts if part.rows * part.cols > 0 for f in range(part.frames)]


def pooled_total(units: list[tuple[GridPart, int]], budget: int) -> int:
    """Content tokens the pooled grids of `units` hold for an item budget of `budget` tokens."""
    shares = split_budget(budget, [p.rows * p.cols for p, _ in units])
    total = 0
    for (part, _), share in zip(units, shares, strict=True):
        rows, cols = pooled_grid_shape(part.rows, part.cols, share)
        total += rows * cols
    return total


def _fraction_for(tokens: int, n_content: int) -> float | None:
    """The smallest float keep with 4 decimals whose `item_budget` on n_content tokens is `tokens` (None if none)."""
    first = max(1, math.floor((tokens - 0.5) / n_content * 10_000))
    for k in range(first, min(10_000, math.ceil((tokens + 0.5) / n_content * 10_000)) + 1):
        if item_budget(k / 10_000, n_content) == tokens:
            return k / 10_000
    return None


def check_pool_budget(keep: Keep, n_content: int, units: list[tuple[GridPart, int]], budget: int) -> None:
    """`BudgetError` when the pooled grids of an item fall more than one token short of its `budget`, naming the
    nearest keeps below and above whose budgets the grids meet within one token (the pooled grid sizes are
    discrete: 8x8 reaches 12 = 3x4 and 16 = 4x4 tokens but not 14)."""
    total = pooled_total(units, budget)
    if budget - total <= 1:
        return

    def reachable(tokens: int) -> bool:
        return tokens - pooled_total(units, tokens) <= 1

    below = next((t for t in range(budget - 1, 0, -1) if reachable(t)), None)
    above = next((t for t in range(budget + 1, n_content + 1) if reachable(t)), None)
    if isinstance(keep, int):
        near = [below, above]
    else:
        near = [_fraction_for(t, n_content) if t is not None else None for t in (below, above)]
    grids = ", ".join(f"{p.rows}x{p.cols}" for p, _ in units[:4]) + (", ..." if len(units) > 4 else "")
    reason = f"the grids {grids} pool to at most {total} tokens within a budget of {budget}"
    raise unreachable_budget("pool", reason, keep, *near)
