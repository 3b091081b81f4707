"""Synthetic visual QA for CPU-scale accuracy measurements (issue 5, part 1).

Procedural scenes (shapes x colours x sizes on clutter, one small rendered glyph), single-word-answer questions in
six categories (`CATEGORIES`), deterministic train / val / test splits, and a short-video variant (an object
changes colour, moves or appears). No download, no GPU.

Two dataset versions (`VERSIONS`, argument `version=` of `sample` / `video_sample`): "v1", which the shipped bundles
were trained on, and "v2", photograph-like scenes whose answers sit in a small part of the image. `truth` knows,
for every sample, which part of the image its question needs and which tokens of any model geometry show it (what
the `oracle` policy keeps).
"""

from .dataset import (
    SPLITS,
    VERSIONS,
    VIDEO_FRAMES,
    VIDEO_SIDE,
    VIDEO_TEST,
    Sample,
    VideoSample,
    sample,
    samples,
    video_sample,
)
from .questions import CATEGORIES, Question
from .scenes import COLORS, SHAPES, Glyph, Obj, Scene, random_scene, render

__all__ = [
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "SPLITS",
    "VERSIONS",
    "VIDEO_FRAMES",
    "VIDEO_SIDE",
    "VIDEO_TEST",
    "Glyph",
    "Obj",
    "Question",
    "Sample",
    "Scene",
    "VideoSample",
    "random_scene",
    "render",
    "sample",
    "samples",
    "video_sample",
]
