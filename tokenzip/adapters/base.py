"""What an adapter knows about one model family (and nothing about any policy)."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..items import ItemShape

SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a patched model that policies may use to plan their stages."""

    family: str
    n_llm_layers: int
    n_vision_layers: int
    vision_feature_layer: int | None  # 0-based index of the vision layer whose output feeds the projector
    vision_has_cls: bool
    attn_implementation: str
    supports_compact_positions: bool
    supports_vision_stage: bool
    supports_projector_stage: bool = False
    vision_full_attention_layers: tuple[int, ...] = ()  # vision layers attending over a whole image / frame


class Adapter(ABC):
    """Locations and geometry of one VLM family.

    Subclasses name the modules (vision layers, projector, decoder stack), the feature functions to observe
    (`get_image_features` / `get_video_features` of the base model), how to turn their calls into item
    shapes, and how per-token vision-tower scores map onto each item's LLM tokens.
    """

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    supports_compact_positions: ClassVar[bool] = True
    supports_vision_stage: ClassVar[bool] = False
    supports_projector_stage: ClassVar[bool] = False
    vision_has_cls: ClassVar[bool] = False
    vision_kind: ClassVar[str] = "vit"  # "vit": batch of rows [R, T, D]; "qwen": packed tokens [N, D]

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.model
        lm = self.base.language_model
        if not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
            raise UnsupportedModelError(
                f"{type(model).__name__}: its language model {type(lm).__name__} has no `layers` / `rotary_emb`; "
                "tokenzip supports Llama / Qwen2 / Qwen2.5-VL decoders"
            )
        self.attn_implementation = self._attn_impl()

    # ---------------------------------------------------------------------------------------- modules
    @property
    def config(self):
        return self.model.config

    @property
    def lm(self) -> nn.Module:
        """The decoder stack (LlamaModel / Qwen2Model / Qwen2_5_VLTextModel)."""
        return self.base.language_model

    @property
    def lm_layers(self) -> nn.ModuleList:
        return self.lm.layers

    @property
    def rotary_emb(self) -> nn.Module:
        return self.lm.rotary_emb

    @property
    @abstractmethod
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's transformer layers (CLIP / SigLIP encoder layers, Qwen vision blocks)."""

    @abstractmethod
    def vision_attention(self, layer: int) -> nn.Module:
        """The attention module of vision layer `layer`."""

    @property
    @abstractmethod
    def token_ids(self) -> dict[str, int]:
        """Placeholder token id per modality ('image', 'video') this family supports."""

    @property
    def feature_functions(self) -> dict[str, str]:
        """Name of the base model's feature function per modality."""
        return {m: f"get_{m}_features" for m in self.token_ids}

    @abstractmethod
    def item_shapes(self, modality: str, arguments: dict[str, Any], output: Any, check: bool = True) -> list[ItemShape]:
        """Item shapes of one feature-function call (bound arguments and its output).

        With `check`, the shapes are verified against the output's per-item token counts.
        """

    @abstractmethod
    def vision_scores_to_items(
        self, modality: str, scores: torch.Tensor, shapes: list[ItemShape], arguments: dict[str, Any]
    ) -> list[torch.Tensor]:
        """Map per-token vision scores of one feature call onto each item's LLM tokens.

        scores: [R, T, *C] per vision row (ViT towers; T includes CLS where present) or [N, *C] packed tokens in
        the tower's own order (Qwen2.5-VL); optional trailing channels C (e.g. head-mean key vectors) are carried
        along. Returns one float tensor [item.length, *C] per item, NaN at structural tokens (newlines, CLS).
        """

    @property
    def vision_feature_layer(self) -> int | None:
        """0-based index of the vision layer whose output is projected (None if not a single layer)."""
        layer = getattr(self.config, "vision_feature_layer", None)
        if isinstance(layer, int):
            return layer % (len(self.vision_layers) + 1) - 1 if layer < 0 else layer - 1
        return None

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.family,
            n_llm_layers=len(self.lm_layers),
            n_vision_layers=len(self.vision_layers),
            vision_feature_layer=self.vision_feature_layer,
            vision_has_cls=self.vision_has_cls,
            attn_implementation=self.attn_implementation,
            supports_compact_positions=self.supports_compact_positions,
            supports_vision_stage=self.supports_vision_stage,
            supports_projector_stage=self.supports_projector_stage,
            vision_full_attention_layers=self.full_attention_layers(),
        )

    def full_attention_layers(self) -> tuple[int, ...]:
        """Vision layers whose attention spans a whole image / tile / frame (all of them for CLIP / SigLIP)."""
        return tuple(range(len(self.vision_layers)))

    @property
    def projector(self) -> nn.Module:
        return self.base.multi_modal_projector

    # ---------------------------------------------------------------------------------------- helpers
    def _attn_impl(self) -> str:
        text_cfg = self.config.get_text_config()
        impl = getattr(text_cfg, "_attn_implementation", None) or "eager"
        return impl

    @staticmethod
    def bind(function, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Arguments of a feature-function call by name, defaults included (extra **kwargs flattened in)."""
        sig = inspect.signature(function)
        bound = sig.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        out = dict(bound.arguments)
        for name, param in sig.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in out:
                out.update(out.pop(name))
        return out


class ViTTowerAdapter(Adapter):
    """Families whose vision tower is a CLIP / SigLIP encoder (`vision_tower.encoder.layers[i].self_attn`)
    processing one row (image, tile or frame) of grid x grid patches."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        tower = self.base.vision_tower
        if not hasattr(tower, "encoder") or not hasattr(tower.encoder, "layers"):
            raise UnsupportedModelError(
                f"{type(model).__name__} with vision tower {type(tower).__name__} is not supported; tokenzip "
                "expects a CLIP / SigLIP encoder (`vision_tower.encoder.layers`)"
            )
        vcfg = self.config.vision_config
        self.grid = vcfg.image_size // vcfg.patch_size

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.base.vision_tower.encoder.layers

    def vision_attention(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].self_attn


def interleave_structural(values: torch.Tensor, shape: ItemShape) -> torch.Tensor:
    """Place per-content-token `values` [n_content, *C] (raster order of the parts) into an item-long tensor.

    Structural tokens get NaN. Returns float32 [shape.length, *C].
    """
    out = torch.full((shape.length, *values.shape[1:]), float("nan"), dtype=torch.float32, device=values.device)
    out[shape.content_mask().to(values.device)] = values.float()
    return out
