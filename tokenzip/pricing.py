"""Pricing a policy on a real model without weights: `tokenzip flops`.

The model is built from a built-in config on the meta device (no memory, no download); the adapter derives
each item's geometry from the requested images / video exactly as the model would; the policy's nominal
schedule (`Policy.nominal`) gives the tokens every decoder layer processes; `tokenzip.flops` prices them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    shapes, rows, grids = get_adapter(model).example_items(images, image_size, frames)
    return Workload(model.config, shapes, text_tokens, vision_rows=rows, qwen_grids=grids)


def price(model, work: Workload, policy: Policy, keep: Keep) -> FlopsBreakdown:
    """Analytic FLOPs of one prefill and one decode step of `work` under `policy` at `keep`."""
    adapter = get_adapter(model)
    info = adapter.info()
    nominal = [policy.nominal(info, shape, keep) for shape in work.shapes]
    layers = info.n_llm_layers
    lengths = [work.text_tokens + sum(n.tokens[i] for n in nominal) for i in range(layers)]
    cache = [work.text_tokens + sum(n.cache[i] for n in nominal) for i in range(layers)]
    widths = next((n.vision_widths for n in nominal if n.vision_widths is not None), None)
    projector_tokens = adapter.projector_tokens(work.vision_rows, widths)
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
