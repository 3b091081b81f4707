"""Extreme-aspect images (r12): a 4000 x 1 px image gives LLaVA-OneVision and LLaVA-NeXT a tile grid with 0 rows (1 x
4000: 0 columns) that the unpatched model handles; every policy must handle it too, and `pool` must still meet its
budget.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import oracle_truth

import tokenzip
from tokenzip.budget import item_budget
from tokenzip.ops.pool import pool_grid, pooled_grid_shape
from tokenzip.tiny import dummy_image, tiny

# Qwen2.5-VL's processor refuses aspect ratios >= 200 (as for the unpatched model): its thinnest images are used
SIZES = {
    "llava": [(4000, 1), (1, 4000)],
    "llava_onevision": [(4000, 1), (1, 4000)],
    "llava_next": [(4000, 1), (1, 4000)],
    "qwen2_5_vl": [(2000, 12), (12, 2000)],
}
CASES = [(family, size) for family, sizes in SIZES.items() for size in sizes]


@functools.cache
def _model(family: str):
    return tiny(family, text_layers=8)


def test_degenerate_grid_shapes():
    assert pooled_grid_shape(1, 4000, 7) == (1, 7)
    assert pooled_grid_shape(4000, 1, 7) == (7, 1)
    assert pooled_grid_shape(2, 2000, 7) == (1, 7)  # no aspect-preserving grid: the most tokens within budget
    assert pooled_grid_shape(0, 4, 8) == (0, 0) and pooled_grid_shape(4, 0, 8) == (0, 0)
    assert pool_grid(torch.zeros(0, 3), 0, 4, 0, 0).shape == (0, 3)
    line = torch.arange(10.0)[:, None]
    torch.testing.assert_close(pool_grid(line, 1, 10, 1, 5)[:, 0], torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5]))


@pytest.mark.parametrize(("family", "size"), CASES)
def test_pool_meets_the_budget_on_thin_images(family, size):
    vlm = _model(family)
    inputs = vlm.inputs([dummy_image(*size)], vlm.prompt())
    with torch.no_grad():
        vlm.model(**inputs)  # the unpatched model handles it
        with tokenzip.apply(vlm.model, "pool", 0.5) as patch:
            vlm.model(**inputs)
    item = patch.stats.last.samples[0].items[0]
    assert item.kept == item_budget(0.5, item.content)  # thin grids pool along their length: exact budget


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next"])  # anyres: an empty high-resolution grid
@pytest.mark.parametrize("size", SIZES["llava_onevision"])
@pytest.mark.parametrize("policy", sorted(tokenzip.list_policies()))
def test_every_policy_runs_on_anyres_thin_images(policy, size, family):
    vlm = _model(family)
    inputs = vlm.inputs([dummy_image(*size)], vlm.prompt())
    with torch.no_grad(), tokenzip.apply(vlm.model, policy, 0.5) as patch, oracle_truth(policy, [1]):
        logits = vlm.model(**inputs).logits
    assert torch.isfinite(logits).all()
    sample = patch.stats.last.samples[0]
    assert sample.items[0].content == 16  # the 4 x 4 base grid; the tile grid is empty
    if policy != "none":
        assert sum(sample.visual_per_layer) < len(sample.visual_per_layer) * 16
