"""Selection units: the grids (one per image part / video frame) a per-grid policy selects within."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..items import ItemShape


@dataclass(frozen=True)
class Unit:
    """One raster-ordered grid of content tokens inside an item.

    cells: LongTensor [rows * cols] item-local index of each cell, raster order.
    """

    part: int
    frame: int
    rows: int
    cols: int
    cells: torch.Tensor

    @property
    def size(self) -> int:
        return self.rows * self.cols


def grid_units(shape: ItemShape) -> list[Unit]:
    """Every (part, frame) grid of an item, in sequence order."""
    units = []
    for p, part in enumerate(shape.parts):
        width = part.cols + int(part.newline_per_row)
        for f in range(part.frames):
            base = part.offset + f * part.rows * width
            cells = base + (torch.arange(part.rows)[:, None] * width + torch.arange(part.cols)[None]).flatten()
            units.append(Unit(p, f, part.rows, part.cols, cells))
    return units


def split_evenly(total: int, parts: int) -> list[int]:
    """total split over `parts`: floor(total / parts) each, the first (total mod parts) get one more."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def proportional_two(total: int, first: int, second: int) -> tuple[int, int]:
    """Split `total` between two grids of sizes first / second: round(total * first / (first + second)) to the
    first (Python round), the rest to the second, each capped at its size."""
    k_first = min(first, round(total * first / (first + second)))
    k_second = min(second, total - k_first)
    return k_first, k_second
