"""The closed word list of the synthetic questions and answers (the bundled tiny models' tokenizer vocabulary)."""

from __future__ import annotations

from functools import cache

from .questions import NUMBER_WORDS
from .scenes import COLORS, GLYPHS, SHAPES

TEMPLATE_WORDS = [
    "What",
    "color",
    "is",
    "the",
    "?",
    "shape",
    "object",
    "How",
    "many",
    "are",
    "there",
    "Is",
    "a",
    "left",
    "or",
    "right",
    "of",
    "character",
    "written",
    "in",
    "white",
    "box",
    "did",
    "turn",
    "Which",
    "way",
    "move",
    "appeared",
]
CHAT_WORDS = ("USER:", "ASSISTANT:", "system", "user", "assistant")
ANSWER_WORDS = ("yes", "no", "left", "right", "up", "down")


@cache
def vocabulary() -> tuple[str, ...]:
    """Every word a synthetic prompt or answer can contain, in a fixed order (no duplicates)."""
    words = [
        *CHAT_WORDS,
        *TEMPLATE_WORDS,
        *COLORS,
        *SHAPES,
        *(f"{s}s" for s in SHAPES),
        *NUMBER_WORDS,
        *ANSWER_WORDS,
        *(c.lower() for c in GLYPHS),
    ]
    return tuple(dict.fromkeys(words))
