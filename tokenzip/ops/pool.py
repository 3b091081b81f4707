"""Spatial pooling of token grids."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pooled_grid_shape(rows: int, cols: int, budget: int, max_distortion: float = 2.0) -> tuple[int, int]:
    """The (rows', cols') output grid for pooling a rows x cols grid to at most `budget` tokens.

    Candidates: rows' <= rows, cols' <= cols, rows' * cols' <= budget. Distortion = the factor by which the
    output's aspect ratio differs from the input's. Among candidates with distortion <= `max_distortion` (all
    candidates if none qualifies) take the most tokens; ties -> the least distortion, then more columns.
    E.g. 24x24 -> 64: 8x8, 128: 8x16, 192: 12x16, 23: 4x5; 4x4 -> 8: 2x4; 1x10 -> 3: 1x3. A degenerate grid (a
    thin image's 1-row or 1-column grid) pools along its long side only: 1x4000 -> 7: 1x7. An empty grid (0 rows
    or 0 columns, e.g. the tile grid of an extreme-aspect image on LLaVA-OneVision) or a budget of 0 -> (0, 0).
    """
    if rows <= 0 or cols <= 0 or budget <= 0:
        return 0, 0
    if budget >= rows * cols:
        return rows, cols
    scored = []
    for r in range(1, rows + 1):
        for c in range(1, min(cols, budget // r) + 1):
            distortion = max((r * cols) / (c * rows), (c * rows) / (r * cols))
            scored.append((distortion <= max_distortion + 1e-9, r * c, -distortion, c, r))
    best = max(scored)
    return best[4], best[3]


def pool_grid(tokens: torch.Tensor, rows: int, cols: int, out_rows: int, out_cols: int) -> torch.Tensor:
    """Average-pool a raster-ordered token grid to out_rows x out_cols (adaptive average pooling).

    tokens: [rows * cols, D]; returns [out_rows * out_cols, D] in raster order. Each output token is the
    mean of the input cells of its adaptive-pooling window (windows may overlap by one cell when the sizes
    do not divide). Half precision is averaged in float32 (float64 stays float64); differentiable in `tokens`.
    An empty grid (rows or cols 0) or an empty output gives [0, D].
    """
    d = tokens.shape[-1]
    if rows * cols == 0 or out_rows * out_cols == 0:
        return tokens.new_zeros(0, d)
    if not (1 <= out_rows <= rows and 1 <= out_cols <= cols):
        raise ValueError(f"pool_grid: cannot pool a {rows}x{cols} grid to {out_rows}x{out_cols}")
    grid = tokens.reshape(rows, cols, d).permute(2, 0, 1).unsqueeze(0)
    work = torch.promote_types(tokens.dtype, torch.float32)
    pooled = F.adaptive_avg_pool2d(grid.to(work), (out_rows, out_cols)).to(tokens.dtype)
    return pooled[0].permute(1, 2, 0).reshape(out_rows * out_cols, d)


def pool_windows(rows: int, cols: int, out_rows: int, out_cols: int) -> list[tuple[int, int, int, int]]:
    """The (row_start, row_end, col_start, col_end) input window of each adaptive-pooling output cell, raster order."""

    def bounds(n_in: int, n_out: int) -> list[tuple[int, int]]:
        return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]

    return [(r0, r1, c0, c1) for r0, r1 in bounds(rows, out_rows) for c0, c1 in bounds(cols, out_cols)]
