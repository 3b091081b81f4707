"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): windowed ViT, 2x2 patch merger, M-RoPE Qwen2 decoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedInputError
from ..items import GridPart, ItemShape
from ..signals.attention import qwen_vision_attention_received, qwen_vision_head_mean_keys
from .base import Adapter, interleave_structural


class Qwen25VLAdapter(Adapter):
    """One image = t x (h/2) x (w/2) merged tokens (t = 1 for images, temporal patches for videos).

    Positions are 3-D M-RoPE ids computed on the unpruned sequence; only `positions="original"` is defined.
    Vision tokens inside the tower are packed ([N, D]) and window-permuted in groups of 4 (one 2x2 merge unit).
    """

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    supports_compact_positions = False

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

    def vision_signal(self, sig: Any, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """Packed [N] (window order; 'keys': [N, d] before the 2-D RoPE), per `cu_seqlens` segment."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if sig.kind == "keys":
            return qwen_vision_head_mean_keys(module, hidden)
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        return qwen_vision_attention_received(
            module, hidden, cu, kwargs["position_embeddings"], score_dtype=sig.score_dtype
        )

    def vision_workload(
        self,
        modality: str,
        arguments: dict[str, Any],
        shapes: list[ItemShape],
        stage: tuple[int, int] | None = None,
        projected_per_row: int | None = None,
    ) -> dict:
        """The (t, h, w) patch grid of each item (the tower's cost follows from them and the config)."""
        return {"qwen_grids": [tuple(g) for g in self._grids(modality, arguments).tolist()]}

    def dropped_feature_tokens(self, arguments: dict[str, Any]) -> int:
        return 0

    @classmethod
    def build_config(cls, text: dict, vision: dict, top: dict, vision_layers: int | None = None) -> Any:
        from transformers import Qwen2_5_VLConfig

        if vision_layers is not None:
            full = [i for i in vision["fullatt_block_indexes"] if i < vision_layers] or [vision_layers - 1]
            vision = {**vision, "depth": vision_layers, "fullatt_block_indexes": full}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)

    @classmethod
    def image_only_processor(cls) -> type | None:
        from ..processors import qwen_image_only_processor_cls

        return qwen_image_only_processor_cls()

    def example_items(
        self, images: int = 1, image_size: tuple[int, int] | None = None, frames: int = 0
    ) -> tuple[list[ItemShape], int, list[tuple[int, int, int]] | None]:
        vcfg = self.config.vision_config
        unit = vcfg.patch_size * vcfg.spatial_merge_size
        h, w = image_size or (448, 448)
        grid_h, grid_w = max(1, round(h / unit)) * 2, max(1, round(w / unit)) * 2
        if frames:
            grids = [(max(1, frames // vcfg.temporal_patch_size), grid_h, grid_w)]
            return self.item_shapes("video", {"video_grid_thw": grids}, None), 0, grids
        grids = [(1, grid_h, grid_w)] * images
        return self.item_shapes("image", {"image_grid_thw": grids}, None), 0, grids

    def example_inputs(self, shapes, grids, images, image_size, frames, text, generator):
        config = self.config
        placeholder = config.video_token_id if frames else config.image_token_id
        start = config.vision_start_token_id
        end = start + 1  # <|vision_end|> follows <|vision_start|> in the Qwen2.5-VL vocabulary
        runs = []
        for shape in shapes:
            runs += [torch.tensor([start]), torch.full((shape.length,), placeholder), torch.tensor([end])]
        vcfg = config.vision_config
        rows = sum(t * h * w for t, h, w in grids)
        flat = torch.randn(rows, 3 * vcfg.temporal_patch_size * vcfg.patch_size**2, generator=generator)
        grid = torch.tensor(grids)
        if frames:
            return runs, {
                "pixel_values_videos": flat,
                "video_grid_thw": grid,
                "second_per_grid_ts": torch.ones(len(grid)),
            }
        return runs, {"pixel_values": flat, "image_grid_thw": grid}

    def token_types(self, input_ids: torch.Tensor, modality: str) -> dict[str, torch.Tensor]:
        """`mm_token_type_ids`: 1 at image placeholders, 2 at video placeholders (the model's rope index needs them)."""
        placeholder = self.config.video_token_id if modality == "video" else self.config.image_token_id
        return {"mm_token_type_ids": (input_ids == placeholder).long() * (2 if modality == "video" else 1)}

    @property
    def temporal_patch(self) -> int:
        return int(self.config.vision_config.temporal_patch_size)

    def cell_pixels(self, modality: str, part: Any) -> int:
        return self.config.vision_config.patch_size * self.merge

    def image_grid(self, inputs: dict, index: int) -> tuple[int, int]:
        t, h, w = (int(x) for x in inputs["image_grid_thw"][index])
        if t != 1:
            raise UnsupportedInputError(f"expected an image (temporal grid 1), got a temporal grid of {t}")
        return h // self.merge, w // self.merge

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
