"""Load a supported VLM and its processor from a hub id, a local directory or a bundled tiny model name.

`load_vlm("synth-llava")` needs no network; `load_vlm("llava-hf/llava-1.5-7b-hf")` uses the usual HF cache.
Qwen2.5-VL and LLaVA-OneVision processors need torchvision for their video processor; without it (CPU machines
here) the image-only processor is built from the same files, and videos are given as tensors by the caller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import assets
from .adapters import ADAPTERS, adapter_class
from .errors import UnsupportedModelError

MODEL_CLASSES = {a.family: a.model_classes[0] for a in ADAPTERS}  # a family's name is its config's `model_type`
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve(pretrained: str | Path) -> str:
    """A bundled model name becomes its directory; anything else is passed on to `from_pretrained`."""
    return str(assets.path(str(pretrained))) if str(pretrained) in assets.FAMILY_OF else str(pretrained)


def model_family(pretrained: str | Path) -> str:
    """The family ('llava', 'qwen2_5_vl', 'qwen2_vl', 'llava_onevision', ...) from the checkpoint's config."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(resolve(pretrained)).model_type
    if model_type not in MODEL_CLASSES:
        raise UnsupportedModelError(
            f"{pretrained!r} is a {model_type!r} model; tokenzip supports model types {sorted(MODEL_CLASSES)}"
        )
    return model_type


def load_processor(pretrained: str | Path) -> Any:
    """`AutoProcessor`, or the image-only processor of the family when the full one cannot be built."""
    from transformers import AutoProcessor

    where = resolve(pretrained)
    family = model_family(where)
    try:
        processor = AutoProcessor.from_pretrained(where)
    except (ImportError, OSError, ValueError, TypeError):
        processor = None
    if processor is not None and hasattr(processor, "image_processor"):
        return processor
    image_only = adapter_class(family).image_only_processor()
    if image_only is None:
        raise UnsupportedModelError(f"could not build the {family} processor from {where!r}")
    return _image_only_processor(where, image_only)


def _image_only_processor(where: str, cls: type) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file

    tokenizer = AutoTokenizer.from_pretrained(where)
    image_processor = AutoImageProcessor.from_pretrained(where)
    options: dict[str, Any] = {}
    config_file = cached_file(where, "processor_config.json", _raise_exceptions_for_missing_entries=False)
    if config_file:
        saved = json.loads(Path(config_file).read_text())
        options = {k: v for k, v in saved.items() if k in ("num_image_tokens", "vision_feature_select_strategy")}
    template_file = cached_file(where, "chat_template.jinja", _raise_exceptions_for_missing_entries=False)
    chat_template = Path(template_file).read_text() if template_file else tokenizer.chat_template
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **options)


def load_vlm(
    pretrained: str | Path,
    attn_implementation: str = "sdpa",
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """`(model, processor)` in eval mode. `dtype` is a torch dtype, one of `DTYPES`' names, or 'auto' (float32 on
    CPU, the checkpoint's dtype otherwise)."""
    import transformers

    where = resolve(pretrained)
    family = model_family(where)
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {[*DTYPES, 'auto']} or a torch.dtype, got {dtype!r}")
        dtype = DTYPES[dtype]
    on_cpu = device_map is None and (device is None or str(device).startswith("cpu"))
    if dtype == "auto" and on_cpu:
        dtype = torch.float32
    cls = getattr(transformers, MODEL_CLASSES[family])
    model = cls.from_pretrained(
        where, attn_implementation=attn_implementation, dtype=dtype, device_map=device_map, **model_kwargs
    )
    if device_map is None and device is not None:
        model = model.to(device)
    return model.eval(), load_processor(where)


__all__ = ["MODEL_CLASSES", "load_processor", "load_vlm", "model_family", "resolve"]
