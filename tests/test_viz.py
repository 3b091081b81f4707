"""Kept-token overlays: the drawn cells are exactly the tokens that entered the LLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VIDEO_FAMILIES
from PIL import Image
from typer.testing import CliRunner

import tokenzip
from tokenzip.cli import app
from tokenzip.tiny import dummy_image, tiny, video_inputs
from tokenzip.viz import (
    GAP,
    KEPT,
    MERGED,
    MIN_FIGURE_WIDTH,
    TINT,
    cell_states,
    draw_item,
    figure,
    kept_grid,
    model_view,
    overlay,
    panel_labels,
    panels,
    show,
)


def _cell_centres(size, rows, cols):
    w, h = size
    return [((2 * c + 1) * w // (2 * cols), (2 * r + 1) * h // (2 * rows)) for r in range(rows) for c in range(cols)]


def test_overlay_pixels_follow_the_mask():
    image = Image.new("RGB", (80, 40), (200, 100, 40))
    kept = torch.tensor([[True, False, False, True], [False, True, False, False]])
    out = overlay(image, kept, dim=0.5, outline=False)
    for (x, y), k in zip(_cell_centres(out.size, 2, 4), kept.flatten().tolist()):
        assert out.getpixel((x, y)) == ((200, 100, 40) if k else (100, 50, 20))
    with pytest.raises(ValueError, match="dim"):
        overlay(image, kept, dim=1.5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_show_marks_exactly_the_kept_tokens(family):
    vlm = tiny(family)
    image = dummy_image(140, 112, seed=3)
    picture = show(vlm.model, vlm.processor, image, "What is in the image ?", "random", keep=0.25, dim=1.0)
    # the same prefill, recorded independently
    prompt = vlm.prompt()
    inputs = dict(vlm.processor(images=[image], text=[prompt], return_tensors="pt"))
    with tokenzip.apply(vlm.model, "random", 0.25) as patch, torch.no_grad():
        vlm.model(**inputs)
        item = patch.stats.last.samples[0].items[0]
    view, (rows, cols) = model_view(image, vlm.model, inputs)
    assert picture.size == view.size
    mask = kept_grid(item.kept_indices, rows, cols).flatten().tolist()
    assert sum(mask) == item.kept == round(0.25 * rows * cols)
    for (x, y), k in zip(_cell_centres(view.size, rows, cols), mask):
        assert picture.getpixel((x, y)) == (view.getpixel((x, y)) if k else (0, 0, 0))


def test_show_cli_writes_the_labelled_figure(tmp_path):
    source = tmp_path / "in.png"
    dummy_image(112, 112).save(source)
    out = tmp_path / "kept.png"
    args = ["show", "--image", str(source), "--policy", "pool", "--keep", "0.25", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "answer (pool, keep=0.25): " in result.output and "16 of 64 visual tokens" in result.output
    assert Image.open(out).width >= MIN_FIGURE_WIDTH  # the 112 px overlay, scaled up with title and legend
    result = CliRunner().invoke(app, [*args[:-2], "--model", "tiny-llava_onevision", "--stages", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*args[:-2], "--policy", "nonsense", "--out", str(out)])
    assert result.exit_code != 0 and "nonsense" in result.output


def test_figure_is_the_overlay_scaled_with_labels(tmp_path):
    """`figure` keeps the overlay's pixels (nearest-neighbour scaling) inside a frame of title, labels and legend."""
    vlm = tiny("llava")
    image = dummy_image(112, 112)
    with tokenzip.apply(vlm.model, "random", 0.25) as patch, torch.no_grad():
        vlm.model(**_image_inputs(vlm, image))
        record = patch.stats.last
    item = record.samples[0].items[0]
    plain = draw_item(vlm.model, item, image, dim=1.0)
    labelled = figure(vlm.model, record, image, dim=1.0, subtitle="Q: ? A: !")
    assert labelled.width >= MIN_FIGURE_WIDTH and labelled.height > labelled.width * plain.height / plain.width / 2
    assert panel_labels(vlm.model, item) == ["image"]
    dark = np.asarray(plain).sum(-1) == 0  # dropped cells (dim 1: black)
    dark_share = (np.asarray(labelled).sum(-1) == 0).mean()
    assert 0 < dark_share < dark.mean()  # the black cells are there, on a larger canvas with white margins


def _record(vlm, inputs, policy, keep, **options):
    with tokenzip.apply(vlm.model, policy, keep, **options) as patch, torch.no_grad():
        vlm.model(**inputs)
    return patch.stats.last.samples[0].items[0]


def _image_inputs(vlm, image):
    return dict(vlm.processor(images=[image], text=[vlm.prompt()], return_tensors="pt"))


def _check_panels(picture, grid, state, top=0, dim_black=True):
    """Every cell centre of every panel: the view's pixel where kept, black where dropped (dim=1)."""
    x = 0
    for panel in grid:
        rows, cols = panel.cells.shape
        for (cx, cy), index in zip(_cell_centres(panel.image.size, rows, cols), panel.cells.flatten().tolist()):
            got = picture.getpixel((x + cx, top + cy))
            if state[index] == KEPT:
                assert got == panel.image.getpixel((cx, cy))
            else:
                assert got == (0, 0, 0)
        x += panel.image.width + GAP
    assert x - GAP == picture.width


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next"])
def test_anyres_image_draws_the_base_grid_then_the_tiles(family):
    vlm = tiny(family)
    image = dummy_image(160, 112, seed=3)
    item = _record(vlm, _image_inputs(vlm, image), "random", 0.25)
    picture = draw_item(vlm.model, item, image, dim=1.0)
    grid = panels(vlm.model, item, [image])
    base, tiles = item.shape.parts
    assert [p.cells.shape for p in grid] == [(base.rows, base.cols), (tiles.rows, tiles.cols)]
    assert tiles.rows > base.rows and tiles.newline_per_row  # the high-resolution grid, newlines not drawn
    state, _ = cell_states(item, item.kept_indices)
    drawn = torch.cat([p.cells.flatten() for p in grid])
    assert int((state[drawn] == KEPT).sum()) == item.kept
    _check_panels(picture, grid, state)


# Qwen3-VL lays a video out as one item per temporal patch (time-stamped blocks): each is drawn as one image
@pytest.mark.parametrize("family", [f for f in VIDEO_FAMILIES if f != "qwen3_vl"])
def test_video_is_a_strip_of_frames(family):
    vlm = tiny(family)
    inputs = video_inputs(vlm, frames=4)
    qwen = "qwen2" in family  # Qwen2-VL / Qwen2.5-VL: 2 frames per temporal patch
    item = _record(vlm, inputs, "random", 0.25)
    frames = [dummy_image(96, 96, seed=s) for s in range(4)]
    grid = panels(vlm.model, item, frames)
    part = item.shape.parts[0]
    assert len(grid) == part.frames == (2 if qwen else 4)
    if qwen:  # temporal patch t shows frame 2t
        assert list(grid[1].image.getdata())[:5] == list(frames[2].resize(grid[1].image.size, 3).getdata())[:5]
    picture = draw_item(vlm.model, item, frames, dim=1.0)
    state, _ = cell_states(item, item.kept_indices)
    _check_panels(picture, grid, state)


def test_pooled_groups_are_tinted_in_one_colour_each():
    vlm = tiny("llava")
    image = dummy_image(112, 112, seed=1)
    item = _record(vlm, _image_inputs(vlm, image), "pool", 0.25)
    state, group = cell_states(item, item.kept_indices)
    rows, cols = item.shape.parts[0].rows, item.shape.parts[0].cols
    assert int((state == KEPT).sum()) == rows * cols // 4 and int((state == MERGED).sum()) == rows * cols * 3 // 4
    blocks = group.view(rows // 2, 2, cols // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    assert (blocks == blocks[:, :1]).all() and blocks[:, 0].unique().numel() == rows * cols // 4  # 2x2 windows
    picture = draw_item(vlm.model, item, image, dim=1.0)
    (panel,) = panels(vlm.model, item, [image])
    colours = {}
    for (cx, cy), index in zip(_cell_centres(panel.image.size, rows, cols), panel.cells.flatten().tolist()):
        view, got = panel.image.getpixel((cx, cy)), picture.getpixel((cx, cy))
        # got = TINT * colour + (1 - TINT) * view: solve for the colour, the same for every cell of a group
        colour = tuple(round((g - (1 - TINT) * v) / TINT) for g, v in zip(got, view))
        colours.setdefault(int(group[index]), []).append(colour)
    for members in colours.values():
        assert all(max(abs(a - b) for a, b in zip(c, members[0])) <= 3 for c in members)
    firsts = [members[0] for members in colours.values()]
    assert len({tuple(c // 16 for c in colour) for colour in firsts}) > 1  # groups differ in colour


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_visiondrop_records_every_merge_before_the_llm(family):
    vlm = tiny(family)
    item = _record(vlm, _image_inputs(vlm, dummy_image(112, 112, seed=2)), "visiondrop", 0.25)
    members, reps = item.groups
    kept = set(item.kept_indices.tolist())
    assert members.numel() > 0 and set(reps.tolist()) <= kept and not set(members.tolist()) & kept
    content = set(torch.nonzero(item.shape.content_mask()).flatten().tolist())
    assert kept | set(members.tolist()) >= content  # a VisionDrop stage drops nothing: it keeps or merges


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_mustdrop_groups_are_its_3x3_windows(family):
    """LLaVA: merged in the tower, the window's first cell carries it; elsewhere before the LLM, its centre."""
    vlm = tiny(family)
    item = _record(vlm, _image_inputs(vlm, dummy_image(168, 168, seed=2)), "mustdrop", 0.25, merge_thr=1e-6)
    members, reps = item.groups
    part = item.shape.parts[0]
    assert members.numel() > 0
    for rep in reps.unique().tolist():
        cells = torch.cat([members[reps == rep], torch.tensor([rep])]) - part.offset
        r, c = cells // part.cols, cells % part.cols
        assert cells.numel() == 9 and r.max() - r.min() == 2 and c.max() - c.min() == 2
        offset = 0 if family == "llava" else part.cols + 1
        assert part.offset + r.min() * part.cols + c.min() + offset == rep


def test_stages_give_one_row_per_pruning_layer():
    vlm = tiny("llava")
    image = dummy_image(112, 112, seed=4)
    item = _record(vlm, _image_inputs(vlm, image), "fastv", 0.5)
    names = [name for name, _ in item.stages]
    assert names[0] == "LLM input" and len(names) == 2 and names[1].startswith("layer ")
    full, pruned = (indices for _, indices in item.stages)
    assert full.numel() == item.content and set(pruned.tolist()) < set(full.tolist())
    picture = draw_item(vlm.model, item, image, dim=1.0, stages=True)
    grid = panels(vlm.model, item, [image])
    height = grid[0].image.height
    assert picture.height == 2 * height + GAP
    strip = picture.crop((picture.width - grid[0].image.width, height + GAP, picture.width, picture.height))
    _check_panels(strip, grid, cell_states(item, pruned)[0])
