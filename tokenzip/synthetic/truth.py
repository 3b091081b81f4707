"""Ground truth of the synthetic data: which part of the image a question needs, and which tokens show it.

The generator knows every scene, so for each sample it knows the content its answer depends on
(`needed`): the object a colour / shape question names, every object a count question counts, the object an
exists question asks about when present (nothing when absent: seeing no such object is the answer), the two objects
of a position question, the glyph of an OCR question, and in a clip the object the event happens to, in every frame
it is visible. `needed_raster` draws that content as a coverage raster in image coordinates, one per frame; `coverage`
area-pools a raster onto any token grid, so the same truth serves every family's geometry (LLaVA's patch grid,
Qwen2.5-VL's 2x2 merge units and temporal pairs, OneVision's base grid and packed tiles, video frames) without
knowing it: `tokenzip.policies.oracle` pools onto the grids of the item it is given.

A token is *informative* when its cell overlaps the needed content (coverage > 0).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedInputError
from .dataset import Sample, VideoSample, sample, video_sample
from .geometry import asked_objects, inside
from .scenes import Glyph, Obj, Scene

RASTER = 240  # raster side: divisible by every grid side of the bundled geometries (6, 10, 12, 20, 24, ...)


def needed(scene: Scene, question) -> list[Obj | Glyph]:
    """The objects (or the glyph) of `scene` that the answer to `question` depends on (see the module docstring)."""
    return list(asked_objects(scene, question))


def video_needed(clip: VideoSample) -> list[list[Obj]]:
    """Per frame, the object the clip's event happens to (empty in the frames before it appears)."""
    if clip.event == "appear":
        before = set(clip.scenes[0].objects)
        target = next(o for o in clip.scenes[-1].objects if o not in before)
        return [[o for o in scene.objects if o == target] for scene in clip.scenes]
    shape = clip.question.text.split()[-3]  # "What color did the {shape} turn ?" / "Which way did the {shape} move ?"
    return [[o for o in scene.objects if o.shape == shape] for scene in clip.scenes]


def raster(things: list[Obj | Glyph], side: int = RASTER) -> torch.Tensor:
    """[side, side] bool: pixels (sampled at their centres, image coordinates in [0, 1]) covered by `things`, with
    the geometry `scenes.render` draws (a glyph covers its whole box)."""
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) / side
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    out = torch.zeros(side, side, dtype=torch.bool)
    for t in things:
        if isinstance(t, Glyph):
            out |= ((x - t.x).abs() <= t.radius) & ((y - t.y).abs() <= t.radius)
        else:
            out |= inside(t.shape, x - t.x, y - t.y, t.radius)
    return out


def needed_raster(item: Sample | VideoSample, side: int = RASTER) -> torch.Tensor:
    """[frames, side, side] float coverage raster of what the question needs (frames = 1 for an image)."""
    if isinstance(item, VideoSample):
        return torch.stack([raster(things, side) for things in video_needed(item)]).float()
    return raster(needed(item.scene, item.question), side).float()[None]


def coverage(truth: torch.Tensor, frames: int, rows: int, cols: int) -> torch.Tensor:
    """Share of each token cell covered: truth [T, H, W] (T source frames) -> float [frames * rows * cols], raster
    order (frame, row, column), for a grid of `frames` x `rows` x `cols` tokens over the whole image.

    Source frames are grouped evenly into token frames (Qwen2.5-VL merges 2 consecutive frames into one); a token
    frame takes the largest coverage of its source frames. Cells are area-averaged (exact when H and W are
    multiples of rows and cols)."""
    t = truth.shape[0]
    if frames < 1 or t % frames:
        raise ValueError(f"{t} source frames cannot be grouped evenly into {frames} token frames")
    pooled = torch.nn.functional.adaptive_avg_pool2d(truth.float()[:, None], (rows, cols))[:, 0]  # [T, rows, cols]
    return pooled.view(frames, t // frames, rows, cols).amax(1).flatten()


def informative_share(item: Sample | VideoSample, rows: int = 12, cols: int = 12) -> float:
    """Share of a rows x cols token grid (per frame) that overlaps the needed content; 12 x 12 = the LLaVA bundle."""
    truth = needed_raster(item)
    return float((coverage(truth, truth.shape[0], rows, cols) > 0).float().mean())


def doc_truth(doc: dict) -> list[torch.Tensor]:
    """The ground truth of one lmms-eval document of tokenzip's synthetic tasks: one float [T, RASTER, RASTER]
    raster per visual item (one item per document; T = 1 for an image, `doc["frames"]` for a clip), as
    `tokenzip.policies.oracle.ground_truth` takes it per sample. The document names its sample by `split`, `index`,
    `seed` (default 0) and `version` (default "v1"); a video document also has `frames`. Any other document raises
    `UnsupportedInputError`: the oracle only runs on tokenzip's synthetic tasks."""
    if not isinstance(doc, dict) or "split" not in doc or "index" not in doc:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise UnsupportedInputError(
            f"policy 'oracle' needs the ground truth of each document, which only tokenzip's synthetic tasks "
            f"(tokenzip_synth*, documents with 'split' and 'index') provide; this document has {keys}"
        )
    split, index, seed = str(doc["split"]), int(doc["index"]), int(doc.get("seed", 0))
    version = str(doc.get("version", "v1"))
    if "frames" in doc:
        frames = int(doc["frames"])
        return [needed_raster(video_sample(split, index, seed, frames=(frames, frames), version=version))]
    return [needed_raster(sample(split, index, seed, version=version))]
