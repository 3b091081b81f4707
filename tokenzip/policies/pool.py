"""`pool`: spatial average pooling of each image's token grid (per frame for video) to the budget."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget
from ..contexts import Plan, PreLLMItem, Selection
from ..errors import PolicyOptionError
from ..ops.pool import pool_grid, pool_windows, pooled_grid_shape
from .base import Policy
from .common import split_budget
from .nominal import Nominal
from .registry import register


@register
class PoolPolicy(Policy):
    """Average-pool every grid (each frame of a video, each part of an anyres image) to a smaller grid.

    The item's budget is split over its grids in proportion to their size; each grid is pooled to the largest
    aspect-preserving rows' x cols' grid with rows' * cols' <= its share (so an item may keep slightly fewer
    tokens than the budget; `patch.stats` reports the real count). A pooled token stands at its window's
    top-left cell (its position); per-row newline tokens follow the pooled rows unless `newlines="drop"`.
    """

    name = "pool"
    description = "Spatial average pooling of each image's token grid to the budget (pre-LLM)."
    defaults: ClassVar[dict[str, Any]] = {"newlines": "keep"}

    def validate(self) -> None:
        if self.options["newlines"] not in ("keep", "drop"):
            raise PolicyOptionError(f"pool: newlines={self.options['newlines']!r}; choose 'keep' or 'drop'")

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        return Plan(pre_llm=True)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Exact: the pooled grids of every part / frame (+ their newlines)."""
        units = [(part, f) for part in shape.parts for f in range(part.frames)]
        shares = split_budget(item_budget(keep, shape.n_content), [p.rows * p.cols for p, _ in units])
        total = shape.leading + shape.trailing
        for (part, _), share in zip(units, shares, strict=True):
            if share:
                r, c = pooled_grid_shape(part.rows, part.cols, share)
                total += r * c + (r if part.newline_per_row and self.options["newlines"] == "keep" else 0)
        return Nominal([total] * info.n_llm_layers)

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        shape = ctx.item.shape
        if ctx.available.numel() != shape.length:
            raise PolicyOptionError("pool needs every token of the grid; it cannot follow a vision-stage pruning")
        units = [(part, f) for part in shape.parts for f in range(part.frames)]
        shares = split_budget(ctx.budget, [p.rows * p.cols for p, _ in units])
        keep_idx: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        groups: list[torch.Tensor] = [torch.zeros(2, 0, dtype=torch.long)]
        if shape.leading:
            keep_idx.append(torch.arange(shape.leading))
            values.append(ctx.embeds[: shape.leading])
        for (part, frame), share in zip(units, shares):
            if share == 0:
                continue
            width = part.cols + int(part.newline_per_row)
            base = part.offset + frame * part.rows * width
            cells = base + (torch.arange(part.rows)[:, None] * width + torch.arange(part.cols)[None]).flatten()
            out_r, out_c = pooled_grid_shape(part.rows, part.cols, share)
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
                if part.newline_per_row and self.options["newlines"] == "keep":
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
        return Selection(torch.cat(keep_idx), torch.cat(values), ordered=True, groups=merges)
