"""Visual items (one image or one video) and where their tokens sit in a prompt.

An item's placeholder run in the LLM input is laid out as

    [leading structural tokens] part_0 part_1 ... [trailing structural tokens]

where each `GridPart` is a raster-ordered grid of frames x rows x cols content tokens, optionally with one
newline token after every row (LLaVA-OneVision's packed high-resolution grid). Structural tokens (CLS of a
'full' LLaVA strategy, OneVision newlines) are never counted in `keep` and never scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UnsupportedInputError


@dataclass(frozen=True)
class GridPart:
    """A raster-ordered grid of content tokens inside an item's run."""

    offset: int
    frames: int
    rows: int
    cols: int
    newline_per_row: bool = False

    @property
    def n_tokens(self) -> int:
        return self.frames * self.rows * (self.cols + int(self.newline_per_row))

    @property
    def n_content(self) -> int:
        return self.frames * self.rows * self.cols


@dataclass(frozen=True)
class ItemShape:
    """The token layout of one image / video as produced by the model's feature function.

    `vision_rows` is the [start, end) range of this item in the vision tower's batch: rows (tiles / frames /
    images) for CLIP and SigLIP, flattened patch tokens for Qwen2.5-VL. `window_order` (Qwen2.5-VL): for each
    position of the tower's window-permuted order, the raster index of the content token there (so
    `raster_scores[window_order]` is in window order).
    """

    modality: str
    parts: tuple[GridPart, ...]
    leading: int = 0
    trailing: int = 0
    vision_rows: tuple[int, int] = (0, 0)
    window_order: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def length(self) -> int:
        return self.leading + sum(p.n_tokens for p in self.parts) + self.trailing

    @property
    def n_content(self) -> int:
        return sum(p.n_content for p in self.parts)

    def content_mask(self) -> torch.Tensor:
        """BoolTensor [length]: True where the token is a grid cell, False for structural tokens."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        for part in self.parts:
            cells = torch.ones(part.frames, part.rows, part.cols + int(part.newline_per_row), dtype=torch.bool)
            if part.newline_per_row:
                cells[..., -1] = False
            mask[part.offset : part.offset + part.n_tokens] = cells.flatten()
        return mask

    def row_index(self) -> torch.Tensor:
        """LongTensor [length]: a running row number (over parts and frames) for every token inside a part,
        newline tokens included (a newline belongs to the row it ends); -1 for leading / trailing tokens."""
        out = torch.full((self.length,), -1, dtype=torch.long)
        base = 0
        for part in self.parts:
            width = part.cols + int(part.newline_per_row)
            rows = torch.arange(part.frames * part.rows).repeat_interleave(width)
            out[part.offset : part.offset + part.n_tokens] = rows + base
            base += part.frames * part.rows
        return out

    def newline_mask(self) -> torch.Tensor:
        """BoolTensor [length]: the per-row newline tokens of parts with `newline_per_row`."""
        return (self.row_index() >= 0) & ~self.content_mask()

    def coords(self) -> torch.Tensor:
        """LongTensor [length, 4] of (part, frame, row, col) per token; -1 everywhere for structural tokens."""
        out = torch.full((self.length, 4), -1, dtype=torch.long)
        for p_idx, part in enumerate(self.parts):
            width = part.cols + int(part.newline_per_row)
            f, r, c = torch.meshgrid(
                torch.arange(part.frames), torch.arange(part.rows), torch.arange(width), indexing="ij"
            )
            block = torch.stack([torch.full_like(f, p_idx), f, r, c], -1).reshape(-1, 4)
            if part.newline_per_row:
                block[block[:, 3] == part.cols] = -1
            out[part.offset : part.offset + part.n_tokens] = block
        return out


@dataclass(frozen=True)
class VisualItem:
    """One image / video located in a prompt: its shape plus its sample row and first placeholder position."""

    shape: ItemShape
    sample: int
    start: int
    index_in_sample: int
    index_in_modality: int

    @property
    def modality(self) -> str:
        return self.shape.modality

    @property
    def length(self) -> int:
        return self.shape.length

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + self.shape.length)


@dataclass
class ItemsOfBatch:
    """All items of one forward call, per sample in sequence order."""

    per_sample: list[list[VisualItem]] = field(default_factory=list)

    @property
    def all(self) -> list[VisualItem]:
        return [it for items in self.per_sample for it in items]

    def __bool__(self) -> bool:
        return any(self.per_sample)


def locate_items(
    input_ids: torch.Tensor,
    token_ids: dict[str, int],
    shapes: dict[str, list[ItemShape]],
) -> ItemsOfBatch:
    """Assign each item shape to its placeholder run.

    input_ids: [B, L]. `token_ids[modality]` is the placeholder id; `shapes[modality]` the item shapes in the
    order the model scatters their features (row-major over the batch). Raises `UnsupportedInputError` if
    the placeholder count does not match the shapes or a run is not contiguous.
    """
    per_sample: list[list[tuple[int, VisualItem]]] = [[] for _ in range(input_ids.shape[0])]
    for modality, item_shapes in shapes.items():
        token = token_ids[modality]
        hits = (input_ids == token).nonzero()  # row-major: (b, position)
        n_expected = sum(s.length for s in item_shapes)
        if hits.shape[0] != n_expected:
            raise UnsupportedInputError(
                f"the prompt holds {hits.shape[0]} {modality} placeholder tokens but the {modality} features "
                f"describe {n_expected}; tokenzip needs both to match (as the model itself does)"
            )
        cursor = 0
        for k, shape in enumerate(item_shapes):
            run = hits[cursor : cursor + shape.length]
            cursor += shape.length
            b = int(run[0, 0])
            start = int(run[0, 1])
            expected = torch.arange(start, start + shape.length, device=run.device)
            if not bool((run[:, 0] == b).all()) or not torch.equal(run[:, 1], expected):
                raise UnsupportedInputError(
                    f"{modality} item {k} does not occupy one contiguous run of placeholder tokens in one sample; "
                    "put each image/video's placeholders together (the processor does this)"
                )
            per_sample[b].append((start, VisualItem(shape, b, start, -1, k)))
    out = ItemsOfBatch()
    for items in per_sample:
        items.sort(key=lambda t: t[0])
        out.per_sample.append(
            [VisualItem(it.shape, it.sample, it.start, j, it.index_in_modality) for j, (_, it) in enumerate(items)]
        )
    return out
