"""Deterministic synthetic visual-QA splits (images) and short-video questions.

Sample i of a split is drawn from its own `random.Random(f"{split}/{seed}/{i}")` (v1; v2 prefixes "v2/"), so any
sample can be rebuilt alone, splits never share a generator, and categories cycle with i (a split of 6 k samples
is exactly balanced). `version` picks the scene style (`scenes.STYLES`): "v1" for the first bundles, "v2" for the
photograph-like scenes whose answers sit in a small part of the image.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

from PIL import Image

from .questions import ASK, CATEGORIES, Question
from .scenes import COLORS, SHAPES, STYLES, Scene, random_scene, render

SPLITS = {"train": 60_000, "val": 1_200, "test": 1_200}  # default sizes (multiples of the 6 categories)
VIDEO_EVENTS = ("color_change", "move", "appear")
RENDER_SIDE = 336  # synthetic images are rendered at this size (training and the lmms-eval task); processors resize
VIDEO_FRAMES = 8  # frames per clip of the lmms-eval video task and of video training (one count: OneVision stacks)
VIDEO_SIDE = 224  # frames are rendered at this size; processors resize
VIDEO_TEST = 300  # clips in the video test split (100 per event)
DIRECTIONS = ("left", "right", "up", "down")
VERSIONS = tuple(STYLES)  # dataset versions = scene styles


def _check(split: str, index: int, version: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {sorted(SPLITS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if version not in VERSIONS:
        raise ValueError(f"unknown dataset version {version!r}; versions: {list(VERSIONS)}")


def _prefix(version: str) -> str:
    return "" if version == "v1" else f"{version}/"


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    scene: Scene
    question: Question

    def image(self, side: int = 336) -> Image.Image:
        return render(self.scene, side)


def sample(split: str, index: int, seed: int = 0, version: str = "v1") -> Sample:
    """Sample `index` of `split` (category CATEGORIES[index % 6]) of dataset `version`."""
    _check(split, index, version)
    rng = random.Random(f"{_prefix(version)}{split}/{seed}/{index}")
    category = CATEGORIES[index % len(CATEGORIES)]
    scene, question = ASK[category](rng, random_scene(rng, style=version))
    return Sample(split, index, scene, question)


def samples(split: str, n: int | None = None, seed: int = 0, version: str = "v1") -> Iterator[Sample]:
    """The first `n` samples of a split (default: its standard size)."""
    for index in range(SPLITS[split] if n is None else n):
        yield sample(split, index, seed, version)


@dataclass(frozen=True)
class VideoSample:
    split: str
    index: int
    event: str
    scenes: tuple[Scene, ...]  # one per frame
    question: Question

    def frames(self, side: int = VIDEO_SIDE) -> list[Image.Image]:
        """The clip's frames; each distinct scene is rendered once (frames before and after the event share one)."""
        rendered: dict[int, Image.Image] = {}
        for scene in self.scenes:
            if id(scene) not in rendered:
                rendered[id(scene)] = render(scene, side)
        return [rendered[id(scene)] for scene in self.scenes]


def video_sample(
    split: str, index: int, seed: int = 0, frames: tuple[int, int] = (4, 8), version: str = "v1"
) -> VideoSample:
    """A short clip in which one thing happens halfway: an object changes colour, moves, or appears.

    Events cycle with the index; the frame count is drawn from `frames` (inclusive). Before the event frame the
    scene is static; from it on the change holds.
    """
    _check(split, index, version)
    rng = random.Random(f"{_prefix(version)}video/{split}/{seed}/{index}")
    event = VIDEO_EVENTS[index % len(VIDEO_EVENTS)]
    n_frames = rng.randint(*frames)
    change = rng.randint(1, n_frames - 1)
    base = random_scene(rng, n_objects=(3, 4), glyph=False, style=version)  # leaves a free shape
    target = rng.randrange(len(base.objects))
    obj = base.objects[target]
    others = [o.shape for j, o in enumerate(base.objects) if j != target]
    if obj.shape in others:  # the named object must be unique by shape
        base = base.with_object(target, shape=rng.choice([s for s in SHAPES if s not in others]))
        obj = base.objects[target]
    if event == "color_change":
        new = rng.choice([c for c in COLORS if c != obj.color])
        after = base.with_object(target, color=new)
        question = Question("video_color", f"What color did the {obj.shape} turn ?", new)
    elif event == "move":
        r = obj.radius + 0.02
        room = {"left": obj.x - r, "right": 1 - r - obj.x, "up": obj.y - r, "down": 1 - r - obj.y}
        direction = rng.choice([d for d in DIRECTIONS if room[d] >= 0.15])  # a move of 0.15-0.25 fits
        step = min(0.25, room[direction])
        dx, dy = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[direction]
        after = base.with_object(target, x=obj.x + dx, y=obj.y + dy)
        question = Question("video_move", f"Which way did the {obj.shape} move ?", direction)
    else:  # appear: the target is absent before the change
        after = base
        base = replace(base, objects=tuple(o for j, o in enumerate(base.objects) if j != target), glyph=None)
        question = Question("video_appear", "What shape appeared ?", obj.shape)
    scenes = tuple(base if t < change else after for t in range(n_frames))
    return VideoSample(split, index, event, scenes, question)
