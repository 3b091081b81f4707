"""Token overlays: which visual tokens of an image or video were kept, merged or dropped, drawn on what the model saw.

    from tokenzip.viz import show
    picture = show(model, processor, image, "What color is the square ?", "hiprune", keep=0.11)

    # any recorded prefill (videos too), optionally one row per stage:
    with tokenzip.apply(model, "holitom", 0.11) as patch:
        model(**inputs)
    picture = draw_item(model, patch.stats.last.samples[0].items[0], frames, stages=True)

Every grid of an item becomes one panel, side by side: LLaVA-1.5's single grid, Qwen2.5-VL's merged grid (one panel
per temporal patch of a video), LLaVA-OneVision's base image then its packed high-resolution tiles (one panel per
frame of a video). Each panel is the picture brought to the model's view (LLaVA-1.5: shortest-edge resize and
centre crop; the others: a resize to the grid), so cell k of a panel is the token at that grid position.

* dropped cells are darkened towards black (`dim`);
* kept cells keep their pixels and get a thin gold outline;
* merged groups (a pre-LLM merge recorded by the policy in `ItemRecord.groups`: pooling, VisionDrop, MustDrop)
  are tinted in one colour per group, the kept token that carries the group outlined in that colour.

With `stages=True` each stage that changed the item's tokens gets its own row (`ItemRecord.stages`: the tower-side
stage, the LLM input, then every decoder layer that pruned), labelled on its left.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from .adapters import get_adapter
from .engine.state import ItemRecord
from .errors import UnsupportedInputError, UnsupportedModelError
from .items import GridPart

OUTLINE = (255, 215, 0)
TINT = 0.5  # opacity of a merged group's colour over its cells
GAP = 4  # white pixels between panels
LABEL_WIDTH = 72  # left margin holding the stage names (stages=True only)
DROPPED, KEPT, MERGED = 0, 1, 2


def group_colors(n: int) -> list[tuple[int, int, int]]:
    """`n` well-separated saturated colours (golden-ratio steps around the hue circle)."""
    out = []
    for k in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.13 + k * 0.618034) % 1.0, 0.85, 0.95)
        out.append((round(255 * r), round(255 * g), round(255 * b)))
    return out


def _cell_index(length: int, cells: int) -> np.ndarray:
    """[length] cell of every pixel along one axis: cell c spans [c * length // cells, (c + 1) * length // cells)."""
    starts = np.array([c * length // cells for c in range(cells)])
    return np.searchsorted(starts, np.arange(length), side="right") - 1


def render_cells(
    image: Image.Image,
    state: np.ndarray,
    colors: np.ndarray | None = None,
    dim: float = 0.75,
    outline: bool = True,
) -> Image.Image:
    """Draw a [rows, cols] grid of cell states on `image`.

    state: int array [rows, cols] of DROPPED / KEPT / MERGED; colors: optional uint8 [rows, cols, 3] group colour of
    each cell (all zeros where a cell is in no group). DROPPED cells are darkened by `dim`, MERGED cells and kept cells
    with a colour are tinted with it, kept cells are outlined (in their group colour, else gold).
    """
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim}")
    rows, cols = state.shape
    width, height = image.size
    ry, cx = _cell_index(height, rows), _cell_index(width, cols)
    pixel_state = state[ry[:, None], cx[None, :]]  # [H, W]
    out = image.convert("RGB").copy()
    shade = Image.fromarray(np.where(pixel_state == DROPPED, round(255 * dim), 0).astype(np.uint8), "L")
    out = Image.composite(Image.new("RGB", out.size, (0, 0, 0)), out, shade)
    grouped = np.zeros_like(pixel_state, dtype=bool)
    if colors is not None:
        pixel_color = colors[ry[:, None], cx[None, :]]  # [H, W, 3]
        grouped = (pixel_color.sum(-1) > 0) & (pixel_state != DROPPED)
        tint = Image.fromarray(np.where(grouped, round(255 * TINT), 0).astype(np.uint8), "L")
        out = Image.composite(Image.fromarray(pixel_color.astype(np.uint8), "RGB"), out, tint)
    if outline:
        cell = ry[:, None] * cols + cx[None, :]
        border = np.zeros_like(cell, dtype=bool)
        border[0, :] = border[-1, :] = True
        border[:, 0] = border[:, -1] = True
        border[1:, :] |= cell[1:, :] != cell[:-1, :]
        border[:-1, :] |= cell[:-1, :] != cell[1:, :]
        border[:, 1:] |= cell[:, 1:] != cell[:, :-1]
        border[:, :-1] |= cell[:, :-1] != cell[:, 1:]
        edge = border & (pixel_state == KEPT)
        pixels = np.array(out)
        pixels[edge & ~grouped] = OUTLINE
        if colors is not None:
            pixels[edge & grouped] = pixel_color[edge & grouped]
        out = Image.fromarray(pixels, "RGB")
    return out


def overlay(image: Image.Image, kept: torch.Tensor, dim: float = 0.75, outline: bool = True) -> Image.Image:
    """`image` with every dropped cell of the [rows, cols] bool grid `kept` darkened by `dim` (0 = unchanged,
    1 = black) and the kept cells outlined."""
    return render_cells(image, kept.cpu().numpy().astype(np.int64), dim=dim, outline=outline)


def kept_grid(kept_indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] bool: True where the token (raster index) entered the LLM."""
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[kept_indices.long().cpu()] = True
    return mask.view(rows, cols)


@dataclass
class Panel:
    """One grid of an item as drawn: the picture at the model's view and the item-local index of every cell."""

    image: Image.Image
    cells: torch.Tensor  # LongTensor [rows, cols]


def _cells(part: GridPart, frame: int) -> torch.Tensor:
    """[rows, cols] item-local indices of one frame of a grid part (newline tokens skipped)."""
    width = part.cols + int(part.newline_per_row)
    base = part.offset + frame * part.rows * width
    return base + torch.arange(part.rows)[:, None] * width + torch.arange(part.cols)[None]


def panels(model, item: ItemRecord, pictures: list[Image.Image]) -> list[Panel]:
    """The panels of one recorded item: `pictures` is [image] for an image, the frames for a video."""
    adapter = get_adapter(model)
    if item.shape is None:
        raise UnsupportedInputError("this ItemRecord carries no token layout (recorded by an older tokenzip?)")
    if not pictures:
        raise ValueError("pictures must hold the image, or the frames of a video")
    out = []
    for part in item.shape.parts:
        unit = adapter.cell_pixels(item.modality, part)  # pixels per cell side at the model's view
        size = (part.cols * unit, part.rows * unit)
        for frame in range(part.frames):
            source = pictures[min(len(pictures) - 1, frame * len(pictures) // part.frames)].convert("RGB")
            if adapter.crops_images:
                view = ImageOps.fit(source, size, Image.Resampling.BICUBIC)
            else:
                view = source.resize(size, Image.Resampling.BICUBIC)
            out.append(Panel(view, _cells(part, frame)))
    return out


def cell_states(item: ItemRecord, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(state [length] of DROPPED / KEPT / MERGED, group id [length] or -1) of every item-local token, given the
    item-local indices `present` at some stage. A token is MERGED when the policy merged it into a token that is
    present; the group id numbers the distinct present representatives."""
    length = item.tokens
    state = torch.full((length,), DROPPED, dtype=torch.long)
    present = present.long().cpu()
    present = present[(present >= 0) & (present < length)]
    state[present] = KEPT
    group = torch.full((length,), -1, dtype=torch.long)
    if item.groups is not None and item.groups.numel():
        members, reps = item.groups.long().cpu()
        live = (state[reps] == KEPT) & (members >= 0) & (members < length)
        members, reps = members[live], reps[live]
        ids = torch.unique(reps, return_inverse=True)[1]
        group[members] = ids
        group[reps] = ids
        state[members[state[members] == DROPPED]] = MERGED
    return state, group


def stage_views(item: ItemRecord, stages: bool) -> list[tuple[str, torch.Tensor]]:
    """(name, present indices) to draw: the LLM input only, or every recorded stage."""
    if not stages or not item.stages:
        return [("LLM input", item.kept_indices)]
    return list(item.stages)


def draw_item(
    model, item: ItemRecord, pictures: Image.Image | list[Image.Image], dim: float = 0.75, stages: bool = False
) -> Image.Image:
    """The overlay of one recorded item (`patch.stats.last.samples[b].items[j]`) on its image or video frames.

    Panels (grids, frames) are laid out left to right, `GAP` pixels apart; with `stages=True` one row per stage,
    its name in a left margin of `LABEL_WIDTH` pixels.
    """
    pictures = [pictures] if isinstance(pictures, Image.Image) else list(pictures)
    grid = panels(model, item, pictures)
    views = stage_views(item, stages)
    margin = LABEL_WIDTH if stages else 0
    width = margin + sum(p.image.width for p in grid) + GAP * (len(grid) - 1)
    height = max(p.image.height for p in grid)
    canvas = Image.new("RGB", (width, height * len(views) + GAP * (len(views) - 1)), (255, 255, 255))
    for row, (name, present) in enumerate(views):
        state, group = cell_states(item, present)
        palette = torch.tensor([(0, 0, 0), *group_colors(int(group.max()) + 1)], dtype=torch.uint8)
        top = row * (height + GAP)
        x = margin
        for p in grid:
            colors = palette[group[p.cells] + 1].numpy() if item.groups is not None else None
            canvas.paste(render_cells(p.image, state[p.cells].numpy(), colors, dim), (x, top))
            x += p.image.width + GAP
        if stages:
            ImageDraw.Draw(canvas).text((2, top + 2), name, fill=(0, 0, 0))
    return canvas


def model_view(image: Image.Image, model, inputs: dict, index: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """The image as the model sees it and its token grid (rows, cols), for image `index` of the batch (LLaVA-1.5 and
    Qwen2.5-VL single grids; `panels` covers every layout)."""
    adapter = get_adapter(model)
    try:
        rows, cols = adapter.image_grid(inputs, index)
    except UnsupportedModelError as err:
        raise UnsupportedInputError(f"model_view covers single-grid images: {err}") from err
    unit = adapter.cell_pixels("image", GridPart(0, 1, rows, cols))
    size = (cols * unit, rows * unit)
    image = image.convert("RGB")
    if adapter.crops_images:
        return ImageOps.fit(image, size, Image.Resampling.BICUBIC), (rows, cols)
    return image.resize(size, Image.Resampling.BICUBIC), (rows, cols)


@torch.no_grad()
def show(
    model,
    processor,
    image: Image.Image,
    question: str,
    policy: str,
    keep: Any = 0.111,
    dim: float = 0.75,
    stages: bool = False,
    **options,
) -> Image.Image:
    """Run one prefill of `question` about `image` under `policy` and draw its tokens (`draw_item`).

    A patch the model already has is suspended for this one prefill and restored afterwards, unchanged."""
    import warnings

    import tokenzip

    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt"))
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with warnings.catch_warnings():  # stacking over the user's patch is intended here (restored on exit)
        warnings.simplefilter("ignore", tokenzip.TokenzipWarning)
        patch = tokenzip.apply(model, policy, keep, **options)
    with patch:
        model(**inputs)
        record = patch.stats.last
    return draw_item(model, record.samples[0].items[0], image, dim=dim, stages=stages)


MIN_FIGURE_WIDTH = 512  # pixels: `figure` never returns a narrower picture


def panel_labels(model, item: ItemRecord) -> list[str]:
    """One label per panel of `draw_item`, left to right: 'image'; OneVision anyres 'base image' then 'high-res
    tiles'; 'frame k' for videos (Qwen2.5-VL: 'frames 2t-2t+1', the two frames of one temporal patch)."""
    per_cell = get_adapter(model).temporal_patch  # frames per token cell (2 on Qwen2.5-VL)
    parts = item.shape.parts if item.shape is not None else []
    labels = []
    for p, part in enumerate(parts):
        for frame in range(part.frames):
            if item.modality == "video":
                first = per_cell * frame
                labels.append(f"frames {first}-{first + per_cell - 1}" if per_cell > 1 else f"frame {frame}")
            elif len(parts) > 1:
                labels.append("base image" if p == 0 else "high-res tiles")
            else:
                labels.append("image")
    return labels


def prompt_inputs(model, processor, image: Image.Image, question: str) -> dict:
    """Processor inputs of one image and one question in the model's chat template, on the model's device."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt"))
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def figure(
    model,
    record,
    pictures: Image.Image | list[Image.Image],
    sample: int = 0,
    item: int = 0,
    dim: float = 0.75,
    stages: bool = False,
    subtitle: str = "",
) -> Image.Image:
    """`draw_item` of one recorded item as a labelled figure at least `MIN_FIGURE_WIDTH` pixels wide: a title with
    the policy, keep and the item's counts (kept of content tokens entering the LLM, the sample's layer average
    and budget), `subtitle` (e.g. the question and answer) below it, a label above every panel (OneVision: base
    image vs high-res tiles) and a legend (kept / dropped / merged group).

    record: a `ForwardRecord` (`patch.stats.last`); sample, item: which of its items to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch as Swatch

    from .bench.checks import check_sample

    rec = record.samples[sample]
    it = rec.items[item]
    pictures = [pictures] if isinstance(pictures, Image.Image) else list(pictures)
    drawn = draw_item(model, it, pictures, dim=dim, stages=stages)
    grid = panels(model, it, pictures)
    check = check_sample(record.keep, rec)
    title = (
        f"{record.policy}, keep={record.keep}: {it.kept} of {it.content} visual tokens enter the LLM "
        f"(layer avg {check.layer_mean:.1f}, budget {check.budget:g}{', OFF BUDGET' if check.off else ''})"
    )
    scale = max(1.0, MIN_FIGURE_WIDTH / drawn.width) * 1.25  # room for the margins
    dpi = 100
    width_in = max(6.4, drawn.width * scale / dpi)
    height_in = width_in * drawn.height / drawn.width + 1.6
    fig, ax = plt.subplots(figsize=(width_in, height_in), dpi=dpi)
    ax.imshow(np.asarray(drawn), interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=10, wrap=True)
    if subtitle:
        ax.set_title(subtitle, fontsize=9, pad=16)
    x = LABEL_WIDTH if stages else 0
    for label, p in zip(panel_labels(model, it), grid):
        ax.text(x + p.image.width / 2, -2, label, ha="center", va="bottom", fontsize=8)
        x += p.image.width + GAP
    handles = [
        Swatch(facecolor="white", edgecolor=np.array(OUTLINE) / 255, linewidth=2, label="kept (enters the LLM)"),
        Swatch(facecolor=str(1.0 - dim), edgecolor="none", label="dropped (darkened)"),
    ]
    if it.groups is not None and it.groups.numel():
        handles.append(Swatch(facecolor=np.array(group_colors(1)[0]) / 255, alpha=TINT, label="merged group (tint)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(handles), fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    out = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    if out.width < MIN_FIGURE_WIDTH:
        factor = MIN_FIGURE_WIDTH / out.width
        out = out.resize((MIN_FIGURE_WIDTH, round(out.height * factor)), Image.Resampling.LANCZOS)
    return out
