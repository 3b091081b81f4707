"""Kept-token overlays: which visual tokens of an image entered the LLM, drawn on the image the model saw.

    from tokenzip.viz import show
    picture = show(model, processor, image, "What color is the square ?", "hiprune", keep=0.11)

Dropped cells are darkened towards black (`dim`), kept cells keep their pixels and get a thin outline. The image
is first brought to the model's view (LLaVA-1.5: resize of the shortest edge and centre crop; Qwen2.5-VL: resize
to its patch grid), so cell k of the overlay is visual token k. Covered so far: single images on LLaVA-1.5 and
Qwen2.5-VL, the tokens entering the LLM (`ItemRecord.kept_indices`). Not yet: OneVision anyres tiles, video frame
strips, per-stage views and merged groups (issue 7).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageDraw, ImageOps

from .adapters import get_adapter
from .errors import UnsupportedInputError

OUTLINE = (255, 215, 0)


def model_view(image: Image.Image, model, inputs: dict, index: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """The image as the model sees it and its token grid (rows, cols), for image `index` of the batch."""
    family = get_adapter(model).family
    image = image.convert("RGB")
    if family == "llava":
        cfg = model.config.vision_config
        side, grid = cfg.image_size, cfg.image_size // cfg.patch_size
        return ImageOps.fit(image, (side, side), Image.Resampling.BICUBIC), (grid, grid)
    if family == "qwen2_5_vl":
        t, h, w = (int(x) for x in inputs["image_grid_thw"][index])
        if t != 1:
            raise UnsupportedInputError(f"expected an image (temporal grid 1), got a temporal grid of {t}")
        merge = model.config.vision_config.spatial_merge_size
        unit = model.config.vision_config.patch_size * merge
        rows, cols = h // merge, w // merge
        return image.resize((cols * unit, rows * unit), Image.Resampling.BICUBIC), (rows, cols)
    raise UnsupportedInputError(f"kept-token overlays cover llava and qwen2_5_vl images so far, not {family!r}")


def kept_grid(kept_indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] bool: True where the token (raster index) entered the LLM."""
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[kept_indices.long().cpu()] = True
    return mask.view(rows, cols)


def overlay(image: Image.Image, kept: torch.Tensor, dim: float = 0.75, outline: bool = True) -> Image.Image:
    """`image` with every dropped cell of the [rows, cols] grid `kept` darkened by `dim` (0 = unchanged, 1 = black)."""
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim}")
    rows, cols = kept.shape
    width, height = image.size
    out = image.convert("RGB").copy()
    shade = Image.new("L", out.size, 0)
    draw_shade = ImageDraw.Draw(shade)
    boxes = [
        (c * width // cols, r * height // rows, (c + 1) * width // cols - 1, (r + 1) * height // rows - 1)
        for r in range(rows)
        for c in range(cols)
    ]
    for box, keep in zip(boxes, kept.flatten().tolist()):
        if not keep:
            draw_shade.rectangle(box, fill=round(255 * dim))
    out = Image.composite(Image.new("RGB", out.size, (0, 0, 0)), out, shade)
    if outline:
        draw = ImageDraw.Draw(out)
        for box, keep in zip(boxes, kept.flatten().tolist()):
            if keep:
                draw.rectangle(box, outline=OUTLINE)
    return out


@torch.no_grad()
def show(
    model, processor, image: Image.Image, question: str, policy: str, keep: Any = 0.111, dim: float = 0.75, **options
) -> Image.Image:
    """Run one prefill of `question` about `image` under `policy` and draw the tokens that entered the LLM."""
    import tokenzip

    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt"))
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with tokenzip.apply(model, policy, keep, **options) as patch:
        model(**inputs)
        record = patch.stats.last
    item = record.samples[0].items[0]
    view, (rows, cols) = model_view(image, model, inputs)
    if item.content != rows * cols:
        raise UnsupportedInputError(f"item has {item.content} visual tokens, expected a {rows}x{cols} grid")
    return overlay(view, kept_grid(item.kept_indices, rows, cols), dim=dim)
