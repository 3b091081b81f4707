"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): CLIP tower with CLS, anyres tiles, Llama / Mistral
decoder (1-D RoPE).

The OneVision adapter's anyres geometry with LLaVA-1.5's tower: each image is a base tile plus the high-resolution
tiles of its best `image_grid_pinpoints` resolution, every tile a CLIP row of CLS + g x g patches; the 'default'
feature strategy drops CLS before the projector, and `pack_image_features` lays an image out as the base grid
followed by the high-resolution tiles assembled into one grid, un-padded to the image's aspect ratio (no anyres_max
downsampling, unlike OneVision), with the learned `image_newline` after every row. Every image is tiled, also in
multi-image prompts. Videos are LLaVA-NeXT-Video's (`LlavaNextVideoForConditionalGeneration`), not supported here.

No vision-tower or projector-input stage: a tower row is one tile, but the LLM's tokens of an image are its tiles
re-assembled into one grid and cut to the image's aspect ratio after the projector, so per-row selections inside
the tower neither line up with the packed grid nor with the per-image budgets; the pre-LLM, in-LLM and decode
stages see the packed grid and run as on OneVision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..items import ItemShape
from .base import ViTTowerAdapter
from .llava_onevision import LlavaOnevisionAdapter

# llava-hf/llava-v1.6-{vicuna,mistral}-7b-hf: 1x2, 2x1, 2x2, 3x1 and 1x3 tiles of 336 px
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


class LlavaNextAdapter(LlavaOnevisionAdapter):
    """One image = base grid g x g, then the un-padded high-resolution grid with one newline per row."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    display_name = "LLaVA-NeXT"
    vision_has_cls = True
    crops_images = False  # anyres: the processor resizes and pads into tiles

    def __init__(self, model: nn.Module) -> None:
        ViTTowerAdapter.__init__(self, model)
        strategy = self.config.vision_feature_select_strategy
        if strategy != "default":
            raise UnsupportedModelError(
                f"LLaVA-NeXT with vision_feature_select_strategy={strategy!r} is not supported: its features would "
                "keep CLIP's CLS, which the model's own tile packing cannot lay out (checkpoints use 'default')"
            )
        if not isinstance(self.config.vision_feature_layer, int):
            raise UnsupportedModelError(
                "LLaVA-NeXT with several vision feature layers is not supported (checkpoints use one, -2)"
            )

    @property
    def token_ids(self) -> dict[str, int]:
        return {"image": int(self.config.image_token_id)}

    def _strategy(self, arguments: dict[str, Any]) -> str:
        return arguments.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy

    def item_shapes(self, modality: str, arguments: dict[str, Any], output: Any, check: bool = True) -> list[ItemShape]:
        if self._strategy(arguments) != "default":
            raise UnsupportedModelError("LLaVA-NeXT: only vision_feature_select_strategy='default' is supported")
        return super().item_shapes(modality, arguments, output, check)

    # ------------------------------------------------------------------------------------------ anyres geometry
    def _tiled(self, arguments: dict[str, Any]) -> list[bool]:
        return [True] * len(arguments["image_sizes"])  # every image, also in multi-image prompts

    def _highres_grid(self, image_size, arguments: dict[str, Any]) -> tuple[int, int]:
        return self._unpadded_grid(image_size)  # no anyres_max downsampling

    def _pack(self, rows: torch.Tensor, arguments: dict[str, Any], index: int) -> torch.Tensor:
        packed, _ = self.base.pack_image_features(
            [rows],
            torch.as_tensor(arguments["image_sizes"])[index : index + 1],
            vision_feature_select_strategy="default",
            image_newline=None,
        )
        return packed[0]

    # ------------------------------------------------------------------------------------------ configs / examples
    @classmethod
    def build_config(cls, text: dict, vision: dict, top: dict, vision_layers: int | None = None) -> Any:
        """`text` may name its decoder with `model_type` ('llama', the default, or 'mistral')."""
        from transformers import CONFIG_MAPPING, CLIPVisionConfig, LlavaNextConfig

        if vision_layers is not None:
            vision = {**vision, "num_hidden_layers": vision_layers}
        text = dict(text)
        decoder = CONFIG_MAPPING[text.pop("model_type", "llama")]
        rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta", 10000.0)}
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision),
            text_config=decoder(**text, rope_parameters=rope),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_grid_pinpoints=PINPOINTS,
            **top,
        )

    @classmethod
    def image_only_processor(cls) -> type | None:
        return None  # LlavaNextProcessor has no video processor

    def example_items(
        self, images: int = 1, image_size: tuple[int, int] | None = None, frames: int = 0
    ) -> tuple[list[ItemShape], int, list[tuple[int, int, int]] | None]:
        if frames:
            raise ValueError("LLaVA-NeXT has no video input (LLaVA-NeXT-Video is another model class); use --images")
        h, w = image_size or (672, 672)
        args = {"image_sizes": torch.tensor([[h, w]] * images)}
        return self.item_shapes("image", args, None, check=False), sum(self._tiles_per_image(args)), None

    def example_pixels(self, images: int, image_size, frames: int, generator: torch.Generator) -> dict:
        side = self.config.vision_config.image_size
        h, w = image_size or (672, 672)
        sizes = torch.tensor([[h, w]] * images)
        tiles = max(self._tiles_per_image({"image_sizes": sizes}))
        return {"pixel_values": torch.randn(images, tiles, 3, side, side, generator=generator), "image_sizes": sizes}
