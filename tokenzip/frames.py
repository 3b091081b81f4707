"""Video model inputs from decoded frames, built without transformers' video processors (they need torchvision).

A video is a list of PIL frames. For each family this module produces what the model's video processor would:

* Qwen2.5-VL: every frame goes through the model's own image processor (same resize, rescale and normalisation);
  consecutive frame pairs then fill the two temporal slots of each patch, giving `pixel_values_videos`
  [sum(t*h*w), C*2*14*14], `video_grid_thw` [V, 3] (t = frames / 2, an odd last frame is repeated, as Qwen's
  processor does) and `second_per_grid_ts` [V] (2 / fps). Qwen2-VL: the same without `second_per_grid_ts`.
  Qwen3-VL: the Qwen2-VL tensors; in the text every temporal patch becomes its own
  `<t seconds><|vision_start|>` frame tokens `<|vision_end|>` block (t = the mean time of its frames at `fps`),
  replacing the prompt's `<|vision_start|><|video_pad|><|vision_end|>` (or bare `<|video_pad|>`), as its
  processor lays videos out.
* LLaVA-OneVision: frames resized (bicubic) to the tower's square input and normalised with the image processor's
  mean / std, giving `pixel_values_videos` [V, F, C, S, S]. Videos of one batch must have the same frame count
  (the model stacks them).

The text gets one placeholder token per visual token: `expand_placeholders` replaces each single video
placeholder of a prompt by the right number of copies, then the processor tokenizes (and handles the images).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

VIDEO_TOKEN = {
    "qwen2_5_vl": "<|video_pad|>",
    "qwen2_vl": "<|video_pad|>",
    "qwen3_vl": "<|video_pad|>",
    "llava_onevision": "<video>",
}


@dataclass
class VideoInputs:
    """Model inputs of a batch's videos: `tensors` (keyword arguments of the model) and `tokens`, the number of
    placeholder tokens each video occupies in the text, in order."""

    tensors: dict[str, torch.Tensor]
    tokens: list[int]
    texts: list[str] | None = None  # per video, the text replacing its placeholder (Qwen3-VL: framed timestamps)


def video_inputs(processor, config, family: str, videos: Sequence[Sequence[Image.Image]], fps: float = 2.0):
    """`VideoInputs` of `videos` (each a list of RGB frames) for a model of `family` with `config`."""
    if family not in VIDEO_TOKEN:
        raise ValueError(f"{family!r} takes no video; video families: {sorted(VIDEO_TOKEN)}")
    for k, frames in enumerate(videos):
        if len(frames) == 0:
            raise ValueError(f"video {k} has no frames")
    return _BUILDERS[family](processor, config, videos, fps)


def _qwen_video(processor, config, videos, fps: float) -> VideoInputs:
    vc = config.vision_config
    tp, ps, merge = vc.temporal_patch_size, vc.patch_size, vc.spatial_merge_size
    flat, grids, tokens = [], [], []
    for frames in videos:
        frames = list(frames)
        frames += frames[-1:] * (-len(frames) % tp)  # pad to whole temporal patches with the last frame
        out = processor.image_processor([f.convert("RGB") for f in frames], return_tensors="pt")
        sizes = {tuple(g.tolist()) for g in out["image_grid_thw"]}
        if len(sizes) > 1:
            raise ValueError(f"the frames of one video must share one size; their patch grids are {sorted(sizes)}")
        ((_, h, w),) = sizes
        # [F, h*w, C, tp, ps, ps]: each frame's patches, its pixels repeated over the temporal slots
        patches = out["pixel_values"].view(len(frames), h * w, 3, tp, ps, ps)
        t = len(frames) // tp
        # temporal patch j takes frame j*tp + s in slot s: [t, tp, h*w, C, ps, ps] -> [t, h*w, C, tp, ps, ps]
        paired = patches[:, :, :, 0].reshape(t, tp, h * w, 3, ps, ps).permute(0, 2, 3, 1, 4, 5)
        flat.append(paired.reshape(t * h * w, 3 * tp * ps * ps))
        grids.append([t, h, w])
        tokens.append(t * h * w // merge**2)
    tensors = {
        "pixel_values_videos": torch.cat(flat),
        "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        "second_per_grid_ts": torch.full((len(videos),), tp / fps),
    }
    return VideoInputs(tensors, tokens)


def _onevision_video(processor, config, videos, fps: float) -> VideoInputs:
    counts = {len(frames) for frames in videos}
    if len(counts) > 1:
        raise ValueError(
            f"LLaVA-OneVision stacks the videos of a batch, so they need one frame count; got {sorted(counts)} "
            "(sample the same number of frames per video, or use batch size 1)"
        )
    side = config.vision_config.image_size
    improc = processor.image_processor
    mean = np.asarray(improc.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(improc.image_std, dtype=np.float32)[:, None, None]

    def prepare(frame: Image.Image) -> np.ndarray:
        pixels = np.asarray(frame.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
        return (pixels.transpose(2, 0, 1) / 255.0 - mean) / std

    stacked = np.stack([np.stack([prepare(f) for f in frames]) for frames in videos])
    pooled = math.ceil(side // config.vision_config.patch_size / 2) ** 2  # bilinear 2x pooling per frame
    tokens = [len(frames) * pooled + 1 for frames in videos]  # + the newline token after the last frame
    return VideoInputs({"pixel_values_videos": torch.from_numpy(stacked)}, tokens)


def _qwen2_video(processor, config, videos, fps: float) -> VideoInputs:
    """Qwen2-VL: the Qwen2.5-VL layout without `second_per_grid_ts` (its M-RoPE has no time scaling)."""
    inputs = _qwen_video(processor, config, videos, fps)
    inputs.tensors.pop("second_per_grid_ts")
    return inputs


def _qwen3_video(processor, config, videos, fps: float) -> VideoInputs:
    """Qwen3-VL: the Qwen2-VL tensors; each temporal patch framed and time-stamped in the text (`_qwen3_frames`)."""
    inputs = _qwen2_video(processor, config, videos, fps)
    tp = config.vision_config.temporal_patch_size
    per_frame = [n // int(g[0]) for n, g in zip(inputs.tokens, inputs.tensors["video_grid_thw"])]
    inputs.texts = [_qwen3_frames(len(frames), tp, fps, n) for frames, n in zip(videos, per_frame)]
    return inputs


def _qwen3_frames(frames: int, temporal_patch: int, fps: float, tokens: int) -> str:
    """The text of one Qwen3-VL video of `frames` frames: per temporal patch `<t seconds>` (the mean time of its
    first and last frame, an odd last frame repeated, as `Qwen3VLProcessor` computes it) and its `tokens`
    placeholders between `<|vision_start|>` and `<|vision_end|>`."""
    indices = list(range(frames))
    indices += indices[-1:] * (-frames % temporal_patch)
    times = [(indices[i] + indices[i + temporal_patch - 1]) / 2 / fps for i in range(0, len(indices), temporal_patch)]
    return "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * tokens + "<|vision_end|>" for t in times)


# per video family (VIDEO_TOKEN)
_BUILDERS = {
    "qwen2_5_vl": _qwen_video,
    "qwen2_vl": _qwen2_video,
    "qwen3_vl": _qwen3_video,
    "llava_onevision": _onevision_video,
}
QWEN3_VIDEO_WRAPPER = "<|vision_start|><|video_pad|><|vision_end|>"  # a chat template's framing of a Qwen video


def replace_placeholders(text: str, token: str, wrapper: str, replacements: Iterator[str]) -> str:
    """`text` with each `wrapper` (or, outside one, each bare `token`) replaced by the next of `replacements`."""
    pieces = text.replace(wrapper, token).split(token)
    out = [pieces[0]]
    for piece in pieces[1:]:
        try:
            out.append(next(replacements) + piece)
        except StopIteration:
            raise ValueError(f"the prompts hold more {token} placeholders than there are videos") from None
    return "".join(out)


def expand_placeholders(text: str, token: str, counts: Iterator[int]) -> str:
    """`text` with each occurrence of `token` replaced by `next(counts)` copies of it."""
    pieces = text.split(token)
    out = [pieces[0]]
    for piece in pieces[1:]:
        try:
            n = next(counts)
        except StopIteration:
            raise ValueError(f"the prompts hold more {token} placeholders than there are videos") from None
        out.append(token * n + piece)
    return "".join(out)


def processor_inputs(
    processor, config, family: str, texts: list[str], images: list[Image.Image], videos: list[list[Image.Image]]
) -> dict:
    """Processor inputs of a batch whose prompts hold one video placeholder per video (videos in prompt order)
    and image placeholders handled by the processor. Padding follows the tokenizer's `padding_side`."""
    kwargs: dict = {"text": texts, "padding": True, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if not videos:
        return dict(processor(**kwargs))
    built = video_inputs(processor, config, family, videos)
    token = VIDEO_TOKEN[family]
    if built.texts is not None:
        counts = iter(built.texts)
        kwargs["text"] = [replace_placeholders(t, token, QWEN3_VIDEO_WRAPPER, counts) for t in texts]
    else:
        counts = iter(built.tokens)
        kwargs["text"] = [expand_placeholders(t, token, counts) for t in texts]
    if next(counts, None) is not None:
        raise ValueError(f"{len(videos)} videos but fewer {token} placeholders in the prompts")
    with _placeholders_pre_expanded(processor, plain_replacements=built.texts is not None):
        out = dict(processor(**kwargs))
    out.update(built.tensors)
    return out


@contextmanager
def _placeholders_pre_expanded(processor, plain_replacements: bool = False):
    """The processor refuses video placeholders in a text without videos; ours are already expanded, so its
    video-token check is switched off for one call (`mm_token_type_ids` still marks them, from the token id); with
    `plain_replacements` the processor's text replacement is the generic one for that call (Qwen3-VL's own collapses
    a video wrapper it builds from the video token)."""
    saved = processor.video_token
    processor.video_token = None
    if plain_replacements:  # Qwen3-VL's own override builds its frame wrapper from the (now None) video token
        from transformers.processing_utils import ProcessorMixin

        processor.get_text_with_replacements = functools.partial(ProcessorMixin.get_text_with_replacements, processor)
    try:
        yield
    finally:
        processor.video_token = saved
        processor.__dict__.pop("get_text_with_replacements", None)


__all__ = ["VIDEO_TOKEN", "VideoInputs", "expand_placeholders", "processor_inputs", "video_inputs"]
