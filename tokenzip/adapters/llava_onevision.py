"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower, anyres tiles, Qwen2 decoder."""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..items import GridPart, ItemShape
from .base import ViTTowerAdapter, interleave_structural

PINPOINTS = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]  # the 7B / 0.5B checkpoints' anyres grids


class LlavaOnevisionAdapter(ViTTowerAdapter):
    """Geometry of OneVision's packed features.

    * Single image (anyres): base tile grid g x g, then the high-resolution tiles assembled into one grid,
      un-padded, bilinearly downsampled if larger than anyres_max_N allows, with one newline token after every
      row.
    * Image of a multi-image sample (`batch_num_images > 1`): base grid + one trailing newline.
    * Video: F frames of ceil(g/2) x ceil(g/2) pooled tokens + one trailing newline.
    """

    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    display_name = "LLaVA-OneVision"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.config.vision_feature_select_strategy != "full":
            raise UnsupportedModelError(
                "LLaVA-OneVision with vision_feature_select_strategy="
                f"{self.config.vision_feature_select_strategy!r} is not supported (checkpoints use 'full')"
            )

    @property
    def token_ids(self) -> dict[str, int]:
        return {"image": int(self.config.image_token_id), "video": int(self.config.video_token_id)}

    @classmethod
    def build_config(cls, text: dict, vision: dict, top: dict, vision_layers: int | None = None) -> Any:
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        if vision_layers is not None:
            vision = {**vision, "num_hidden_layers": vision_layers}
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision),
            text_config=Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=PINPOINTS,
            vision_aspect_ratio="anyres_max_9",
            **top,
        )

    @classmethod
    def image_only_processor(cls) -> type | None:
        from ..processors import ov_image_only_processor_cls

        return ov_image_only_processor_cls()

    def example_items(
        self, images: int = 1, image_size: tuple[int, int] | None = None, frames: int = 0
    ) -> tuple[list[ItemShape], int, list[tuple[int, int, int]] | None]:
        side = self.config.vision_config.image_size
        if frames:
            video = SimpleNamespace(shape=(1, frames, 3, side, side))
            return self.item_shapes("video", {"pixel_values_videos": video}, None), frames, None
        h, w = image_size or (768, 768)
        args = {"image_sizes": torch.tensor([[h, w]] * images), "batch_num_images": torch.tensor([images])}
        return self.item_shapes("image", args, None, check=False), sum(self._tiles_per_image(args)), None

    def example_pixels(self, images: int, image_size, frames: int, generator: torch.Generator) -> dict:
        side = self.config.vision_config.image_size
        if frames:
            return {"pixel_values_videos": torch.randn(1, frames, 3, side, side, generator=generator)}
        h, w = image_size or (768, 768)
        sizes = torch.tensor([[h, w]] * images)
        args = {"image_sizes": sizes, "batch_num_images": torch.tensor([images])}
        tiles = max(self._tiles_per_image(args))
        return {
            "pixel_values": torch.randn(images, tiles, 3, side, side, generator=generator),
            "image_sizes": sizes,
            "batch_num_images": torch.tensor([images]),
        }

    def cell_pixels(self, modality: str, part: Any) -> int:
        side = self.config.vision_config.image_size
        return max(1, side // part.rows) if modality == "video" else super().cell_pixels(modality, part)

    # ------------------------------------------------------------------------------------------ images
    def _tiled(self, arguments: dict[str, Any]) -> list[bool]:
        """Per image: anyres tiles (True) or the base tile only (an image of a multi-image sample)."""
        sizes = arguments["image_sizes"]
        batch_num_images = arguments.get("batch_num_images")
        if batch_num_images is None:
            return [True] * len(sizes)
        return [int(n) == 1 for n in batch_num_images for _ in range(int(n))]

    def _modeling(self):
        """The transformers module with the family's anyres helpers (tile counts, grid shapes, un-padding)."""
        return importlib.import_module(type(self.base).__module__)

    def _tiles_per_image(self, arguments: dict[str, Any]) -> list[int]:
        count = self._modeling().image_size_to_num_patches
        pinpoints, side = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        return [
            count(size, pinpoints, side) if t else 1
            for size, t in zip(arguments["image_sizes"], self._tiled(arguments))
        ]

    def _aspect(self, arguments: dict[str, Any]) -> str:
        return arguments.get("vision_aspect_ratio") or self.config.vision_aspect_ratio

    def _unpadded_grid(self, image_size) -> tuple[int, int]:
        """(rows, cols) of the high-resolution tiles assembled into one grid and un-padded to the image's aspect."""
        modeling = self._modeling()
        g = self.grid
        tiles_h, tiles_w = modeling.get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        return tuple(modeling.unpad_image(torch.empty(0, tiles_h * g, tiles_w * g), image_size).shape[1:])

    def _highres_grid(self, image_size, arguments: dict[str, Any]) -> tuple[int, int]:
        """The packed high-resolution grid: un-padded, then bilinearly downsampled past anyres_max_N tiles."""
        g = self.grid
        rows, cols = self._unpadded_grid(image_size)
        max_tiles = int(self._aspect(arguments).removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_tiles * g**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def _pack(self, rows: torch.Tensor, arguments: dict[str, Any], index: int) -> torch.Tensor:
        """Per-tile values `rows` [tiles, g*g, C] of image `index` packed as the model packs its features (no
        newlines): [n_content, C]."""
        packed, _ = self.base.pack_image_features(
            [rows],
            torch.as_tensor(arguments["image_sizes"])[index : index + 1],
            image_newline=None,
            vision_aspect_ratio=self._aspect(arguments),
        )
        return packed[0]

    def item_shapes(self, modality: str, arguments: dict[str, Any], output: Any, check: bool = True) -> list[ItemShape]:
        g = self.grid
        if modality == "video":
            pix = arguments["pixel_values_videos"]
            batch, frames = pix.shape[0], pix.shape[1]
            side = math.ceil(g / 2)
            return [
                ItemShape(
                    "video", (GridPart(0, frames, side, side),), trailing=1, vision_rows=(b * frames, (b + 1) * frames)
                )
                for b in range(batch)
            ]
        shapes, row = [], 0
        for i, n_tiles in enumerate(self._tiles_per_image(arguments)):
            size = arguments["image_sizes"][i]
            if n_tiles > 1:
                rows, cols = self._highres_grid(size, arguments)
                parts = (GridPart(0, 1, g, g), GridPart(g * g, 1, rows, cols, newline_per_row=True))
                shape = ItemShape("image", parts, vision_rows=(row, row + n_tiles))
            else:
                shape = ItemShape("image", (GridPart(0, 1, g, g),), trailing=1, vision_rows=(row, row + 1))
            got = output.pooler_output[i].shape[0] if check else shape.length
            if got != shape.length:
                raise UnsupportedModelError(
                    f"{self.display_name} image {i}: the model packed {got} tokens, tokenzip's geometry gives "
                    f"{shape.length}; this transformers version packs features differently"
                )
            shapes.append(shape)
            row += n_tiles
        return shapes

    def vision_scores_to_items(
        self, modality: str, scores: torch.Tensor, shapes: list[ItemShape], arguments: dict[str, Any]
    ) -> list[torch.Tensor]:
        out = []
        for i, shape in enumerate(shapes):
            s, e = shape.vision_rows
            block = scores[s:e, int(self.vision_has_cls) :].float()  # CLIP's CLS (column 0) is never a grid cell
            channels = block.shape[2:]
            rows = block.reshape(block.shape[0], block.shape[1], -1)  # [tiles or frames, g*g, C]
            if modality == "video":
                packed = self.base.apply_pooling(rows).reshape(-1, *channels)
            else:
                packed = self._pack(rows, arguments, i).reshape(-1, *channels)
            out.append(interleave_structural(packed, shape))
        return out
