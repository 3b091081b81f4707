"""Geometry of the synthetic scenes shared by the dataset's ground truth and the training code: whether a point
lies inside a drawn shape, and which objects a question is about."""

from __future__ import annotations

import torch

from .scenes import COLORS, SHAPES, Scene


def inside(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Whether offsets (dx, dy) from a shape's centre fall inside it (same geometry as `scenes.render`)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (dx.abs() <= r) & (dy.abs() <= r)
    if shape == "triangle":  # apex (0, -r), base corners (+-r, r)
        return (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)
    return dx.abs() + dy.abs() <= r  # diamond


def asked_objects(scene: Scene, question) -> list:
    """The objects (or the glyph) a question is about, read from its words: what the answer must look at."""
    words = question.text.replace("?", " ").split()
    colors = [w for w in words if w in COLORS]
    shapes = [w.rstrip("s") for w in words if w.rstrip("s") in SHAPES]
    objs = scene.objects
    if question.category == "ocr":
        return [scene.glyph] if scene.glyph is not None else []
    if question.category == "position":  # two (colour, shape) pairs
        return [o for o in objs for c, s in zip(colors, shapes) if o.color == c and o.shape == s]
    return [o for o in objs if (not colors or o.color in colors) and (not shapes or o.shape in shapes)]
