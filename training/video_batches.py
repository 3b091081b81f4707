"""Video steps of the question-answering phase (Qwen2.5-VL and LLaVA-OneVision, `TrainConfig.video_share`).

A video step trains on a batch of training clips (`video_sample("train", i)`, `VIDEO_FRAMES` frames rendered at
`VIDEO_SIDE` px, one event each), one question per clip, with the answer-word loss alone: the dense heads,
attention teachers and probes are defined on image grids. Frames become model inputs through `tokenzip.frames`
(the same path the lmms-eval plug-in takes), so training and evaluation see identical tensors.
"""

from __future__ import annotations

import math

from tokenzip.frames import VIDEO_TOKEN, processor_inputs
from tokenzip.synthetic.conversations import ASSISTANT_MARKER, answer_mask, messages
from tokenzip.synthetic.dataset import SPLITS, VIDEO_FRAMES, video_sample

VIDEO_FAMILIES = tuple(VIDEO_TOKEN)  # the families that take video inputs


def is_video_step(step: int, share: float) -> bool:
    """Whether question-answering step `step` (0-based) is a video step: `share` of all steps, evenly spread."""
    return share > 0 and math.floor((step + 1) * share) > math.floor(step * share)


def video_batch(processor, config, family: str, indices: list[int], seed: int = 0, version: str = "v1") -> dict:
    """Right-padded model inputs of training clips `indices` (wrapping around the split), with `labels` on each
    answer word and its end-of-turn token (-100 elsewhere)."""
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"{family!r} has no video input; video families: {list(VIDEO_FAMILIES)}")
    texts, clips = [], []
    for i in indices:
        clip = video_sample("train", i % SPLITS["train"], seed, (VIDEO_FRAMES, VIDEO_FRAMES), version)
        texts.append(processor.apply_chat_template(messages([clip.question], media="video")))
        clips.append(clip.frames())
    processor.tokenizer.padding_side = "right"
    batch = processor_inputs(processor, config, family, texts, [], clips)
    marker = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER[family])
    batch["labels"] = batch["input_ids"].masked_fill(~answer_mask(batch["input_ids"], marker), -100)
    return batch


__all__ = ["VIDEO_FAMILIES", "is_video_step", "video_batch"]
