"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, the dense models): a full-attention ViT with learned (bilinearly
resampled) position embeddings and a 2-D RoPE, 16 px patches, a 2x2 patch merger, DeepStack, and a Qwen3 decoder
(q / k RMS norms) with interleaved M-RoPE.

* Vision tower: every block attends over a whole image / temporal slice (no windows); the tower keeps the
  processor's order, the 2x2 units of each item in raster order (as Qwen2-VL). The blocks' attention has the
  fused `qkv` / `proj` layout of Qwen2.5-VL, so the vision signals are read the same way.
* DeepStack: the outputs of vision blocks `deepstack_visual_indexes` go through mergers of their own and are
  added to the hidden states of the visual tokens after the first `len(deepstack_visual_indexes)` decoder layers
  (`Qwen3VLTextModel._deepstack_process` with `visual_pos_masks`). The engine (`tokenzip.engine.deepstack`)
  re-targets those additions to the tokens each layer really processes: a token a pre-LLM or in-LLM stage keeps
  receives exactly its own DeepStack features, a dropped one none.
* Videos: the processor lays every temporal patch out as its own `<t seconds><|vision_start|>` frame tokens
  `<|vision_end|>` block (text timestamps between frames; `get_rope_index` splits `video_grid_thw` per frame
  the same way). Each temporal patch of a video therefore is one item here (one contiguous placeholder run);
  its tower rows are that frame's slice of the video's rows. Hand-built inputs (`example_inputs`, bench) lay the
  frames out as separate `<|vision_start|>` .. `<|vision_end|>` runs without the timestamp text (`tokenzip flops`
  leaves all framing tokens out).
"""

from __future__ import annotations

from typing import Any

import torch

from ..items import GridPart, ItemShape
from .base import Adapter, interleave_structural
from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """One image = (h/2) x (w/2) merged tokens; one video = one item per temporal patch (frame pair)."""

    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)

    def deepstack_layers(self) -> tuple[int, ...]:
        """Decoder layers after which DeepStack features are added to the visual tokens: 0 .. n_deepstack - 1."""
        return tuple(range(len(self.config.vision_config.deepstack_visual_indexes)))

    def item_shapes(self, modality: str, arguments: dict[str, Any], output: Any, check: bool = True) -> list[ItemShape]:
        m = self.merge
        shapes, start = [], 0
        for t, h, w in self._grids(modality, arguments).tolist():
            frame = h * w
            for _ in range(t):  # an image has t = 1; a video one item per temporal patch (its own placeholder run)
                part = GridPart(0, 1, h // m, w // m)
                shapes.append(ItemShape(modality, (part,), vision_rows=(start, start + frame)))
                start += frame
        return shapes

    def vision_scores_to_items(
        self, modality: str, scores: torch.Tensor, shapes: list[ItemShape], arguments: dict[str, Any]
    ) -> list[torch.Tensor]:
        """Each item's rows are its frame's patches in raster order of the 2x2 units: one mean per unit."""
        unit = self.merge**2
        out = []
        for shape in shapes:
            s, e = shape.vision_rows
            block = scores[s:e].float()
            out.append(interleave_structural(block.view(-1, unit, *block.shape[1:]).mean(1), shape))
        return out

    @classmethod
    def build_config(cls, text: dict, vision: dict, top: dict, vision_layers: int | None = None):
        from transformers import Qwen3VLConfig

        if vision_layers is not None:
            deepstack = [i for i in vision["deepstack_visual_indexes"] if i < vision_layers]
            vision = {**vision, "depth": vision_layers, "deepstack_visual_indexes": deepstack}
        return Qwen3VLConfig(text_config=text, vision_config=vision, **top)

    @classmethod
    def image_only_processor(cls) -> type | None:
        from ..processors import qwen3_vl_image_only_processor_cls

        return qwen3_vl_image_only_processor_cls()

    def full_attention_layers(self) -> tuple[int, ...]:
        return Adapter.full_attention_layers(self)
