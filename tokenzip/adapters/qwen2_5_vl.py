"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): windowed ViT, 2x2 patch merger, M-RoPE Qwen2 decoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..items import GridPart, ItemShape
from .base import Adapter, interleave_structural


class Qwen25VLAdapter(Adapter):
    """One image = t x (h/2) x (w/2) merged tokens (t = 1 for images, temporal patches for videos).

    Positions are 3-D M-RoPE ids computed on the unpruned sequence; only `positions="original"` is defined.
    Vision tokens inside the tower are packed ([N, D]) and window-permuted in groups of 4 (one 2x2 merge unit).
    """

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    supports_compact_positions = False
    vision_kind = "qwen"

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.base.visual.blocks

    def vision_attention(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].attn

    @property
    def token_ids(self) -> dict[str, int]:
        return {"image": int(self.config.image_token_id), "video": int(self.config.video_token_id)}

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def vision_feature_layer(self) -> int | None:
        return len(self.vision_layers) - 1

    def full_attention_layers(self) -> tuple[int, ...]:
        return tuple(self.config.vision_config.fullatt_block_indexes)

    def _grids(self, modality: str, arguments: dict[str, Any]) -> torch.Tensor:
        key = "image_grid_thw" if modality == "image" else "video_grid_thw"
        return torch.as_tensor(arguments[key]).long().cpu()

    def item_shapes(self, modality: str, arguments: dict[str, Any], output: Any, check: bool = True) -> list[ItemShape]:
        m = self.merge
        shapes, start = [], 0
        for t, h, w in self._grids(modality, arguments).tolist():
            n = t * h * w
            window = torch.argsort(self.raster_order((t, h, w)))
            part = GridPart(0, t, h // m, w // m)
            shapes.append(ItemShape(modality, (part,), vision_rows=(start, start + n), window_order=window))
            start += n
        return shapes

    def raster_order(self, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """For one item: position in the tower's window order of each merged token in raster order.

        Returns LongTensor [t * h/2 * w/2]: scores_window[raster_order] is raster-ordered.
        """
        from transformers.vision_utils import get_vision_window_index

        vcfg = self.config.vision_config
        window_index, _ = get_vision_window_index(
            torch.tensor([grid_thw]), vcfg.spatial_merge_size, vcfg.window_size, vcfg.patch_size
        )
        return torch.argsort(window_index)

    def vision_scores_to_items(
        self, modality: str, scores: torch.Tensor, shapes: list[ItemShape], arguments: dict[str, Any]
    ) -> list[torch.Tensor]:
        unit = self.merge**2
        out = []
        for shape, grid in zip(shapes, self._grids(modality, arguments).tolist()):
            s, e = shape.vision_rows
            block = scores[s:e].float()
            merged = block.view(-1, unit, *block.shape[1:]).mean(1)  # window order, one value per 2x2 unit
            raster = merged[self.raster_order(tuple(grid)).to(merged.device)]
            out.append(interleave_structural(raster, shape))
        return out
