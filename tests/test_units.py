"""Pure functions: budgets, deterministic top-k, pooling shapes, item geometry, layouts, masks, composition."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenzip.budget import geometric_schedule, item_budget, one_stage_llm_count, validate_keep
from tokenzip.contexts import Selection
from tokenzip.engine.compose import compose_prompt, compose_slots
from tokenzip.engine.layout import Layout, compact_positions, take
from tokenzip.engine.masks import decode_mask, prefill_mask
from tokenzip.errors import BudgetError, UnsupportedInputError
from tokenzip.items import GridPart, ItemShape, VisualItem, locate_items
from tokenzip.ops.pool import pool_grid, pool_windows, pooled_grid_shape
from tokenzip.ops.topk import topk_keep_order, topk_stable
from tokenzip.policies.common import split_budget, structural_to_keep
from tokenzip.policies.fastv import fastv_count


# ------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    ("keep", "n", "want"),
    [
        (0.111, 576, 64),
        (0.222, 576, 128),
        (0.333, 576, 192),
        (0.11, 576, 63),
        (1e-9, 576, 1),
        (64, 576, 64),
        (576, 576, 576),
        (0.5, 5, 2),
        (0.5, 7, 4),
        (1.0, 9, 9),
    ],
)
def test_item_budget(keep, n, want):
    assert item_budget(validate_keep(keep), n) == want


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.0000001, float("nan"), float("inf"), True, "1", None, [0.5]])
def test_validate_keep_rejects(bad):
    with pytest.raises(BudgetError):
        validate_keep(bad)


def test_integer_and_float_one_differ():
    assert validate_keep(1) == 1 and isinstance(validate_keep(1), int)
    assert item_budget(validate_keep(1), 576) == 1 and item_budget(validate_keep(1.0), 576) == 576


def test_one_stage_layer_average_is_exact():
    n, layers, k = 576, 32, 2
    r = one_stage_llm_count(64, n, k, layers)
    assert math.isclose((k * n + (layers - k) * r) / layers, 64)
    assert fastv_count(64, n, k, layers) == round(r) == 30  # (32 * 64 - 2 * 576) / 30 = 29.87
    with pytest.raises(BudgetError, match="keep >="):
        fastv_count(30, n, k, layers)


# ------------------------------------------------------------------------------------------ top-k
def test_topk_ties_go_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, float("nan")])
    assert topk_stable(scores, 4).tolist() == [1, 2, 4, 3]
    assert topk_keep_order(scores, 2).tolist() == [1, 2]
    assert topk_stable(torch.zeros(5), 3).tolist() == [0, 1, 2]
    assert topk_stable(scores, 99).numel() == 6
    # float64 scores closer than float32 resolution are still ordered, not treated as ties
    assert topk_stable(torch.tensor([0.5, 0.500000001], dtype=torch.float64), 1).tolist() == [1]
    assert topk_stable(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), 2).tolist() == [1, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.integers(0, 45))
def test_topk_matches_a_python_reference(values, k):
    scores = torch.tensor(values, dtype=torch.float32)
    reference = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    assert topk_stable(scores, k).tolist() == reference
    assert topk_keep_order(scores, k).tolist() == sorted(reference)


# ------------------------------------------------------------------------------------------ pooling
@settings(max_examples=80, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 900))
def test_pooled_grid_shape_fits_the_budget(rows, cols, budget):
    r, c = pooled_grid_shape(rows, cols, budget)
    assert 1 <= r <= rows and 1 <= c <= cols
    assert r * c <= max(1, budget)
    if budget >= rows * cols:
        assert (r, c) == (rows, cols)


def test_pooled_grid_shape_examples():
    assert [pooled_grid_shape(24, 24, b) for b in (64, 128, 192, 23)] == [(8, 8), (8, 16), (12, 16), (4, 5)]
    assert pooled_grid_shape(1, 10, 3) == (1, 3)


def test_pool_grid_averages_each_window():
    tokens = torch.arange(16.0).view(16, 1).repeat(1, 3)
    pooled = pool_grid(tokens, 4, 4, 2, 2)
    assert pooled[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    windows = pool_windows(4, 4, 2, 2)
    assert windows == [(0, 2, 0, 2), (0, 2, 2, 4), (2, 4, 0, 2), (2, 4, 2, 4)]
    grid = tokens[:, 0].view(4, 4)
    for value, (r0, r1, c0, c1) in zip(pooled[:, 0].tolist(), pool_windows(4, 4, 2, 2), strict=True):
        assert value == grid[r0:r1, c0:c1].mean().item()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.lists(st.integers(1, 50), min_size=1, max_size=8))
def test_split_budget(total, sizes):
    shares = split_budget(total, sizes)
    assert sum(shares) == min(total, sum(sizes))
    assert all(0 <= s <= n for s, n in zip(shares, sizes, strict=True))
    if len(sizes) <= total < sum(sizes):
        assert all(s >= 1 for s in shares)


# ------------------------------------------------------------------------------------------ geometry
def anyres_shape() -> ItemShape:
    return ItemShape("image", (GridPart(0, 1, 2, 2), GridPart(4, 1, 2, 3, newline_per_row=True)))


def test_item_shape_masks_and_coords():
    shape = anyres_shape()
    assert shape.length == 4 + 2 * 4 and shape.n_content == 10
    assert shape.content_mask().tolist() == [True] * 4 + [True, True, True, False] * 2
    assert shape.row_index().tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert shape.coords()[7].tolist() == [-1, -1, -1, -1]
    assert shape.coords()[9].tolist() == [1, 0, 1, 1]
    video = ItemShape("video", (GridPart(0, 2, 2, 2),), trailing=1)
    assert video.content_mask().tolist() == [True] * 8 + [False]
    assert video.row_index().tolist()[-1] == -1


@pytest.mark.parametrize(("mode", "want"), [("keep", [7, 11]), ("drop", []), ("keep_nonempty_rows", [11])])
def test_structural_tokens_to_keep(mode, want):
    kept = torch.tensor([0, 9])  # a base cell and one cell of the second high-res row
    assert structural_to_keep(anyres_shape(), kept, mode).tolist() == want
    video = ItemShape("video", (GridPart(0, 2, 2, 2),), trailing=1)
    assert structural_to_keep(video, torch.tensor([0]), "drop").tolist() == [8]


def test_locate_items_assigns_runs_and_reports_mismatches():
    a, b = ItemShape("image", (GridPart(0, 1, 1, 2),)), ItemShape("image", (GridPart(0, 1, 1, 3),))
    ids = torch.tensor([[1, 9, 9, 2, 9, 9, 9], [0, 0, 0, 0, 0, 0, 3]])
    items = locate_items(ids, {"image": 9}, {"image": [a, b]})
    assert [(it.sample, it.start, it.length) for it in items.per_sample[0]] == [(0, 1, 2), (0, 4, 3)]
    assert items.per_sample[1] == []
    with pytest.raises(UnsupportedInputError, match="placeholder tokens"):
        locate_items(ids, {"image": 9}, {"image": [a]})
    with pytest.raises(UnsupportedInputError, match="contiguous"):
        locate_items(ids, {"image": 9}, {"image": [b, a]})


# ------------------------------------------------------------------------------------------ layouts and masks
def simple_layout(valid_rows: list[list[bool]], visual_rows: list[list[bool]]) -> Layout:
    valid = torch.tensor(valid_rows)
    b, n = valid.shape
    arange = torch.arange(n).expand(b, -1)
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    visual = torch.tensor(visual_rows) & valid
    item = torch.where(visual, 0, -1)
    return Layout(arange, arange, arange, valid, visual, item, pos.unsqueeze(0))


def test_take_repads_on_the_left_with_ragged_counts():
    layout = simple_layout([[True] * 5, [False, True, True, True, True]], [[False, True, True, True, False]] * 2)
    new, index = take(layout, [torch.tensor([0, 2, 4]), torch.tensor([1, 4])])
    assert new.valid.tolist() == [[True] * 3, [False, True, True]]
    assert index.tolist() == [[0, 2, 4], [0, 1, 4]]
    assert new.positions[0].tolist() == [[0, 2, 4], [0, 0, 3]]
    assert new.visual.tolist() == [[False, True, False], [False, True, False]]
    assert compact_positions(new, torch.tensor([0, 0]))[0].tolist() == [[0, 1, 2], [1, 0, 1]]


def test_prefill_masks_per_backend():
    valid = torch.tensor([[True, True, True], [False, True, True]])
    assert prefill_mask(torch.ones(2, 3, dtype=torch.bool), "sdpa", torch.float32) is None
    sdpa = prefill_mask(valid, "sdpa", torch.float32)
    assert sdpa.dtype == torch.bool and sdpa.shape == (2, 1, 3, 3)
    assert sdpa[1, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    eager = prefill_mask(valid, "eager", torch.float32)
    assert torch.equal(eager == 0, sdpa)
    assert torch.equal(prefill_mask(valid, "flash_attention_2", torch.float32), valid.long())


def test_decode_masks_per_backend():
    cached = torch.tensor([[True, True], [False, True]])
    tail = torch.ones(2, 2, dtype=torch.bool)
    mask = decode_mask(cached, tail, 1, "sdpa", torch.float32)
    assert mask[:, 0, 0].tolist() == [[True] * 4, [False, True, True, True]]
    two = decode_mask(cached, tail, 2, "eager", torch.float32)
    assert (two[1, 0] == 0).tolist() == [[False, True, True, False], [False, True, True, True]]
    assert decode_mask(torch.ones(2, 2, dtype=torch.bool), tail, 1, "sdpa", torch.float32) is None


def test_compose_prompt_keeps_text_and_orders_items():
    shape = ItemShape("image", (GridPart(0, 1, 2, 2),))
    item = VisualItem(shape, 0, 2, 0, 0)
    valid = torch.tensor([False, True, True, True, True, True, True, True])
    kept, overrides, _ = compose_prompt(valid, [item], [Selection(torch.tensor([3, 0]))])
    assert kept.tolist() == [1, 2, 5, 6, 7]
    values = torch.tensor([[1.0], [2.0]])
    kept, overrides, _ = compose_prompt(valid, [item], [Selection(torch.tensor([3, 0]), values, ordered=True)])
    assert kept.tolist() == [1, 5, 2, 6, 7]
    assert overrides[0][0] == 1 and overrides[0][1] == 2 and torch.equal(overrides[0][2], values)


def test_compose_slots_orders_and_validates():
    valid = torch.tensor([True] * 6)
    visual = torch.tensor([False, True, True, True, False, False])
    item = torch.where(visual, 0, -1)
    kept, values, where = compose_slots(valid, visual, item, Selection(torch.tensor([3, 1])))
    assert kept.tolist() == [0, 1, 3, 4, 5] and values is None
    vals = torch.tensor([[3.0], [1.0]])
    kept, values, where = compose_slots(valid, visual, item, Selection(torch.tensor([3, 1]), vals, ordered=True))
    assert kept.tolist() == [0, 3, 1, 4, 5]
    assert where.tolist() == [1, 2] and values[:, 0].tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="not real prunable tokens"):
        compose_slots(valid, visual, item, Selection(torch.tensor([0])))


# ------------------------------------------------------------------------------------------ geometric_schedule
@given(
    n=st.integers(2, 3000),
    share=st.floats(0.0, 1.0),
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=6),
    floor=st.integers(1, 8),
    spread=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_geometric_schedule_meets_the_layer_average_within_its_bounds(n, share, widths, floor, spread):
    """Counts never increase, stay in [floor, n], and the layer-weighted sum meets the goal within half a layer's
    token per stage wherever the bounds let it (between all-at-floor and all-at-n)."""
    floor = min(floor, n)
    layers = sum(widths)
    lowest = widths[0] * n + (layers - widths[0]) * floor
    goal = lowest + share * (n * layers - lowest)
    counts = geometric_schedule(goal, n, widths, floor=floor, spread=spread)
    assert len(counts) == len(widths) - 1
    assert all(floor <= c <= n for c in counts)
    assert all(b <= a for a, b in itertools.pairwise(counts))
    total = widths[0] * n + sum(w * c for w, c in zip(widths[1:], counts, strict=True))
    if spread:  # ATP's rule: the rest a bound stops the last count from absorbing goes to the earlier counts
        assert abs(total - goal) <= layers / 2 + 1e-6
    else:  # the last count absorbs the rounding unless a bound (the floor, the count before it) stops it
        previous = counts[-2] if len(counts) > 1 else n
        assert abs(total - goal) <= widths[-1] / 2 + 1e-6 or counts[-1] in (floor, previous)
