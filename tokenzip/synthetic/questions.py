"""Single-word-answer questions about a `Scene`, one generator per category.

Each category stresses token compression differently: `color` / `shape` need the tokens of one object, `count`
needs every matching object, `exists` is a POPE-like probe (half the questions name an absent object), `position`
needs two objects and their layout, `ocr` needs the few tokens of a small rendered glyph. A generator may change
the scene (to make the asked-about object unique, or present / absent as required) and returns the scene it
describes; answers are computed from the scene, never stored separately.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .scenes import COLORS, SHAPES, STYLES, Obj, Scene

CATEGORIES = ("color", "shape", "count", "exists", "position", "ocr")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")


@dataclass(frozen=True)
class Question:
    category: str
    text: str
    answer: str  # one lower-case word


def _unique_by(scene: Scene, key: Callable[[Obj], str]) -> list[int]:
    """Indices of objects whose key value occurs once in the scene."""
    values = [key(o) for o in scene.objects]
    return [i for i, v in enumerate(values) if values.count(v) == 1]


def _make_unique(rng: random.Random, scene: Scene, attr: str, pool: tuple[str, ...]) -> tuple[Scene, int]:
    """Pick an object and recolour / reshape the others so that its `attr` value is unique in the scene."""
    index = rng.randrange(len(scene.objects))
    value = getattr(scene.objects[index], attr)
    for j, other in enumerate(scene.objects):
        if j != index and getattr(other, attr) == value:
            scene = scene.with_object(j, **{attr: rng.choice([v for v in pool if v != value])})
    return scene, index


def ask_color(rng: random.Random, scene: Scene) -> tuple[Scene, Question]:
    scene, i = _make_unique(rng, scene, "shape", SHAPES)
    obj = scene.objects[i]
    return scene, Question("color", f"What color is the {obj.shape} ?", obj.color)


def ask_shape(rng: random.Random, scene: Scene) -> tuple[Scene, Question]:
    scene, i = _make_unique(rng, scene, "color", tuple(COLORS))
    obj = scene.objects[i]
    return scene, Question("shape", f"What shape is the {obj.color} object ?", obj.shape)


def ask_count(rng: random.Random, scene: Scene) -> tuple[Scene, Question]:
    shape = rng.choice(SHAPES)
    want = rng.randint(0, min(STYLES[scene.style].max_count, len(scene.objects)))
    chosen = set(rng.sample(range(len(scene.objects)), want))
    for j, obj in enumerate(scene.objects):
        if j in chosen:
            scene = scene.with_object(j, shape=shape)
        elif obj.shape == shape:
            scene = scene.with_object(j, shape=rng.choice([s for s in SHAPES if s != shape]))
    n = sum(o.shape == shape for o in scene.objects)
    return scene, Question("count", f"How many {shape}s are there ?", NUMBER_WORDS[n])


def ask_exists(rng: random.Random, scene: Scene) -> tuple[Scene, Question]:
    color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    if rng.random() < 0.5:  # present: turn one object into it
        scene = scene.with_object(rng.randrange(len(scene.objects)), color=color, shape=shape)
    else:  # absent: change the colour of every object that matches
        for j, obj in enumerate(scene.objects):
            if obj.color == color and obj.shape == shape:
                scene = scene.with_object(j, color=rng.choice([c for c in COLORS if c != color]))
    present = any(o.color == color and o.shape == shape for o in scene.objects)
    return scene, Question("exists", f"Is there a {color} {shape} ?", "yes" if present else "no")


def ask_position(rng: random.Random, scene: Scene) -> tuple[Scene, Question]:
    """Left / right of two objects with unique colours whose centres are at least 0.1 apart horizontally."""
    for _ in range(50):
        a, b = rng.sample(range(len(scene.objects)), 2)
        if abs(scene.objects[a].x - scene.objects[b].x) >= 0.1:
            break
    else:
        scene = scene.with_object(0, x=0.2)
        scene = scene.with_object(1, x=0.8)
        a, b = 0, 1
    palette = rng.sample(tuple(COLORS), 2)
    scene = scene.with_object(a, color=palette[0]).with_object(b, color=palette[1])
    for j, obj in enumerate(scene.objects):
        if j not in (a, b) and obj.color in palette:
            scene = scene.with_object(j, color=rng.choice([c for c in COLORS if c not in palette]))
    first, second = scene.objects[a], scene.objects[b]
    side = "left" if first.x < second.x else "right"
    text = f"Is the {first.color} {first.shape} left or right of the {second.color} {second.shape} ?"
    return scene, Question("position", text, side)


def ask_ocr(rng: random.Random, scene: Scene) -> tuple[Scene, Question]:
    if scene.glyph is None:
        raise ValueError("an ocr question needs a scene with a glyph")
    return scene, Question("ocr", "What character is written in the white box ?", scene.glyph.char.lower())


ASK: dict[str, Callable[[random.Random, Scene], tuple[Scene, Question]]] = {
    "color": ask_color,
    "shape": ask_shape,
    "count": ask_count,
    "exists": ask_exists,
    "position": ask_position,
    "ocr": ask_ocr,
}
