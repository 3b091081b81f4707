"""Turning lmms-eval visuals into model inputs: PIL images, and videos (a `Video` of frames or a file path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..frames import processor_inputs


@dataclass
class Video:
    """A video given as decoded frames (what the synthetic video task returns from `doc_to_visual`)."""

    frames: list[Image.Image]


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def visual_kind(visual: Any) -> str:
    """'image' or 'video' for one lmms-eval visual; anything else is refused with what is allowed."""
    if isinstance(visual, Image.Image):
        return "image"
    if isinstance(visual, Video) or (isinstance(visual, str) and visual.lower().endswith(VIDEO_SUFFIXES)):
        return "video"
    raise TypeError(
        f"unsupported visual {type(visual).__name__}: tokenzip's lmms-eval models take PIL images, "
        f"tokenzip.evaluation.media.Video frames or video file paths ({', '.join(VIDEO_SUFFIXES)})"
    )


def build_inputs(model, processor, family: str, prompts: list[str], visuals: list[list[Any]]) -> dict:
    """Left-padded processor inputs for a batch: prompt b with its visuals (images in order, then videos).

    Videos go through the processor's video processor when it has one; without one (transformers' video
    processors need torchvision) decoded frames are turned into model inputs by `tokenzip.frames`, and video
    files are refused."""
    images = [v.convert("RGB") for vs in visuals for v in vs if visual_kind(v) == "image"]
    videos = [v for vs in visuals for v in vs if visual_kind(v) == "video"]
    processor.tokenizer.padding_side = "left"
    if videos and getattr(processor, "video_processor", None) is None:
        files = [v for v in videos if not isinstance(v, Video)]
        if files:
            raise RuntimeError(
                f"cannot decode {files[0]!r}: this processor has no video processor (transformers' video "
                "processors need torchvision); install torchvision, or pass decoded frames as "
                "tokenzip.evaluation.media.Video"
            )
        return processor_inputs(processor, model.config, family, prompts, images, [v.frames for v in videos])
    kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = [v.frames if isinstance(v, Video) else v for v in videos]
    return dict(processor(**kwargs))
