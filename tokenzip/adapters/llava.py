"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower with CLS, MLP projector, Llama decoder."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..items import GridPart, ItemShape
from .base import ViTTowerAdapter, interleave_structural


class LlavaAdapter(ViTTowerAdapter):
    """One image = one square grid of (image_size / patch)^2 tokens (plus CLS with the 'full' strategy)."""

    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    supports_vision_stage = True
    supports_projector_stage = True
    vision_has_cls = True

    @property
    def token_ids(self) -> dict[str, int]:
        return {"image": int(self.config.image_token_id)}

    def _strategy(self, arguments: dict[str, Any]) -> str:
        return arguments.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy

    def item_shapes(self, modality: str, arguments: dict[str, Any], output: Any, check: bool = True) -> list[ItemShape]:
        feats = output.pooler_output if output is not None else [None] * int(arguments["pixel_values"].shape[0])
        g = self.grid
        leading = 1 if self._strategy(arguments) == "full" else 0
        shapes = []
        for i, f in enumerate(feats):
            shape = ItemShape("image", (GridPart(leading, 1, g, g),), leading=leading, vision_rows=(i, i + 1))
            if check and f is not None and f.shape[0] != shape.length:
                raise UnsupportedModelError(
                    f"LLaVA image {i} has {f.shape[0]} feature tokens, expected {shape.length} for a {g}x{g} grid; "
                    "only fixed-resolution LLaVA-1.5 towers are supported"
                )
            shapes.append(shape)
        return shapes

    crops_images = True  # the CLIP processor resizes the short side and centre-crops

    @classmethod
    def build_config(cls, text: dict, vision: dict, top: dict, vision_layers: int | None = None) -> Any:
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        if vision_layers is not None:
            vision = {**vision, "num_hidden_layers": vision_layers}
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**vision),
            text_config=LlamaConfig(**text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            **top,
        )

    def example_items(
        self, images: int = 1, image_size: tuple[int, int] | None = None, frames: int = 0
    ) -> tuple[list[ItemShape], int, list[tuple[int, int, int]] | None]:
        if frames:
            raise ValueError("LLaVA-1.5 has no video input; use --images")
        shapes = self.item_shapes("image", {"pixel_values": torch.empty(images, 0)}, None, check=False)
        return shapes, images, None

    def image_grid(self, inputs: dict, index: int) -> tuple[int, int]:
        return self.grid, self.grid

    def vision_scores_to_items(
        self, modality: str, scores: torch.Tensor, shapes: list[ItemShape], arguments: dict[str, Any]
    ) -> list[torch.Tensor]:
        out = []
        for shape in shapes:
            row = scores[shape.vision_rows[0]]
            out.append(interleave_structural(row[1:], shape))  # column 0 is CLS (never a grid cell)
        return out
