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
from ..signals.attention import encoder_attention_received, encoder_attention_rows, encoder_head_mean_keys

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
    deepstack_layers: tuple[int, ...] = ()  # decoder layers after which per-visual-token features are added

    @property
    def reference_architecture(self) -> bool:
        """LLaVA-1.5: the architecture the published methods' released code was written for; policies with a
        `compat` option default to their released rules on it (and to tokenzip's fixes elsewhere)."""
        return self.family == "llava"

    @property
    def vision_windowed(self) -> bool:
        """A Qwen2.5-VL-style tower: windowed attention blocks between a few full-attention ones, tokens packed in
        window order and merged 2x2 after it (the released Qwen ports of the policies have rules of their own)."""
        return self.family == "qwen2_5_vl"


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

    @abstractmethod
    def vision_signal(self, sig: Any, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """A vision signal (`tokenzip.contexts.VisionSignal`) from the inputs of vision attention module `module`
        (a forward pre-hook's `args` / `kwargs`): [R, T] per row (ViT towers) or [N] packed ('keys': [..., d])."""

    @abstractmethod
    def vision_workload(
        self,
        modality: str,
        arguments: dict[str, Any],
        shapes: list[ItemShape],
        stage: tuple[int, int] | None = None,
        projected_per_row: int | None = None,
    ) -> dict:
        """What the vision side computed in one feature call, for FLOP accounting (`tokenzip.engine.accounting`).

        stage: (layer, width) when a vision stage shortened every row to `width` tokens before encoder `layer`;
        projected_per_row: tokens per row a projector-input stage let into the projector."""

    @abstractmethod
    def example_items(
        self, images: int = 1, image_size: tuple[int, int] | None = None, frames: int = 0
    ) -> tuple[list[ItemShape], int, list[tuple[int, int, int]] | None]:
        """Items of `images` images of `image_size` (H, W; None = the family's usual size), or of one video of
        `frames` frames when frames > 0, as the processor would lay them out, without pixels (pricing):
        (item shapes, vision tower rows, Qwen-style (t, h, w) patch grids or None)."""

    @abstractmethod
    def example_inputs(
        self,
        shapes: list[ItemShape],
        grids: list[tuple[int, int, int]] | None,
        images: int,
        image_size: tuple[int, int] | None,
        frames: int,
        text: Any,
        generator: torch.Generator,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Hand-built model inputs of the `example_items` (`shapes`, `grids`) for a model without a processor
        (random-weight bench models): the token runs of the items (placeholders and their framing; `text(n)` gives
        n random text ids) and the random pixel / grid / size tensors the model's forward takes."""

    def token_types(self, input_ids: torch.Tensor, modality: str) -> dict[str, torch.Tensor]:
        """Extra per-token inputs the model needs beside `input_ids` (none by default)."""
        return {}

    def projector_tokens(self, rows: int, vision_widths: list[int] | None = None) -> int:
        """Tokens the projector processes for `rows` tower rows (`vision_widths`: per encoder layer, the row width a
        vision stage left; None = full rows). 0 where the projector is part of the tower (Qwen's merger)."""
        return 0

    # ---------------------------------------------------------------------------------------- drawing
    crops_images: ClassVar[bool] = False  # the processor centre-crops to a square (LLaVA-1.5) rather than resizing
    temporal_patch: ClassVar[int] = 1  # video frames per token cell

    @abstractmethod
    def cell_pixels(self, modality: str, part: Any) -> int:
        """Pixels per side of one token cell of grid part `part` (`tokenzip.items.GridPart`) at the model's view."""

    def image_grid(self, inputs: dict, index: int) -> tuple[int, int]:
        """(rows, cols) of image `index`'s single token grid in processor `inputs`; families whose images are not
        one grid (anyres tiles) refuse."""
        raise UnsupportedModelError(f"{self.family} images are not one token grid: draw them with tokenzip.viz.panels")

    def dropped_feature_tokens(self, arguments: dict[str, Any]) -> int:
        """Leading tower tokens a feature call drops before the projector (LLaVA's 'default' select strategy drops
        CLS; 'full' keeps it)."""
        strategy = arguments.get("vision_feature_select_strategy") or getattr(
            self.config, "vision_feature_select_strategy", "full"
        )
        return 1 if strategy == "default" else 0

    @classmethod
    @abstractmethod
    def build_config(cls, text: dict, vision: dict, top: dict, vision_layers: int | None = None) -> Any:
        """The transformers config of a checkpoint of this family from typed-in settings (`tokenzip.configs`):
        `text` / `vision` sub-config keyword arguments, `top` the top-level ones; `vision_layers` shortens the
        tower."""

    @classmethod
    def image_only_processor(cls) -> type | None:
        """A processor class without the video processor (which needs torchvision), or None if the family's
        processor has none to drop."""
        return None

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
            deepstack_layers=self.deepstack_layers(),
        )

    def deepstack_layers(self) -> tuple[int, ...]:
        """Decoder layers after whose output the model adds per-visual-token features of its own (Qwen3-VL's
        DeepStack, `tokenzip.engine.deepstack`); none by default."""
        return ()

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

    def vision_signal(self, sig: Any, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if sig.kind == "cls":
            return encoder_attention_rows(module, hidden, slice(0, 1), mask, sig.score_dtype)[:, 0]
        if sig.kind == "keys":
            return encoder_head_mean_keys(module, hidden)
        return encoder_attention_received(module, hidden, mask, score_dtype=sig.score_dtype)

    def vision_workload(
        self,
        modality: str,
        arguments: dict[str, Any],
        shapes: list[ItemShape],
        stage: tuple[int, int] | None = None,
        projected_per_row: int | None = None,
    ) -> dict:
        rows = max(shape.vision_rows[1] for shape in shapes)
        n_layers = len(self.vision_layers)
        tokens = self.grid**2 + int(self.vision_has_cls)
        widths = [tokens] * n_layers
        if stage is not None:
            layer, width = stage
            widths = [tokens] * layer + [width] * (n_layers - layer)
        if projected_per_row is not None:
            projected = rows * projected_per_row
        else:
            projected = self.projector_tokens(rows, widths, self.dropped_feature_tokens(arguments))
        return {"vision_rows": rows, "vision_widths": widths, "projector_tokens": projected}

    def projector_tokens(self, rows: int, vision_widths: list[int] | None = None, dropped: int | None = None) -> int:
        full = self.grid**2 + int(self.vision_has_cls)
        feature = self.vision_feature_layer
        width = (vision_widths[feature] if feature is not None else vision_widths[-1]) if vision_widths else full
        return rows * (width - (self.dropped_feature_tokens({}) if dropped is None else dropped))

    def cell_pixels(self, modality: str, part: Any) -> int:
        return max(1, self.config.vision_config.image_size // self.grid)

    def placeholder_id(self, modality: str) -> int:
        """The placeholder token id of `modality` in the model's config."""
        key = f"{modality}_token_index"
        value = getattr(self.config, key, None)
        return int(value if value is not None else getattr(self.config, f"{modality}_token_id"))

    def example_inputs(self, shapes, grids, images, image_size, frames, text, generator):
        placeholder = self.placeholder_id("video" if frames else "image")
        runs = []
        for shape in shapes:
            runs += [torch.full((shape.length,), placeholder), text(1)]
        return runs, self.example_pixels(images, image_size, frames, generator)

    def example_pixels(self, images: int, image_size, frames: int, generator: torch.Generator) -> dict:
        """Random pixel tensors of `images` images (or one video of `frames` frames) as the processor shapes them."""
        side = self.config.vision_config.image_size
        return {"pixel_values": torch.randn(images, 3, side, side, generator=generator)}


def interleave_structural(values: torch.Tensor, shape: ItemShape) -> torch.Tensor:
    """Place per-content-token `values` [n_content, *C] (raster order of the parts) into an item-long tensor.

    Structural tokens get NaN. Returns float32 [shape.length, *C].
    """
    out = torch.full((shape.length, *values.shape[1:]), float("nan"), dtype=torch.float32, device=values.device)
    out[shape.content_mask().to(values.device)] = values.float()
    return out
