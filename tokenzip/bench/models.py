"""The model a benchmark runs on, and a function producing its inputs.

Three sources:

* ``tiny-llava`` / ``tiny-qwen2_5_vl`` / ``tiny-llava_onevision`` / ``tiny-qwen2_vl``: the in-memory tiny models of
  `tokenzip.tiny` with their offline processors (the default; nothing is downloaded);
* a built-in real config with random weights (``random_weights=True``, e.g. ``llava-onevision-qwen2-0.5b``),
  optionally with fewer LLM / vision layers: real shapes, so timings mean something without a download;
* a bundled trained model (``synth-llava``, ... see `tokenzip.assets`), a Hugging Face hub id or a local
  directory, loaded with `from_pretrained` (weights must be local or reachable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import BUILTIN, build_config, builtin_names, model_class
from ..errors import TokenzipError
from ..loading import MODEL_CLASSES
from ..tiny import FACTORIES
from .inputs import replicate, synthetic_inputs

TINY = {f"tiny-{family}": family for family in FACTORIES}
FAMILY_OF_MODEL_TYPE = {family: family for family in MODEL_CLASSES}  # a family's name is its config's `model_type`
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "flash_attention_2", "eager")


class BenchSetupError(TokenzipError, ValueError):
    """The benchmark cannot be set up as asked (unknown model, no CUDA, weights not available offline...)."""


@dataclass
class Workload:
    """What each benchmark prompt contains (images, video frames, text length, batch)."""

    images: int = 1
    image_size: tuple[int, int] | None = None
    frames: int = 0
    text_tokens: int = 60
    batch: int = 1
    prompt: str = "Describe the image in detail ."
    image_path: str | None = None

    def describe(self) -> str:
        what = f"{self.frames}-frame video" if self.frames else f"{self.images} image(s)"
        size = f" of {self.image_size[0]}x{self.image_size[1]}" if self.image_size and not self.frames else ""
        return f"{what}{size}, batch {self.batch}"


@dataclass
class BenchModel:
    """A loaded model, its name, family and a builder of its inputs for a `Workload`."""

    model: torch.nn.Module
    name: str
    family: str
    make_inputs: Callable[[Workload], dict]
    description: str
    processor: Any = None  # pretrained models: their processor (accuracy runs need it)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def check_device(device: str) -> torch.device:
    """A torch device, or a clear error when CUDA is asked for without CUDA."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise BenchSetupError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchSetupError(f"--device {device} asked for CUDA, but torch {torch.__version__} sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise BenchSetupError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def load_model(
    name: str,
    device: str = "cpu",
    dtype: str = "float32",
    attn: str = "sdpa",
    random_weights: bool = False,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    seed: int = 0,
) -> BenchModel:
    """Load the benchmark model `name` (see the module docstring for the accepted names)."""
    dev = check_device(device)
    if dtype not in DTYPES:
        raise BenchSetupError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if attn not in ATTENTION:
        raise BenchSetupError(f"unknown attention implementation {attn!r}; choose one of {', '.join(ATTENTION)}")
    if attn == "flash_attention_2" and dev.type != "cuda":
        raise BenchSetupError("flash_attention_2 needs --device cuda (and the flash-attn package)")
    torch_dtype = DTYPES[dtype]
    if name in TINY:
        if random_weights or text_layers or vision_layers:
            raise BenchSetupError("--random-weights / --text-layers / --vision-layers apply to built-in configs only")
        return _tiny(name, dev, torch_dtype, attn)
    if random_weights:
        if name not in BUILTIN:
            raise BenchSetupError(
                f"--random-weights needs a built-in config; {name!r} is not one of: {', '.join(builtin_names())}"
            )
        return _random(name, dev, torch_dtype, attn, text_layers, vision_layers, seed)
    from .. import assets

    if name in assets.FAMILY_OF:
        try:
            bundled = _pretrained(str(assets.path(name)), dev, torch_dtype, attn)
        except FileNotFoundError as err:
            raise BenchSetupError(str(err)) from err
        bundled.name = name  # titles and progress say synth-llava, not the install path
        return bundled
    if name in BUILTIN:
        raise BenchSetupError(
            f"{name!r} is a built-in config without weights: add --random-weights for a real-shaped random model, "
            "or pass a hub id / local directory of the checkpoint"
        )
    return _pretrained(name, dev, torch_dtype, attn)


def _tiny(name: str, dev: torch.device, dtype: torch.dtype, attn: str) -> BenchModel:
    from ..tiny import dummy_image, tiny, video_inputs

    family = TINY[name]
    vlm = tiny(family, attn=attn)
    vlm.model.to(dev, dtype)

    def make_inputs(work: Workload) -> dict:
        if work.frames:
            try:
                one = video_inputs(vlm, frames=work.frames)
            except ValueError as err:
                raise BenchSetupError(f"{err}; use images") from err
        else:
            h, w = work.image_size or (112, 112)
            images = [dummy_image(w, h, seed) for seed in range(work.images)]
            one = vlm.inputs(images, vlm.prompt(work.prompt, images=work.images))
        return _to(replicate(one, work.batch), dev, dtype)

    return BenchModel(vlm.model, name, family, make_inputs, f"tiny random-weight {family} (offline, in memory)")


def _random(
    name: str,
    dev: torch.device,
    dtype: torch.dtype,
    attn: str,
    text_layers: int | None,
    vision_layers: int | None,
    seed: int,
) -> BenchModel:
    family = BUILTIN[name]["family"]
    try:
        config = build_config(name, text_layers=text_layers, vision_layers=vision_layers)
    except (ValueError, TypeError) as err:
        raise BenchSetupError(f"cannot build {name} with text_layers={text_layers}: {err}") from err
    torch.manual_seed(seed)
    with torch.device(dev):
        model = model_class(family)._from_config(config, attn_implementation=attn, dtype=dtype)
    model.eval()

    def make_inputs(work: Workload) -> dict:
        if work.image_path:
            raise BenchSetupError("--image needs a processor: random-weight models take synthetic inputs only")
        one = synthetic_inputs(
            model, work.images, work.image_size, work.frames, work.text_tokens, batch=work.batch, seed=seed
        )
        return _to(one, dev, dtype)

    layers = config.get_text_config().num_hidden_layers
    what = f"{name} config, random weights, {layers} LLM layers"
    return BenchModel(model, name, family, make_inputs, what)


def _pretrained(name: str, dev: torch.device, dtype: torch.dtype, attn: str) -> BenchModel:
    from transformers import AutoConfig

    from ..loading import load_processor

    if name.startswith("~"):
        name = str(Path(name).expanduser())
    if name.startswith(("/", "./", "../")) and not Path(name).is_dir():
        raise BenchSetupError(f"no such local checkpoint directory: {name!r}")
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        where = "directory" if Path(name).exists() else "hub id"
        raise BenchSetupError(
            f"cannot load {name!r} ({where}): {err.__class__.__name__}: {str(err).splitlines()[0]}. Offline, the "
            "weights must already be in the local Hugging Face cache or a local directory; the built-in configs "
            f"({', '.join(builtin_names())}) run without weights with --random-weights"
        ) from err
    family = FAMILY_OF_MODEL_TYPE.get(config.model_type)
    if family is None:
        raise BenchSetupError(
            f"{name!r} is a {config.model_type!r} model; tokenzip bench supports {', '.join(FAMILY_OF_MODEL_TYPE)}"
        )
    model = model_class(family).from_pretrained(name, dtype=dtype, attn_implementation=attn, device_map=str(dev))
    model.eval()
    processor = load_processor(name)  # the image-only processor where the video one needs torchvision

    def make_inputs(work: Workload) -> dict:
        from PIL import Image

        from ..tiny import dummy_image

        content: list[dict] = []
        kwargs: dict = {}
        if work.frames:
            import numpy as np

            if getattr(processor, "video_processor", None) is None:
                raise BenchSetupError(
                    f"--frames needs {name!r}'s video processor, which needs torchvision (not installed): "
                    "install torchvision, or benchmark videos with --random-weights or a tiny model"
                )
            rng = np.random.default_rng(0)
            side = work.image_size or (384, 384)
            video = rng.integers(0, 256, (work.frames, side[0], side[1], 3), dtype=np.uint8)
            content.append({"type": "video"})
            kwargs["videos"] = [video] * work.batch
        else:
            if work.image_path:
                images = [Image.open(work.image_path).convert("RGB")] * work.images
            else:
                h, w = work.image_size or (336, 336)
                images = [dummy_image(w, h, seed) for seed in range(work.images)]
            content += [{"type": "image"}] * work.images
            kwargs["images"] = images * work.batch
        content.append({"type": "text", "text": work.prompt})
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        processor.tokenizer.padding_side = "left"
        enc = processor(text=[text] * work.batch, padding=work.batch > 1, return_tensors="pt", **kwargs)
        return _to(dict(enc), dev, dtype)

    description = f"{name} ({config.model_type}, pretrained weights)"
    return BenchModel(model, name, family, make_inputs, description, processor)


def _to(inputs: dict, dev: torch.device, dtype: torch.dtype) -> dict:
    """Move tensors to `dev`; floating pixel tensors also to `dtype`."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(dev)
            if value.is_floating_point() and key.startswith("pixel_values"):
                value = value.to(dtype)
        out[key] = value
    return out
