"""Training conversations: the sample's own question first, then extra questions about the same scene.

The first turn is exactly the evaluation prompt (image + question, generation prompt), so its loss trains the
test-time format; the extra turns reuse the image forward for more supervision (several answers per rendered
image). Extra questions never change the scene: their answers are read from it as it is.
"""

from __future__ import annotations

import random

import torch

from .questions import NUMBER_WORDS, Question
from .scenes import COLORS, SHAPES, Scene

ASSISTANT_MARKER = {
    "llava": "ASSISTANT:",
    "qwen2_5_vl": "assistant",
    "qwen2_vl": "assistant",
    "qwen3_vl": "assistant",
    "llava_onevision": "assistant",
    "llava_next": "ASSISTANT:",
}


def extra_questions(rng: random.Random, scene: Scene) -> list[Question]:
    """One question per category that the scene supports as drawn, in random order."""
    objs = scene.objects
    out: list[Question] = []
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    unique_shape = [o for o in objs if shapes.count(o.shape) == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        out.append(Question("color", f"What color is the {o.shape} ?", o.color))
    unique_color = [o for o in objs if colors.count(o.color) == 1]
    if unique_color:
        o = rng.choice(unique_color)
        out.append(Question("shape", f"What shape is the {o.color} object ?", o.shape))
    shape = rng.choice(SHAPES)
    n = shapes.count(shape)
    if n < len(NUMBER_WORDS):
        out.append(Question("count", f"How many {shape}s are there ?", NUMBER_WORDS[n]))
    if rng.random() < 0.5:
        o = rng.choice(objs)
        color, shape = o.color, o.shape
    else:
        color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    present = any(o.color == color and o.shape == shape for o in objs)
    out.append(Question("exists", f"Is there a {color} {shape} ?", "yes" if present else "no"))
    pairs = [(a, b) for a in unique_color for b in unique_color if a is not b and abs(a.x - b.x) >= 0.1]
    if pairs:
        a, b = rng.choice(pairs)
        side = "left" if a.x < b.x else "right"
        out.append(Question("position", f"Is the {a.color} {a.shape} left or right of the {b.color} {b.shape} ?", side))
    if scene.glyph is not None:
        out.append(Question("ocr", "What character is written in the white box ?", scene.glyph.char.lower()))
    rng.shuffle(out)
    return out


def messages(questions: list[Question], media: str = "image") -> list[dict]:
    """Chat messages: the first user turn carries the image (or video), then alternating question / answer."""
    out: list[dict] = []
    for k, q in enumerate(questions):
        content: list[dict] = [{"type": media}] if k == 0 else []
        content.append({"type": "text", "text": q.text})
        out.append({"role": "user", "content": content})
        out.append({"role": "assistant", "content": [{"type": "text", "text": q.answer}]})
    return out


def answer_mask(input_ids: torch.Tensor, marker_id: int) -> torch.Tensor:
    """[B, S] bool: the answer word (right after the assistant marker) and the end-of-turn token after it."""
    after_marker = torch.zeros_like(input_ids, dtype=torch.bool)
    after_marker[:, 1:] = input_ids[:, :-1] == marker_id
    mask = after_marker.clone()
    mask[:, 1:] |= after_marker[:, :-1]
    return mask
