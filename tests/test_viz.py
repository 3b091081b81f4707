"""Kept-token overlays: the drawn cells are exactly the tokens that entered the LLM."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tokenzip
from tokenzip.cli import app
from tokenzip.testing.tiny import dummy_image, tiny
from tokenzip.viz import kept_grid, model_view, overlay, show


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


def test_show_cli_writes_the_overlay(tmp_path):
    source = tmp_path / "in.png"
    dummy_image(112, 112).save(source)
    out = tmp_path / "kept.png"
    args = ["show", "--image", str(source), "--policy", "pool", "--keep", "0.25", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (112, 112)
    result = CliRunner().invoke(app, [*args[:-2], "--model", "tiny-llava_onevision", "-o", str(out)])
    assert result.exit_code != 0 and "llava_onevision" in result.output
