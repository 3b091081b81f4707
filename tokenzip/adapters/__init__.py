"""Model adapters: one module per supported family."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, ModelInfo
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen25VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    Qwen25VLAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    LlavaNextAdapter,
    Qwen3VLAdapter,
)


def adapter_class(family: str) -> type[Adapter]:
    """The adapter class of `family` ('llava', 'qwen2_5_vl', 'llava_onevision', 'qwen2_vl', 'llava_next',
    'qwen3_vl')."""
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise UnsupportedModelError(f"unknown model family {family!r}; families: {[a.family for a in ADAPTERS]}")


def supported_classes() -> list[str]:
    """Class names of the supported model families."""
    return [name for a in ADAPTERS for name in a.model_classes]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`; raises `UnsupportedModelError` naming the supported classes otherwise."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for adapter in ADAPTERS:
        if names & set(adapter.model_classes):
            return adapter(model)
    raise UnsupportedModelError(
        f"tokenzip does not support {type(model).__name__}; supported model classes: "
        f"{', '.join(supported_classes())} (pass the *ForConditionalGeneration model, as loaded for generate())"
    )


__all__ = ["ADAPTERS", "Adapter", "ModelInfo", "adapter_class", "get_adapter", "supported_classes"]
