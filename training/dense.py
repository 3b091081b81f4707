"""Per-cell scene labels for the auxiliary dense loss used while training the bundled tiny models.

A from-scratch VLM learns slowly when the only signal is one answer word per question: the vision tower gets
no direct supervision. During training (only), small linear heads read the projected visual tokens and predict,
for every grid cell, the colour and shape of the object under the cell centre, the glyph printed there and the
column band of the cell, and (a regression) the horizontal position of the cell centre, so that left / right is
readable from a token alone and, being linear, survives the attention averages that carry it to the answer. The
heads are discarded; the shipped model is the plain HF class.
"""

from __future__ import annotations

import math

import torch

from tokenzip.synthetic.geometry import inside
from tokenzip.synthetic.scenes import COLORS, GLYPHS, SHAPES, Scene

COLOR_CLASSES = len(COLORS) + 1  # + background
SHAPE_CLASSES = len(SHAPES) + 1
GLYPH_CLASSES = len(GLYPHS) + 1
LABEL_COVER: dict[str, float | None] = {"v1": None, "v2": 0.25}  # per scene style: a cell shows an object (or the
# glyph) when the cell centre lies on it (None; the v1 bundles were trained so) or when it covers at least this
# share of the cell's area, and always on the cell holding its centre. v2 objects are about as wide as a patch: by
# the centre rule 14 % of them label no cell at all and 57 % one cell, whose neighbours, half covered, are then
# taught to look like background
SUBSAMPLES = 4  # points per cell side where coverage is measured
COLUMN_BANDS = 12  # horizontal position of a cell, in equal bands of the full image width (classes 1..12); 12 =
# one band per grid column of the 12-column grids (LLaVA, Qwen2.5-VL, OneVision's packed tiles)
_COLOR_INDEX = {c: i + 1 for i, c in enumerate(COLORS)}
_SHAPE_INDEX = {s: i + 1 for i, s in enumerate(SHAPES)}


def _cell_points(rows: int, cols: int, box: tuple[float, float, float, float], per_side: int):
    """Sample points of every cell of a rows x cols grid over `box`: (x, y), each [rows, cols, per_side ** 2]
    (per_side = 1: the cell centres)."""
    x0, y0, x1, y1 = box
    offsets = (torch.arange(per_side, dtype=torch.float64) + 0.5) / per_side
    ys = y0 + (torch.arange(rows, dtype=torch.float64)[:, None] + offsets) * (y1 - y0) / rows  # [rows, per_side]
    xs = x0 + (torch.arange(cols, dtype=torch.float64)[:, None] + offsets) * (x1 - x0) / cols
    y = ys[:, None, :, None].expand(rows, cols, per_side, per_side).reshape(rows, cols, -1)
    x = xs[None, :, None, :].expand(rows, cols, per_side, per_side).reshape(rows, cols, -1)
    return x, y


def covered(thing, rows: int, cols: int, box=(0, 0, 1, 1), min_cover: float | None = None) -> torch.Tensor:
    """[rows, cols] bool: the cells that show `thing` (an object or the glyph box) under the `LABEL_COVER` rule:
    the cell centre lies on it (`min_cover` None) or it covers at least `min_cover` of the cell; with a
    `min_cover`, the cell holding the thing's centre always counts."""
    x, y = _cell_points(rows, cols, box, 1 if min_cover is None else SUBSAMPLES)
    if hasattr(thing, "shape"):
        on = inside(thing.shape, x - thing.x, y - thing.y, thing.radius)
    else:
        on = ((x - thing.x).abs() <= thing.radius) & ((y - thing.y).abs() <= thing.radius)
    if min_cover is None:
        return on[..., 0]
    hit = on.double().mean(-1) >= min_cover
    x0, y0, x1, y1 = box
    r, c = math.floor((thing.y - y0) / (y1 - y0) * rows), math.floor((thing.x - x0) / (x1 - x0) * cols)
    if 0 <= r < rows and 0 <= c < cols:
        hit[r, c] = True
    return hit


def cell_labels(
    scene: Scene,
    rows: int,
    cols: int,
    box: tuple[float, float, float, float] = (0, 0, 1, 1),
    local_bands: bool = False,
):
    """[5, rows * cols] long: colour, shape and glyph class (0 = none) of each cell (`covered`: by the cell centre
    for v1 scenes, by area for v2, see `LABEL_COVER`), the cell's column
    band (1..COLUMN_BANDS, every cell has one) and, on the one cell holding an object's centre, that object's shape
    class (0 elsewhere), raster order.

    `box` = (x0, y0, x1, y1) is the part of the image the grid covers (a tile of an anyres image). With
    `local_bands` the column band is measured across the box instead of the whole image: a tower that encodes each
    tile on its own (OneVision's) cannot know where its tile sits, so only the band inside the tile is learnable
    there; the LLM sees which tile a token belongs to from its place in the sequence.
    """
    x0, y0, x1, y1 = box
    x = x0 + (torch.arange(cols, dtype=torch.float64) + 0.5) * (x1 - x0) / cols
    x = x.expand(rows, cols)
    min_cover = LABEL_COVER[scene.style]
    color = torch.zeros(rows, cols, dtype=torch.long)
    shape = torch.zeros(rows, cols, dtype=torch.long)
    glyph = torch.zeros(rows, cols, dtype=torch.long)
    for obj in scene.objects:  # later objects are drawn on top
        hit = covered(obj, rows, cols, box, min_cover)
        color[hit] = _COLOR_INDEX[obj.color]
        shape[hit] = _SHAPE_INDEX[obj.shape]
    if scene.glyph is not None:
        g = scene.glyph
        hit = covered(g, rows, cols, box, min_cover)
        glyph[hit] = GLYPHS.index(g.char) + 1
        color[hit] = 0
        shape[hit] = 0
    across = ((torch.arange(cols, dtype=torch.float64) + 0.5) / cols).expand(rows, cols) if local_bands else x
    band = (across * COLUMN_BANDS).long().clamp(0, COLUMN_BANDS - 1) + 1
    centre = torch.zeros(rows, cols, dtype=torch.long)
    for obj in scene.objects:  # the one cell holding each object's centre (what counting can attend to)
        r, c = math.floor((obj.y - y0) / (y1 - y0) * rows), math.floor((obj.x - x0) / (x1 - x0) * cols)
        if 0 <= r < rows and 0 <= c < cols:
            centre[r, c] = _SHAPE_INDEX[obj.shape]
    return torch.stack([color, shape, glyph, band, centre]).flatten(1)


def band_x(band: torch.Tensor) -> torch.Tensor:
    """Column band labels (1..COLUMN_BANDS, any shape) -> the band centre's horizontal position, scaled to [-1, 1]
    (the regression target of `DenseHeads.x`)."""
    return 2 * (band.float() - 0.5) / COLUMN_BANDS - 1


class DenseHeads(torch.nn.Module):
    """Linear colour / shape / glyph / column-band / object-centre classifiers and a horizontal-position regression
    over visual tokens [N, D] (training only)."""

    NAMES = ("color", "shape", "glyph", "column", "centre")

    def __init__(self, dim: int, glyph_weight: float = 1.0) -> None:
        super().__init__()
        if glyph_weight <= 0:
            raise ValueError(f"glyph_weight must be > 0, got {glyph_weight}")
        self.glyph_weight = glyph_weight  # the glyph head's share of the loss, relative to each other head's 1
        self.color = torch.nn.Linear(dim, COLOR_CLASSES)
        self.shape = torch.nn.Linear(dim, SHAPE_CLASSES)
        self.glyph = torch.nn.Linear(dim, GLYPH_CLASSES)
        self.column = torch.nn.Linear(dim, COLUMN_BANDS + 1)
        self.centre = torch.nn.Linear(dim, SHAPE_CLASSES)
        self.x = torch.nn.Linear(dim, 1)

    def heads(self) -> tuple[torch.nn.Linear, ...]:
        return tuple(getattr(self, name) for name in self.NAMES)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens [N, D], labels [5, N] -> weighted mean of the cross-entropies and the position regression,
        each cross-entropy balanced so that the few cells on an object (or on the glyph) weigh as much as the
        background: averaged over all cells, the background dominates and the heads learn colour (trivial) but
        never shape or glyph identity. The glyph term weighs `glyph_weight`, every other term 1."""
        total = tokens.new_zeros(())
        for name, head, target in zip(self.NAMES, self.heads(), labels):
            logits = head(tokens)
            on = target > 0
            ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            object_part = ce[on].mean() if on.any() else ce.new_zeros(())
            background_part = ce[~on].mean() if (~on).any() else ce.new_zeros(())
            weight = self.glyph_weight if name == "glyph" else 1.0
            total = total + weight * (object_part + background_part)
        x = torch.nn.functional.mse_loss(self.x(tokens).squeeze(-1), band_x(labels[3]))
        return (total + x) / (len(self.NAMES) + self.glyph_weight)

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Share of the labelled cells (class > 0) each head gets right, and (`x`) of the cells whose regressed
        position is within half a column band: tokens [N, D], labels [5, N]."""
        out = {}
        for name, head, target in zip(self.NAMES, self.heads(), labels):
            on = target > 0
            hits = head(tokens[on]).argmax(-1) == target[on]
            out[name] = round(hits.float().mean().item(), 4) if on.any() else float("nan")
        error = (self.x(tokens).squeeze(-1) - band_x(labels[3])).abs()
        out["x"] = round((error < 1 / COLUMN_BANDS).float().mean().item(), 4)  # within half a band of the centre
        return out


def object_cells(things: list, rows: int, cols: int, min_cover: float | None = None) -> torch.Tensor:
    """[rows * cols] bool: cells that show one of `things` (objects or a glyph box; `covered` with `min_cover`,
    see `LABEL_COVER`), plus each thing's centre cell (a thin triangle may cover no cell centre)."""
    hit = torch.zeros(rows, cols, dtype=torch.bool)
    for t in things:
        hit |= covered(t, rows, cols, min_cover=min_cover)
        hit[min(rows - 1, int(t.y * rows)), min(cols - 1, int(t.x * cols))] = True
    return hit.flatten()


def centre_cells(things: list, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols] bool: the cell holding each thing's centre (the `centre` label of `cell_labels`)."""
    hit = torch.zeros(rows, cols, dtype=torch.bool)
    for t in things:
        hit[min(rows - 1, math.floor(t.y * rows)), min(cols - 1, math.floor(t.x * cols))] = True
    return hit.flatten()
