"""Procedural scenes: coloured shapes and one small rendered glyph on a cluttered background, drawn with PIL.

A `Scene` is pure data (what is where); `render` turns it into an RGB image. Everything is deterministic: the
same `random.Random` state gives the same scene, and the same scene the same pixels.

Two styles (`STYLES`), chosen by the dataset version:

* ``v1`` (the first bundles): 3-6 shapes of half-extent 0.07 / 0.12 on a flat background with 14 grey lines.
  The shapes cover a large part of the image, so a random tenth of the tokens often still shows them.
* ``v2``: like a photograph, most of the image carries no answer. 3-5 shapes of half-extent 0.05 / 0.06 and a
  glyph box of 0.08 sit on a textured background (a soft two-tone gradient, faint muted blobs, 40 thin lines,
  pixel noise) drawn only in desaturated tones that no question names. The content one question needs covers
  about 4 % of a 12x12 token grid on average (`tokenzip.synthetic.truth`), at most about 13 %.
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
class Style:
    """How scenes of one dataset version look: object sizes and counts, glyph size, background."""

    name: str
    sizes: dict[str, float]  # size name -> half-extent as a fraction of the image side
    n_objects: tuple[int, int]  # objects per scene (inclusive)
    glyph_radius: float
    clutter: int  # thin line segments in the background
    background: str  # "flat" (one colour) or "photo" (gradient, blobs, noise)
    max_count: int  # largest answer of a count question


STYLES: dict[str, Style] = {
    "v1": Style("v1", SIZES, (3, 6), 0.07, 14, "flat", 4),
    "v2": Style("v2", {"small": 0.05, "large": 0.06}, (3, 5), 0.08, 40, "photo", 3),
}


@dataclass(frozen=True)
class Obj:
    """One shape; centre (x, y) in [0, 1] image coordinates (x to the right, y downwards)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    r: float | None = None  # half-extent; None = `SIZES[size]` (the v1 sizes)

    @property
    def radius(self) -> float:
        return SIZES[self.size] if self.r is None else self.r


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
    style: str = "v1"  # a key of STYLES: how the background is drawn

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


def random_scene(
    rng: random.Random, n_objects: tuple[int, int] | None = None, glyph: bool = True, style: str = "v1"
) -> Scene:
    """Objects with random shape, colour, size and non-overlapping positions, plus (optionally) one glyph, in
    `style` (a key of `STYLES`); `n_objects` overrides the style's object count range.

    A layout that leaves no room for the next object is discarded and drawn again from the same generator (still
    deterministic; layouts that fit the first time are unaffected).
    """
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; styles: {sorted(STYLES)}")
    look = STYLES[style]
    for _ in range(100):
        try:
            return _layout(rng, n_objects or look.n_objects, glyph, look)
        except _NoRoom:
            continue
    raise RuntimeError("no layout fits: too many objects for the canvas")


def _layout(rng: random.Random, n_objects: tuple[int, int], glyph: bool, look: Style) -> Scene:
    taken: list[tuple[float, float, float]] = []
    objects = []
    v1 = look.name == "v1"
    for _ in range(rng.randint(*n_objects)):
        size = rng.choice(tuple(look.sizes))
        radius = look.sizes[size]
        x, y = _free_spot(rng, taken, radius)
        taken.append((x, y, radius))
        objects.append(Obj(rng.choice(SHAPES), rng.choice(tuple(COLORS)), size, x, y, None if v1 else radius))
    mark = None
    if glyph:
        x, y = _free_spot(rng, taken, look.glyph_radius)
        mark = Glyph(rng.choice(GLYPHS), x, y, look.glyph_radius)
    return Scene(tuple(objects), mark, clutter_seed=rng.randrange(2**31), clutter=look.clutter, style=look.name)


def _polygon(obj: Obj, side: int) -> list[tuple[float, float]]:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    if obj.shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # diamond


def _muted(rng: random.Random, low: int, high: int) -> tuple[int, int, int]:
    """A desaturated tone (channels within 24 of each other): never one of the named COLORS."""
    base = rng.randint(low, high)
    return tuple(max(0, min(255, base + rng.randint(-12, 12))) for _ in range(3))  # type: ignore[return-value]


def _photo_background(scene: Scene, side: int) -> Image.Image:
    """v2 background: a two-tone vertical gradient, faint large blobs, thin lines and pixel noise, all muted."""
    import numpy as np

    rng = random.Random(scene.clutter_seed)
    top, bottom = np.array(_muted(rng, 200, 245), np.float32), np.array(_muted(rng, 170, 230), np.float32)
    t = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None]
    column = (top * (1 - t) + bottom * t).astype(np.uint8)  # [side, 3]
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(column[:, None], (side, side, 3))))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 6)):  # blobs much larger than any shape, close to the background tone
        x, y = rng.uniform(0, side), rng.uniform(0, side)
        rx, ry = rng.uniform(0.12, 0.3) * side, rng.uniform(0.12, 0.3) * side
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=_muted(rng, 175, 235))
    _lines(draw, rng, scene.clutter, side, lambda: _muted(rng, 120, 200))
    noise = np.random.default_rng(scene.clutter_seed).integers(-7, 8, (side, side, 3), dtype=np.int16)
    out = np.asarray(image, dtype=np.int16) + noise  # uniform pixel noise of +-7
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _lines(draw: ImageDraw.ImageDraw, rng: random.Random, n: int, side: int, color) -> None:
    for _ in range(n):
        x0, y0 = rng.uniform(0, side), rng.uniform(0, side)
        angle, length = rng.uniform(0, math.pi), rng.uniform(0.05, 0.2) * side
        draw.line((x0, y0, x0 + length * math.cos(angle), y0 + length * math.sin(angle)), fill=color(), width=1)


def render(scene: Scene, side: int = 336) -> Image.Image:
    """The scene as a side x side RGB image: the background (v1: flat with clutter lines; v2: `_photo_background`),
    then the shapes, then the glyph box."""
    if STYLES[scene.style].background == "photo":
        image = _photo_background(scene, side)
        draw = ImageDraw.Draw(image)
    else:
        image = Image.new("RGB", (side, side), BACKGROUND)
        draw = ImageDraw.Draw(image)
        _lines(draw, random.Random(scene.clutter_seed), scene.clutter, side, lambda: CLUTTER)
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
