"""The budget rule: every policy meets the layer-averaged budget within one token per item, or refuses.

For each registered policy (the oracle reads a box as its ground truth, `conftest.oracle_truth`), on tiny models of the
three families with 8 and 32 decoder layers, with 1 and with 16 images per prompt, at keep 0.111 / 0.222 / 0.333 and an
int keep: the measured layer-averaged visual tokens of each sample (`SampleRecord.visual_mean`) equal the sum of
`item_budget` over its items within one token per item, or `BudgetError` names a reachable keep -- and that keep then
runs on budget. (`none` is asked to keep everything: its budget is every token.) Plus the pieces: `item_budget` refuses
an int keep above an item's token count, `smallest_keep`, ATP's schedule and HoliTom's inner count.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from conftest import oracle_truth

import tokenzip
from tokenzip.adapters.base import ModelInfo
from tokenzip.budget import infeasible_budget, item_budget, smallest_keep, validate_keep
from tokenzip.errors import BudgetError
from tokenzip.items import GridPart, ItemShape
from tokenzip.policies.atp import ATPPolicy, atp_floor, atp_schedule, default_prune_layers, stage_widths
from tokenzip.policies.pool import check_pool_budget, pooled_total
from tokenzip.tiny import dummy_image, tiny

POLICIES = tuple(tokenzip.list_policies())
KEEPS = (0.111, 0.222, 0.333, 3)
# small grids keep 16-image prompts fast: LLaVA 56 px / 14 px patches = 4x4 tokens, Qwen2.5-VL 112 px = 4x4
# after the 2x2 merger, OneVision 56 px tiles (anyres base + tiles for one image, base grids for several), LLaVA-NeXT
# 56 px tiles (a square image: base + 1 x 2 tiles, every image), Qwen3-VL 128 px (16 px patches)
IMAGE_SIZE = {"llava": 56, "qwen2_5_vl": 112, "llava_onevision": 56, "llava_next": 56, "qwen3_vl": 128}


@functools.cache
def model(family: str, depth: int):
    kwargs = {"image_size": 56} if family == "llava" else {}
    return tiny(family, text_layers=depth, **kwargs)


@functools.cache
def prompt(family: str, depth: int, images: int) -> dict:
    vlm = model(family, depth)
    side = IMAGE_SIZE[family]
    pictures = [dummy_image(side, side, seed=i) for i in range(images)]
    return vlm.inputs(pictures, vlm.prompt(images=images))


def prefill(vlm, inputs: dict, policy: str, keep):
    n_images = len(inputs.get("image_grid_thw", inputs.get("image_sizes", inputs["pixel_values"])))  # batch of one
    with torch.no_grad(), tokenzip.apply(vlm.model, policy, keep) as patch, oracle_truth(policy, [n_images]):
        vlm.model(**inputs)
        return patch.stats.last


def off_budget(record, policy: str, keep) -> list[str]:
    """Samples whose layer average misses the budget by more than one token per item."""
    asked = 1.0 if policy == "none" else validate_keep(keep)  # `none` is asked to keep everything
    misses = []
    for b, sample in enumerate(record.samples):
        budget = sum(item_budget(asked, it.content) for it in sample.items)
        if abs(sample.visual_mean - budget) > len(sample.items):
            misses.append(
                f"sample {b}: layer average {sample.visual_mean:.2f} vs budget {budget} ({len(sample.items)} items, "
                f"{sample.visual_in} tokens; per layer {sample.visual_per_layer})"
            )
    return misses


def named_keep(message: str, keep):
    """The reachable keep a `BudgetError` names: the int form for an int keep where one is given."""
    if isinstance(keep, int):
        found = re.search(r"int keep >= (\d+)", message) or re.search(r"reachable keep is (\d+) tokens", message)
        if found:
            return int(found.group(1))
    found = re.search(r"reachable keep is (\d+\.\d+)", message)
    assert found, f"the BudgetError names no reachable keep: {message}"
    return float(found.group(1))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("images", [1, 16])
@pytest.mark.parametrize("depth", [8, 32])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl"])
def test_on_budget_or_refused_with_a_reachable_keep(family, depth, images, policy):
    vlm, inputs = model(family, depth), prompt(family, depth, images)
    failures = []
    for keep in KEEPS:
        try:
            record = prefill(vlm, inputs, policy, keep)
        except BudgetError as error:
            reachable = named_keep(str(error), keep)
            try:
                record = prefill(vlm, inputs, policy, reachable)
            except BudgetError as again:
                failures.append(f"keep={keep}: named keep={reachable} is refused too: {again}")
                continue
            failures += [f"keep={keep} -> named keep={reachable}: {m}" for m in off_budget(record, policy, reachable)]
            continue
        failures += [f"keep={keep}: {m}" for m in off_budget(record, policy, keep)]
    assert not failures, f"{policy} on {family} L{depth} with {images} image(s):\n" + "\n".join(failures)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_int_keep_above_an_items_tokens_is_refused(policy):
    vlm, inputs = model("llava", 8), prompt("llava", 8, 1)
    with pytest.raises(BudgetError, match=r"only 16 visual tokens"):
        prefill(vlm, inputs, policy, 17)


# ------------------------------------------------------------------------------------------ the pieces
def test_item_budget_refuses_an_int_keep_above_the_items_tokens():
    assert item_budget(16, 16) == 16 and item_budget(1, 16) == 1 and item_budget(0.5, 16) == 8
    with pytest.raises(BudgetError, match=r"only 16 visual tokens.*int keep <= 16"):
        item_budget(17, 16)


@pytest.mark.parametrize(("floor", "sizes"), [(16.75, [64]), (18.875, [144]), (256.75, [64] * 16), (3.2, [4, 9, 7])])
def test_smallest_keep_is_the_first_that_reaches_the_floor(floor, sizes):
    fraction, tokens = smallest_keep(floor, sizes)
    budget = sum(item_budget(fraction, n) for n in sizes)
    assert budget >= floor > sum(item_budget(fraction - 1e-4, n) for n in sizes)
    assert float(f"{fraction:.4f}") == fraction
    assert tokens * len(sizes) >= floor > (tokens - 1) * len(sizes)
    message = str(infeasible_budget("x", "why", 0.1, 3, floor, sizes))
    assert named_keep(message, 0.1) == fraction and named_keep(message, 2) == tokens


@pytest.mark.parametrize("n_layers", [8, 12, 24, 28, 32])
@pytest.mark.parametrize("n_visual", [16, 64, 144, 576, 1024])
def test_atp_schedule_meets_every_reachable_budget_within_half_a_token(n_layers, n_visual):
    layers = default_prune_layers(n_layers)
    widths = stage_widths(layers, n_layers)
    floor = atp_floor(n_visual, layers, n_layers)
    for target in range(1, n_visual + 1):
        if target < floor - 0.5:
            continue
        counts = atp_schedule(target, n_visual, layers, n_layers)
        assert all(a >= b >= 1 for a, b in zip([n_visual, *counts], counts, strict=False)), counts
        average = (widths[0] * n_visual + sum(w * c for w, c in zip(widths[1:], counts, strict=True))) / n_layers
        assert abs(average - target) <= 0.5, (target, counts, average)


def test_atp_refuses_keep_below_its_floor_on_8_layers():
    """8 layers: prune layers 0 / 2 / 4, so layer 0 sees all 144 tokens: the floor is 151 / 8 = 18.9 > 16."""
    assert default_prune_layers(8) == (0, 2, 4) and atp_floor(144, (0, 2, 4), 8) == 18.875
    info = ModelInfo("llava", 8, 24, 22, True, "sdpa", True, True, False)
    shape = ItemShape("image", (GridPart(0, 1, 12, 12),))
    with pytest.raises(BudgetError, match=r"18\.88 .*reachable keep is 0\.1285"):
        ATPPolicy().nominal(info, shape, 0.111)
    tokens = ATPPolicy().nominal(info, shape, 0.1285).tokens
    assert abs(sum(tokens) / 8 - 19) <= 0.5


def test_pool_names_the_nearest_reachable_keeps():
    """8x8 at keep 0.222: 14 asked, the aspect-preserving pooled grids hold 12 (3x4, also within one token of 13)
    or 15 (3x5)."""
    units = [(GridPart(0, 1, 8, 8), 0)]
    assert [pooled_total(units, t) for t in (12, 13, 14, 15, 16)] == [12, 12, 12, 15, 16]
    with pytest.raises(BudgetError, match=r"nearest reachable keep is 0\.1954 or 0\.2266"):
        check_pool_budget(0.222, 64, units, 14)
    assert item_budget(0.1954, 64) == 13 and item_budget(0.2266, 64) == 15 and item_budget(0.2265, 64) == 14
    with pytest.raises(BudgetError, match=r"nearest reachable keep is 13 tokens per item or 15 tokens per item"):
        check_pool_budget(14, 64, units, 14)
    check_pool_budget(0.25, 64, units, 16)  # reachable: no error
