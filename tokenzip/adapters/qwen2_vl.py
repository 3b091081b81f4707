"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): full-attention ViT, 2x2 patch merger, M-RoPE Qwen2 decoder.

The Qwen2.5-VL adapter with the two things Qwen2-VL lacks: window attention (every vision block attends over a
whole image / temporal slice, and the tower keeps the processor's order: the 2x2 units of each item in raster
order) and video time scaling (`second_per_grid_ts` is not an input). Its vision blocks' attention modules have
the same fused `qkv` / `proj` layout, so the signals are read the same way.
"""

from __future__ import annotations

import torch

from .base import Adapter
from .qwen2_5_vl import Qwen25VLAdapter


class Qwen2VLAdapter(Qwen25VLAdapter):
    """One image = t x (h/2) x (w/2) merged tokens; packed tower order = raster order of the 2x2 units."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)

    def raster_order(self, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """The tower's packed order already is the raster order of the merged tokens: the identity [t*h/2*w/2]."""
        t, h, w = grid_thw
        return torch.arange(t * (h // self.merge) * (w // self.merge))

    def full_attention_layers(self) -> tuple[int, ...]:
        return Adapter.full_attention_layers(self)

    @classmethod
    def build_config(cls, text: dict, vision: dict, top: dict, vision_layers: int | None = None):
        from transformers import Qwen2VLConfig

        if vision_layers is not None:
            vision = {**vision, "depth": vision_layers}
        return Qwen2VLConfig(text_config=text, vision_config=vision, **top)

    @classmethod
    def image_only_processor(cls) -> type | None:
        from ..processors import qwen2_vl_image_only_processor_cls

        return qwen2_vl_image_only_processor_cls()

    def example_inputs(self, shapes, grids, images, image_size, frames, text, generator):
        runs, tensors = super().example_inputs(shapes, grids, images, image_size, frames, text, generator)
        tensors.pop("second_per_grid_ts", None)
        return runs, tensors
