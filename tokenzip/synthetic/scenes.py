"""Procedural scenes: coloured shapes and one small rendered glyph on a cluttered background, drawn with PIL.

A `Scene` is pure data (what is where); `render` turns it into an RGB image. Everything is deterministic: the
same `random.Random` state gives the same scene, and the same scene the same pixels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.07, "large": 0.12}  # half-extent as a fraction of the image side
GLYPHS = "ACEFHKLMNPRTUVXY23456789"  # unambiguous at small sizes
BACKGROUND = (245, 245, 240)
CLUTTER = (180, 180, 180)


@dataclass(frozen=True)
class Obj:
    """One shape; centre (x, y) in [0, 1] image coordinates (x to the right, y downwards)."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Glyph:
    """A character printed in black inside a white box of half-extent `radius`, centred at (x, y)."""

    char: str
    x: float
    y: float
    radius: float = 0.07


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    glyph: Glyph | None = None
    clutter_seed: int = 0
    clutter: int = 14  # thin grey line segments in the background
    extra: dict = field(default_factory=dict, compare=False)

    def with_object(self, index: int, **changes) -> Scene:
        objects = list(self.objects)
        objects[index] = replace(objects[index], **changes)
        return replace(self, objects=tuple(objects))


class _NoRoom(Exception):
    """No free spot for the next object in this layout."""


def _free_spot(rng: random.Random, taken: list[tuple[float, float, float]], radius: float) -> tuple[float, float]:
    """A centre whose disc does not touch the taken discs (x, y, r) nor the border; rejection sampling."""
    for _ in range(500):
        x, y = rng.uniform(radius + 0.02, 1 - radius - 0.02), rng.uniform(radius + 0.02, 1 - radius - 0.02)
        if all(math.hypot(x - tx, y - ty) > radius + tr + 0.03 for tx, ty, tr in taken):
            return x, y
    raise _NoRoom


def random_scene(rng: random.Random, n_objects: tuple[int, int] = (3, 6), glyph: bool = True) -> Scene:
    """Objects with random shape, colour, size and non-overlapping positions, plus (optionally) one glyph.

    A layout that leaves no room for the next object is discarded and drawn again from the same generator (still
    deterministic; layouts that fit the first time are unaffected).
    """
    for _ in range(100):
        try:
            return _layout(rng, n_objects, glyph)
        except _NoRoom:
            continue
    raise RuntimeError("no layout fits: too many objects for the canvas")


def _layout(rng: random.Random, n_objects: tuple[int, int], glyph: bool) -> Scene:
    taken: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(rng.randint(*n_objects)):
        size = rng.choice(tuple(SIZES))
        x, y = _free_spot(rng, taken, SIZES[size])
        taken.append((x, y, SIZES[size]))
        objects.append(Obj(rng.choice(SHAPES), rng.choice(tuple(COLORS)), size, x, y))
    mark = None
    if glyph:
        x, y = _free_spot(rng, taken, 0.07)
        mark = Glyph(rng.choice(GLYPHS), x, y)
    return Scene(tuple(objects), mark, clutter_seed=rng.randrange(2**31))


def _polygon(obj: Obj, side: int) -> list[tuple[float, float]]:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    if obj.shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # diamond


def render(scene: Scene, side: int = 336) -> Image.Image:
    """The scene as a side x side RGB image: clutter lines, then the shapes, then the glyph box."""
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    clutter = random.Random(scene.clutter_seed)
    for _ in range(scene.clutter):
        x0, y0 = clutter.uniform(0, side), clutter.uniform(0, side)
        angle, length = clutter.uniform(0, math.pi), clutter.uniform(0.05, 0.2) * side
        draw.line((x0, y0, x0 + length * math.cos(angle), y0 + length * math.sin(angle)), fill=CLUTTER, width=1)
    for obj in scene.objects:
        color = COLORS[obj.color]
        if obj.shape == "circle":
            cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon(_polygon(obj, side), fill=color)
    if scene.glyph is not None:
        g = scene.glyph
        cx, cy, r = g.x * side, g.y * side, g.radius * side
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255), outline=(0, 0, 0))
        font = ImageFont.load_default(size=max(8, int(1.4 * r)))
        draw.text((cx, cy), g.char, fill=(0, 0, 0), font=font, anchor="mm")
    return image
