"""HiPrune: the pure selection against the spec's reference (§7, §10 items 1-6) and model-level behaviour.

The reference below is written from the spec's pseudo-code (§7) with plain Python loops and sets; the library's
selection is vectorised. Model-level checks use the tiny offline models: the scores are recomputed here from
the eager models' own attention probabilities (`output_attentions`, or a spy on Qwen2.5-VL's eager attention),
never from tokenzip's signals, and the selection made inside `generate` must equal the reference applied to
them, with the spec's budget split per selection unit.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_identity_and_restore, get_tiny, image_inputs, single_inputs, video_inputs
from test_positions import record_positions, record_rope_rows

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.adapters.base import ModelInfo
from tokenzip.errors import PolicyOptionError
from tokenzip.policies.hiprune import default_layers, grid_neighbours, hiprune_select
from tokenzip.reference import cached_greedy, greedy_tokens, uncached_logits

MODES = [("flat", "minus_one"), ("grid", "mask"), ("flat", "mask"), ("grid", "minus_one")]
OFFICIAL, FIXED = MODES[0], MODES[1]


# --------------------------------------------------------------------------------------------------------------
# The spec's §7 reference, one element at a time


def ref_topk(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, ties to the lower index, in descending-value order."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[: max(0, k)]


def ref_neighbours(a: int, n: int, g: int, mode: str) -> set[int]:
    if mode == "flat":  # flat-index arithmetic, clamped
        return {min(max(a + d, 0), n - 1) for d in (0, -1, 1, -g, g)}
    out = {a}
    if a % g != 0:
        out.add(a - 1)
    if a % g != g - 1 and a + 1 < n:
        out.add(a + 1)
    if a - g >= 0:
        out.add(a - g)
    if a + g < n:
        out.add(a + g)
    return out


def ref_parts(s_obj, s_deep, k: int, alpha: float, g: int, neighbors: str, exclude: str):
    """(anchors, candidates, registers, kept) of the §7 pseudo-code (k_r < 0: the K best candidates by s_obj)."""
    obj, deep = [float(v) for v in s_obj], [float(v) for v in s_deep]
    n = len(obj)
    anchors = ref_topk(obj, round(k * alpha / 5))
    cand: set[int] = set()
    for a in anchors:
        cand |= ref_neighbours(a, n, g, neighbors)
    k_r = k - len(cand)
    if k_r < 0:
        best = ref_topk([obj[i] if i in cand else -math.inf for i in range(n)], k)
        return anchors, cand, [], sorted(best)
    for c in cand:
        deep[c] = deep[c] - 1.0 if exclude == "minus_one" else -math.inf
    registers = ref_topk(deep, k_r)
    return anchors, cand, registers, sorted(cand | set(registers))


def reference_select(s_obj, s_deep, k, alpha, g, neighbors="flat", exclude="minus_one") -> list[int]:
    return ref_parts(s_obj, s_deep, k, alpha, g, neighbors, exclude)[3]


def select(s_obj, s_deep, k, alpha, g, mode) -> list[int]:
    return hiprune_select(s_obj, s_deep, k, alpha, g, *mode).tolist()


# --------------------------------------------------------------------------------------------------------------
# Pure function (spec §10 items 1-6)


def test_selection_equals_the_reference_on_300_seeded_pairs():
    """§10.1: N = 576, g = 24, K in {25, 64, 75, 128, 192}, alpha in {0.1, 0.5}, every neighbour/exclusion mode."""
    budgets = (25, 64, 75, 128, 192)
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        s_obj, s_deep = torch.rand(576, generator=g), torch.rand(576, generator=g)
        k, alpha = budgets[seed % 5], (0.1, 0.5)[(seed // 5) % 2]
        for mode in MODES:
            assert select(s_obj, s_deep, k, alpha, 24, mode) == reference_select(s_obj, s_deep, k, alpha, 24, *mode), (
                seed,
                mode,
            )


@pytest.mark.parametrize(("rows", "cols"), [(8, 12), (12, 8), (27, 27), (5, 7), (1, 9), (9, 1)])
def test_selection_equals_the_reference_on_other_grids(rows, cols):
    """Qwen-like merged grids and degenerate widths: the neighbours use the grid's own width and size."""
    n = rows * cols
    for seed in range(25):
        g = torch.Generator().manual_seed(1000 + seed)
        s_obj, s_deep = torch.rand(n, generator=g), torch.rand(n, generator=g)
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        alpha = (0.1, 0.5, 1.0, 2.5)[seed % 4]
        for mode in MODES:
            assert select(s_obj, s_deep, k, alpha, cols, mode) == reference_select(s_obj, s_deep, k, alpha, cols, *mode)


def _anchor_probe(n: int = 576, g: int = 24):
    """Scores whose anchors are recognisable: s_obj peaks at SPOTS (descending), s_deep is 0 on the spots and
    their neighbours (so registers never pick them) and in [0.1, 1) elsewhere."""
    spots = [100, 200, 300, 400, 500]
    gen = torch.Generator().manual_seed(7)
    s_obj = torch.rand(n, generator=gen) * 0.5
    s_deep = 0.1 + 0.9 * torch.rand(n, generator=gen)
    for rank, p in enumerate(spots):
        s_obj[p] = 0.99 - 0.01 * rank
        s_deep[[p, p - 1, p + 1, p - g, p + g]] = 0.0
    return spots, s_obj, s_deep


@pytest.mark.parametrize(("k", "anchors"), [(25, 0), (75, 2), (64, 1), (128, 3), (192, 4)])
@pytest.mark.parametrize("mode", [OFFICIAL, FIXED])
def test_anchor_count_uses_python_round(k, anchors, mode):
    """§10.2: k_a = round(K * 0.1 / 5), ties to even: 0.5 -> 0 (K = 25), 1.5 -> 2 (K = 75), 1.28 -> 1, ..."""
    spots, s_obj, s_deep = _anchor_probe()
    kept = set(select(s_obj, s_deep, k, 0.1, 24, mode))
    assert len(kept) == k
    assert [p in kept for p in spots] == [i < anchors for i in range(5)]
    for p in spots[:anchors]:  # every anchor comes with its four buffers
        assert {p - 1, p + 1, p - 24, p + 24} <= kept
    if anchors == 0:  # no anchors: plain top-K of the deep scores
        assert sorted(kept) == sorted(torch.topk(s_deep, k).indices.tolist())


NEIGHBOUR_CASES = [
    (0, {0, 1, 24}, {0, 1, 24}),
    (23, {0, 22, 23, 24, 47}, {22, 23, 47}),
    (24, {0, 23, 24, 25, 48}, {0, 24, 25, 48}),
    (575, {551, 574, 575}, {551, 574, 575}),
]


@pytest.mark.parametrize(("anchor", "flat", "grid"), NEIGHBOUR_CASES)
def test_neighbour_cases(anchor, flat, grid):
    """§10.3 (N = 576, g = 24): flat-index buffers wrap rows and clamp to 0 / 575; grid buffers stay in the grid."""
    assert set(grid_neighbours(torch.tensor([anchor]), 576, 24, "flat").tolist()) == flat
    assert set(grid_neighbours(torch.tensor([anchor]), 576, 24, "grid").tolist()) == grid
    # through the selection: s_deep = index / N, so the registers are the highest non-candidate indices
    s_obj = torch.full((576,), 0.1)
    s_obj[anchor] = 0.9
    s_deep = torch.arange(576) / 576
    for mode, cand in ((OFFICIAL, flat), (FIXED, grid)):
        registers = [i for i in range(575, -1, -1) if i not in cand][: 64 - len(cand)]
        assert select(s_obj, s_deep, 64, 0.1, 24, mode) == sorted(cand | set(registers))


def test_ties_resolve_to_lower_indices():
    """§10.4: constant scores, K = 64, alpha = 0.1 -> anchor 0, candidates {0, 1, 24}, registers {2..23, 25..63}."""
    const = torch.full((576,), 0.25)
    for mode in MODES:
        assert select(const, const, 64, 0.1, 24, mode) == list(range(64))
    # the anchor really is index 0: with increasing deep scores the registers are the highest other indices
    rising = torch.arange(576) / 576
    want = {0, 1, 24} | set(range(576 - 61, 576))
    for mode in MODES:
        assert select(const, rising, 64, 0.1, 24, mode) == sorted(want)
    # registers among equal deep scores: the lowest free indices; anchor ties likewise
    s_obj = torch.zeros(576)
    s_obj[[300, 310]] = 1.0  # tie between two anchor candidates: 300 wins for k_a = 1
    s_deep = torch.zeros(576)
    s_deep[400:] = 0.5
    for mode in (OFFICIAL, FIXED):
        cand = {300, 299, 301, 276, 324}
        assert select(s_obj, s_deep, 64, 0.1, 24, mode) == sorted(cand | set(range(400, 459)))


def test_ties_on_quantised_scores_match_the_reference():
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        levels = (1, 2, 4, 16)[seed % 4]
        s_obj = (torch.rand(576, generator=gen) * levels).floor() / levels
        s_deep = (torch.rand(576, generator=gen) * levels).floor() / (levels + 1)
        for mode in MODES:
            for k, alpha in ((64, 0.5), (192, 0.1), (25, 0.5)):
                assert select(s_obj, s_deep, k, alpha, 24, mode) == reference_select(s_obj, s_deep, k, alpha, 24, *mode)


def test_invariants():
    """§10.5: exactly K unique indices, strictly ascending, every anchor kept, registers disjoint from candidates
    (mask always; minus_one for scores in [0, 1)); more candidates than K keeps the K best candidates by s_obj."""
    gen = torch.Generator().manual_seed(123)
    for trial in range(200):
        rows, cols = int(torch.randint(1, 30, (1,), generator=gen)), int(torch.randint(1, 30, (1,), generator=gen))
        n = rows * cols
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        alpha = (0.0, 0.1, 0.5, 1.0, 3.0, 10.0)[trial % 6]
        s_obj, s_deep = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
        for mode in MODES:
            kept = hiprune_select(s_obj, s_deep, k, alpha, cols, *mode)
            assert kept.dtype == torch.long and kept.numel() == k
            assert bool((kept[1:] > kept[:-1]).all()) and int(kept[0]) >= 0 and int(kept[-1]) < n
            anchors, cand, registers, _ = ref_parts(s_obj, s_deep, k, alpha, cols, *mode)
            kept_set = set(kept.tolist())
            if len(cand) <= k:
                assert set(anchors) <= kept_set and cand <= kept_set
                assert not cand & set(registers) and len(registers) == k - len(cand)
            else:  # the official code crashes here; tokenzip keeps the K best candidates by s_obj
                assert kept_set <= cand
                assert kept_set == set(ref_topk([float(s_obj[i]) if i in cand else -1.0 for i in range(n)], k))
        # sum-scaled scores (not in [0, 1)): masking still gives exactly K
        kept = hiprune_select(s_obj * n, s_deep * n, k, alpha, cols, "grid", "mask")
        assert kept.numel() == k


def test_candidates_beyond_the_budget():
    """k_r < 0 (alpha > 1 or tiny K): the K best candidates by object score, ascending."""
    s_obj = torch.zeros(576)
    s_obj[[100, 300]] = torch.tensor([0.9, 0.8])
    s_obj[[99, 101, 76, 124]] = torch.tensor([0.5, 0.4, 0.3, 0.2])
    s_deep = torch.rand(576, generator=torch.Generator().manual_seed(0))
    # K = 4, alpha = 2 -> k_a = round(1.6) = 2 anchors, 10 candidates > 4
    assert select(s_obj, s_deep, 4, 2.0, 24, OFFICIAL) == [99, 100, 101, 300]
    assert select(s_obj, s_deep, 2, 5.0, 24, FIXED) == [100, 300]  # k_a = 2 = K: the anchors alone


def test_qwen_sum_scale_caveat():
    """§10.6: with column-sum scores a candidate with s_deep = 5 is still 4 after "minus one": official mode
    re-selects it and keeps K - 1 unique tokens (as the reference's union does); fixed mode keeps exactly K."""
    rows, cols = 8, 12
    n, k, alpha = rows * cols, 32, 0.5  # k_a = round(3.2) = 3
    gen = torch.Generator().manual_seed(5)
    s_obj = torch.rand(n, generator=gen) * 3
    s_deep = torch.rand(n, generator=gen)  # sum-scaled: mean ~ 1, but all non-candidates in [0, 1)
    _anchors, cand, _, _ = ref_parts(s_obj, s_deep, k, alpha, cols, *OFFICIAL)
    hot = sorted(cand)[0]
    s_deep[hot] = 5.0
    official = select(s_obj, s_deep, k, alpha, cols, OFFICIAL)
    assert official == reference_select(s_obj, s_deep, k, alpha, cols, *OFFICIAL)
    assert len(official) == k - 1 and hot in official
    fixed = select(s_obj, s_deep, k, alpha, cols, FIXED)
    assert fixed == reference_select(s_obj, s_deep, k, alpha, cols, *FIXED)
    assert len(fixed) == k


def _info(family, n_vision, feature, full=()):
    return ModelInfo(
        family, 24, n_vision, feature, family == "llava", "sdpa", family != "qwen2_5_vl", True, False, full
    )


def test_default_layers_match_the_spec():
    """§9.2: CLIP 24 layers -> (8, 22); Qwen2.5-VL 32 blocks -> (15, 31); SigLIP 26 layers -> (9, 25)."""
    assert default_layers(_info("llava", 24, 22)) == (8, 22)
    assert default_layers(_info("qwen2_5_vl", 32, 31, (7, 15, 23, 31))) == (15, 31)
    assert default_layers(_info("llava_onevision", 26, 25)) == (9, 25)


def test_options_are_validated():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    with pytest.raises(PolicyOptionError):
        tokenzip.apply(vlm.model, "hiprune", 0.5, alpha=-1)
    with pytest.raises(PolicyOptionError):
        tokenzip.apply(vlm.model, "hiprune", 0.5, compat="both")
    with pytest.raises(PolicyOptionError):
        tokenzip.apply(vlm.model, "hiprune", 0.5, object_layer=5)  # 4 vision blocks
    with pytest.warns(UserWarning, match="windowed"):
        tokenzip.apply(vlm.model, "hiprune", 0.5, object_layer=1).remove()  # block 0 is windowed


# --------------------------------------------------------------------------------------------------------------
# Model level: scores recomputed independently from the eager models' attention probabilities


def _spec_layers(vlm) -> tuple[int, int]:
    """(object, deep) layers from the spec's rules, read off the model config."""
    cfg = vlm.model.config
    if vlm.family == "qwen2_5_vl":
        full = list(cfg.vision_config.fullatt_block_indexes)
        return full[len(full) // 2 - 1], cfg.vision_config.depth - 1
    n = cfg.vision_config.num_hidden_layers
    feature = cfg.vision_feature_layer
    return round(n * 9 / 24) - 1, feature % (n + 1) - 1 if feature < 0 else feature


def _tower_scores(vlm, call, layers) -> tuple[object, dict[int, torch.Tensor]]:
    """Run `call()` (a feature function), capture the pixels the ViT got, recompute the ViT with
    output_attentions: per layer, the mean attention each token receives over heads and all queries [R, T]."""
    tower = vlm.model.model.vision_tower
    seen = []
    handle = tower.register_forward_pre_hook(
        lambda m, a, k: seen.append(a[0] if a else k["pixel_values"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = call()
    finally:
        handle.remove()
    with torch.no_grad():
        attentions = tower(seen[0], output_attentions=True).attentions
    return out, {layer: attentions[layer].mean(1).mean(1) for layer in layers}


def _qwen_scores(monkeypatch, vlm, pixels, grid_thw, layers, column_sum: bool) -> dict[int, list[torch.Tensor]]:
    """Per item, merged-token scores in raster order from the eager vision blocks' own attention weights:
    per segment (image / temporal slice), column mean (or sum) over queries of the head mean, 4 -> 1 mean,
    then raster order via argsort of the model's window index."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq
    from transformers.vision_utils import get_vision_window_index

    visual = vlm.model.model.visual
    targets = {id(visual.blocks[layer].attn): layer for layer in layers}
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    original = mq.eager_attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        out, weights = original(module, query, key, value, attention_mask, **kw)
        if id(module) in targets:
            captured[targets[id(module)]].append(weights[0].mean(0))  # [T, T] one segment
        return out, weights

    monkeypatch.setattr(mq, "eager_attention_forward", spy)
    with torch.no_grad():
        visual(pixels, grid_thw=grid_thw)
    monkeypatch.undo()
    vcfg = vlm.model.config.vision_config
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    segment = 0
    for t, h, w in grid_thw.tolist():
        window_index, _ = get_vision_window_index(torch.tensor([[t, h, w]]), 2, vcfg.window_size, vcfg.patch_size)
        for layer in layers:
            cols = [
                captured[layer][segment + s].sum(0) if column_sum else captured[layer][segment + s].mean(0)
                for s in range(t)
            ]
            merged = torch.cat(cols).view(-1, 4).mean(1)  # window order
            out[layer].append(merged[torch.argsort(window_index)])
        segment += t
    return out


def _unit_cells(shape) -> list[tuple[list[int], int]]:
    """(item-local indices, width) of every grid (part x frame) of an item, in sequence order."""
    units = []
    for part in shape.parts:
        width = part.cols + int(part.newline_per_row)
        for f in range(part.frames):
            base = part.offset + f * part.rows * width
            cells = [base + r * width + c for r in range(part.rows) for c in range(part.cols)]
            units.append((cells, part.cols))
    return units


def expected_kept(shape, s_obj, s_deep, keep, alpha, mode) -> tuple[list[int], list[int]]:
    """(kept item-local content indices, kept count per unit) from the spec: K = round(keep * N); video: K split
    evenly, the first K mod F frames one more; anyres: base round(K * N_base / N), the rest to the high-res grid."""
    units = _unit_cells(shape)
    sizes = [len(cells) for cells, _ in units]
    k = max(1, round(keep * sum(sizes)))
    if shape.modality == "video" or len(units) == 1:
        shares = [k // len(units) + (1 if i < k % len(units) else 0) for i in range(len(units))]
    else:
        assert len(units) == 2
        base = round(k * sizes[0] / sum(sizes))
        shares = [base, k - base]
    kept, counts = [], []
    for (cells, width), share in zip(units, shares, strict=True):
        local = reference_select(s_obj[cells], s_deep[cells], share, alpha, width, *mode) if share else []
        kept += [cells[i] for i in local]
        counts.append(len(local))
    return sorted(kept), counts


def _generate_record(vlm, inputs, keep, options):
    with tokenzip.apply(vlm.model, "hiprune", keep, **options) as patch:
        cached_greedy(vlm.model, inputs, 2)
        return patch.stats.history[0]


def _check_items(record, shapes_per_sample, scores_per_sample, keep, alpha, mode, structural=()):
    for sample, shapes, scores in zip(record.samples, shapes_per_sample, scores_per_sample, strict=True):
        assert len(sample.items) == len(shapes)
        for item, shape, (s_obj, s_deep) in zip(sample.items, shapes, scores, strict=True):
            want, counts = expected_kept(shape, s_obj, s_deep, keep, alpha, mode)
            got = item.kept_indices
            assert torch.equal(got, torch.sort(got).values)  # ascending: raster order in every grid
            content = shape.content_mask()[got]
            assert got[content].tolist() == want
            assert got[~content].tolist() == [shape.length - 1] * (shape.trailing > 0) + list(structural)
            assert item.kept == sum(counts)
            for (cells, _), count in zip(_unit_cells(shape), counts, strict=True):
                assert sum(int(i) in set(cells) for i in got) == count


@pytest.mark.parametrize(("options", "mode"), [({}, OFFICIAL), ({"compat": "fixed"}, FIXED)])
def test_llava_selection_in_generate_equals_the_reference(options, mode):
    vlm = get_tiny("llava", "eager")
    inputs = image_inputs(vlm, 2)
    obj, deep = _spec_layers(vlm)
    assert (obj, deep) == default_layers(get_adapter(vlm.model).info()) == (1, 2)
    keep, alpha = 0.4, 0.5  # K = round(25.6) = 26, k_a = round(2.6) = 3
    record = _generate_record(vlm, inputs, keep, {"alpha": alpha, **options})
    _, scores = _tower_scores(
        vlm, lambda: vlm.model.model.get_image_features(pixel_values=inputs["pixel_values"]), (obj, deep)
    )
    shapes = [[_llava_shape()] for _ in range(2)]
    per_sample = [[(scores[obj][b, 1:], scores[deep][b, 1:])] for b in range(2)]  # CLS key dropped
    _check_items(record, shapes, per_sample, keep, alpha, mode)
    assert [s.items[0].kept for s in record.samples] == [26, 26]


def _llava_shape():
    from tokenzip.items import GridPart, ItemShape

    return ItemShape("image", (GridPart(0, 1, 8, 8),))


@pytest.mark.parametrize(
    ("kind", "options", "mode", "column_sum"),
    [
        ("image", {}, FIXED, False),
        ("image", {"compat": "official"}, OFFICIAL, True),
        ("video", {}, FIXED, False),
        ("video", {"compat": "official"}, OFFICIAL, True),
    ],
)
def test_qwen_selection_in_generate_equals_the_reference(monkeypatch, kind, options, mode, column_sum):
    vlm = get_tiny("qwen2_5_vl", "eager")
    layers = _spec_layers(vlm)
    assert layers == default_layers(get_adapter(vlm.model).info())
    if kind == "image":
        inputs, grids, pixels = image_inputs(vlm, 2), "image_grid_thw", "pixel_values"
    else:
        inputs, grids, pixels = video_inputs(vlm), "video_grid_thw", "pixel_values_videos"
    keep, alpha = 0.4, 0.5
    record = _generate_record(vlm, inputs, keep, {"alpha": alpha, **options})
    scores = _qwen_scores(monkeypatch, vlm, inputs[pixels], inputs[grids], layers, column_sum)
    from tokenzip.items import GridPart, ItemShape

    shapes, per_sample = [], []
    for i, (t, h, w) in enumerate(inputs[grids].tolist()):
        shapes.append([ItemShape(kind, (GridPart(0, t, h // 2, w // 2),))])
        per_sample.append([(scores[layers[0]][i], scores[layers[1]][i])])
    _check_items(record, shapes, per_sample, keep, alpha, mode)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_onevision_selection_in_generate_equals_the_reference(kind):
    """Anyres: base and packed high-res grids selected separately (newlines dropped); video: per frame, the
    trailing newline kept. Scores are mapped through the adapter's packing (tested in test_signals)."""
    vlm = get_tiny("llava_onevision", "eager")
    adapter = get_adapter(vlm.model)
    layers = _spec_layers(vlm)
    assert layers == default_layers(adapter.info()) == (1, 3)
    base = vlm.model.model
    if kind == "image":
        inputs = image_inputs(vlm, 2)
        args = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
        out, scores = _tower_scores(vlm, lambda: base.get_image_features(**args), layers)
        keep, alpha = 0.4, 0.5
    else:
        inputs = video_inputs(vlm)
        args = {"pixel_values_videos": inputs["pixel_values_videos"]}
        out, scores = _tower_scores(vlm, lambda: base.get_video_features(**args), layers)
        keep, alpha = 0.4, 2.5  # 16 tokens -> K = 6 -> 2, 2, 1, 1 per 2x2 frame
    record = _generate_record(vlm, inputs, keep, {"alpha": alpha})
    shapes = adapter.item_shapes(kind, args, out)
    mapped = {layer: adapter.vision_scores_to_items(kind, scores[layer], shapes, args) for layer in layers}
    per_item = list(zip(mapped[layers[0]], mapped[layers[1]], strict=True))
    n = len(record.samples)
    assert len(shapes) == n
    if kind == "image":
        assert [len(s.parts) for s in shapes] == [2, 2] and all(s.parts[1].newline_per_row for s in shapes)
    else:
        assert shapes[0].parts[0].frames == 4 and shapes[0].trailing == 1
    _check_items(record, [[s] for s in shapes], [[p] for p in per_item], keep, alpha, FIXED)
    if kind == "video":
        assert expected_kept(shapes[0], *per_item[0], keep, alpha, FIXED)[1] == [2, 2, 1, 1]


def test_onevision_keep_nonempty_rows_keeps_newlines_of_rows_with_kept_tokens():
    vlm = get_tiny("llava_onevision", "sdpa")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "hiprune", 0.25, newlines="keep_nonempty_rows") as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        item = patch.stats.last.samples[0].items[0]
    with tokenzip.apply(vlm.model, "hiprune", 0.25) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        dropped = patch.stats.last.samples[0].items[0]
    kept = item.kept_indices.tolist()
    assert dropped.kept_indices.tolist() == [i for i in kept if i < 16 or (i - 16) % 9 != 8]  # same content
    hr_rows = {(i - 16) // 9 for i in kept if i >= 16 and (i - 16) % 9 != 8}
    assert {(i - 16) // 9 for i in kept if i >= 16 and (i - 16) % 9 == 8} == hr_rows


@pytest.mark.parametrize("keep", [0.111, 0.222, 0.333, 10])
def test_llava_budget_and_compact_positions(keep):
    """§10.9: keep -> round(keep * N) tokens (N = 64 here; 0.111 / 0.222 / 0.333 of 576 give 64 / 128 / 192) in the
    stats and at every decoder layer; positions 0..L'-1, decode continues from L'."""
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 2)
    k = keep if isinstance(keep, int) else round(keep * 64)
    assert [round(x * 576) for x in (0.111, 0.222, 0.333)] == [64, 128, 192]
    text = inputs["attention_mask"].sum(1) - 64
    with tokenzip.apply(vlm.model, "hiprune", keep) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        record = patch.stats.last
        single = single_inputs(vlm, 0)
        layer0 = get_adapter(vlm.model).lm_layers[0]
        seen = record_positions(layer0, lambda: cached_greedy(vlm.model, single, 3))
    for b, sample in enumerate(record.samples):
        assert [it.kept for it in sample.items] == [k]
        assert sample.visual_per_layer == [k] * 24
        assert sample.sequence_per_layer == [int(text[b]) + k] * 24
    n = single["input_ids"].shape[1] - 64 + k
    assert torch.equal(seen[0][0], torch.arange(n))
    assert [int(p) for p in seen[1:]] == [n, n + 1]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl"])
def test_keep_one_is_identity_and_remove_restores(family):
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 2)
    compat = "fixed" if family == "llava" else "official"
    assert_identity_and_restore(vlm, inputs, "hiprune", compat=compat, alpha=0.5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl"])
@pytest.mark.parametrize("compat", ["official", "fixed"])
def test_sdpa_and_eager_select_the_same_tokens(family, compat):
    def kept(attn):
        vlm = get_tiny(family, attn)
        with tokenzip.apply(vlm.model, "hiprune", 0.3, compat=compat, alpha=0.5) as patch:
            with torch.no_grad():
                vlm.model(**image_inputs(vlm, 2))
            return [[it.kept_indices.tolist() for it in s.items] for s in patch.stats.last.samples]

    assert kept("sdpa") == kept("eager")


@pytest.mark.parametrize("compat", ["official", "fixed"])
def test_qwen_original_positions_and_cache_free_recompute(compat):
    """§10.10: kept tokens carry their own (t, h, w) rows, text keeps its positions, rope_deltas and decode
    positions equal the unpruned model's; cached greedy equals a cache-free recomputation with the same tokens."""
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    inputs = image_inputs(vlm, 2)
    base_rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 3))
    base_deltas = vlm.model.model.rope_deltas.clone()
    with tokenzip.apply(vlm.model, "hiprune", 0.3, compat=compat, alpha=0.5) as patch:
        rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 3))
        record = patch.stats.history[-1]
        deltas = vlm.model.model.rope_deltas.clone()
        tokens, logits = cached_greedy(vlm.model, inputs, 3)
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    assert torch.equal(deltas, base_deltas)
    full = base_rows[0]
    mask = inputs["attention_mask"].bool()
    image_token = vlm.model.config.image_token_id
    for b, sample in enumerate(record.samples):
        item = sample.items[0]
        assert item.kept == round(0.3 * item.content)
        start = int((inputs["input_ids"][b] == image_token).nonzero()[0])
        keep = mask[b].clone()
        keep[start : start + item.tokens] = False
        keep[start + item.kept_indices] = True
        expected = full[:, b, keep]
        got = rows[0][:, b]
        assert torch.equal(got[:, -expected.shape[1] :], expected)
        # the text after the image keeps its unpruned positions (a gap where pruned tokens were)
        after = full[:, b, start + item.tokens :]
        assert torch.equal(got[:, -after.shape[1] :], after)
    for step in (1, 2):
        assert torch.equal(rows[step], base_rows[step])
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy_tokens(vlm.model, reference), tokens)


@pytest.mark.parametrize(
    ("family", "compat"), [("llava", "official"), ("qwen2_5_vl", "official"), ("qwen2_5_vl", "fixed")]
)
def test_batch_equals_single_runs(family, compat):
    """§10.11: bs = 2 (different images; different sizes on Qwen) selects and generates as two bs = 1 runs."""
    vlm = get_tiny(family, "sdpa")
    with tokenzip.apply(vlm.model, "hiprune", 0.3, compat=compat, alpha=0.5) as patch:
        batch_tokens, _ = cached_greedy(vlm.model, image_inputs(vlm, 2), 3)
        batch_kept = [s.items[0].kept_indices for s in patch.stats.history[-1].samples]
        for index in range(2):
            tokens, _ = cached_greedy(vlm.model, single_inputs(vlm, index), 3)
            assert torch.equal(patch.stats.history[-1].samples[0].items[0].kept_indices, batch_kept[index])
            assert torch.equal(batch_tokens[index], tokens[0])
