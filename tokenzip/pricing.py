"""Pricing a policy on a real model without weights: `tokenzip flops`.

The model is built from a built-in config on the meta device (no memory, no download); the adapter derives
each item's geometry from the requested images / video exactly as the model would; the policy's nominal
schedule (`Policy.nominal`) gives the tokens every decoder layer processes; `tokenzip.flops` prices them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .adapters import get_adapter
from .budget import Keep
from .configs import BUILTIN, build_config, model_class
from .flops import FlopsBreakdown, breakdown
from .items import ItemShape
from .policies import Policy


@dataclass
class Workload:
    """What a prompt asks of the model: its items, text length and the vision tower's work."""

    config: object
    shapes: list[ItemShape]
    text_tokens: int
    vision_rows: int = 0
    qwen_grids: list[tuple[int, int, int]] | None = None


def meta_model(name: str, **overrides):
    """The built-in model `name` on the meta device (shapes only)."""
    config = build_config(name, **overrides)
    with torch.device("meta"):
        return model_class(BUILTIN[name]["family"])._from_config(config, attn_implementation="sdpa")


def workload(
    model, images: int = 1, image_size: tuple[int, int] | None = None, frames: int = 0, text_tokens: int = 60
) -> Workload:
    """Items for `images` images of `image_size` (H, W), or a video of `frames` frames when frames > 0."""
    adapter = get_adapter(model)
    config = model.config
    family = adapter.family
    if family == "llava":
        if frames:
            raise ValueError("LLaVA-1.5 has no video input; use --images")
        pixels = torch.empty(images, 0)
        shapes = adapter.item_shapes("image", {"pixel_values": pixels}, None, check=False)
        return Workload(config, shapes, text_tokens, vision_rows=images)
    if family == "qwen2_5_vl":
        vcfg = config.vision_config
        unit = vcfg.patch_size * vcfg.spatial_merge_size
        h, w = image_size or (448, 448)
        grid_h, grid_w = max(1, round(h / unit)) * 2, max(1, round(w / unit)) * 2
        if frames:
            grids = [(max(1, frames // vcfg.temporal_patch_size), grid_h, grid_w)]
            shapes = adapter.item_shapes("video", {"video_grid_thw": grids}, None)
        else:
            grids = [(1, grid_h, grid_w)] * images
            shapes = adapter.item_shapes("image", {"image_grid_thw": grids}, None)
        return Workload(config, shapes, text_tokens, qwen_grids=grids)
    side = config.vision_config.image_size
    if frames:
        video = SimpleNamespace(shape=(1, frames, 3, side, side))
        shapes = adapter.item_shapes("video", {"pixel_values_videos": video}, None)
        return Workload(config, shapes, text_tokens, vision_rows=frames)
    h, w = image_size or (768, 768)
    args = {"image_sizes": torch.tensor([[h, w]] * images), "batch_num_images": torch.tensor([images])}
    shapes = adapter.item_shapes("image", args, None, check=False)
    return Workload(config, shapes, text_tokens, vision_rows=sum(adapter._tiles_per_image(args)))


def price(model, work: Workload, policy: Policy, keep: Keep) -> FlopsBreakdown:
    """Analytic FLOPs of one prefill and one decode step of `work` under `policy` at `keep`."""
    info = get_adapter(model).info()
    nominal = [policy.nominal(info, shape, keep) for shape in work.shapes]
    layers = info.n_llm_layers
    lengths = [work.text_tokens + sum(n.tokens[i] for n in nominal) for i in range(layers)]
    cache = [work.text_tokens + sum(n.cache[i] for n in nominal) for i in range(layers)]
    widths = next((n.vision_widths for n in nominal if n.vision_widths is not None), None)
    projector_tokens = 0
    if info.family == "llava":
        grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
        per_row = (widths[info.vision_feature_layer] - 1) if widths else grid * grid
        projector_tokens = work.vision_rows * per_row
    elif info.family == "llava_onevision":
        grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
        projector_tokens = work.vision_rows * grid * grid
    return breakdown(
        model.config,
        lengths,
        vision_rows=work.vision_rows,
        vision_widths=widths,
        qwen_grids=work.qwen_grids,
        projector_tokens=projector_tokens,
        lm_head_tokens=1,
        cache_lengths=cache,
    )
