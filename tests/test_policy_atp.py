"""ATP-TF (training-free adaptation of ATP-LLaVA): scores, rules, spatial sampling, schedule, model behaviour.

There is no official code; the reference below is written from the spec's §5 pseudo-code with plain loops.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import forward_with_hooks, get_tiny, image_inputs, video_inputs

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.items import GridPart, ItemShape
from tokenzip.policies.atp import (
    ATPPolicy,
    adaptive_parameters,
    atp_schedule,
    atp_scores,
    atp_select,
    calibrate_gamma,
    clamp_count,
    default_prune_layers,
    mass_prefix,
    spatial_mask,
)
from tokenzip.reference import cached_greedy


def reference(rows, visual, text, spatial, schedule, count=None, mass=None, z_beta=None, n_min=1):
    """§5: scores, redundancy set, spatial set, union, clamp -- one token at a time."""
    n = len(visual)
    c = [sum(float(rows[t, j]) for t in text) / max(1, len(text)) for j in visual]
    s = []
    for j in visual:
        attenders = [i for i in visual if i >= j]
        s.append(sum(float(rows[i, j]) for i in attenders) / len(attenders))
    ss, cs = sum(s), sum(c)
    score = [0.5 * (s[k] / ss + c[k] / cs) for k in range(n)]
    order = sorted(range(n), key=lambda k: (-score[k], k))
    spa = [k for k in range(n) if spatial[k]]
    if schedule == "topk":
        red = [k for k in order if k not in spa][: max(0, count - len(spa))]
        lo = hi = count
    else:
        if mass is not None:
            acc, red = 0.0, []
            for k in order:
                red.append(k)
                acc += score[k]
                if acc >= mass - 1e-12:
                    break
        else:
            mean = 1.0 / n
            std = math.sqrt(sum((x - sum(score) / n) ** 2 for x in score) / n)
            red = [k for k in range(n) if score[k] >= mean + z_beta * std]
        lo, hi = min(n_min, n), n
    keep = set(red) | set(spa)
    if len(keep) < lo:
        for k in order:
            if len(keep) >= lo:
                break
            keep.add(k)
    while len(keep) > hi:
        non_spatial = [k for k in keep if k not in spa]
        pool = non_spatial or list(keep)
        keep.remove(min(pool, key=lambda k: (score[k], -k)))
    return sorted(keep)


def random_rows(n_visual: int, n_text: int, seed: int):
    """A causal, row-stochastic attention matrix over [prefix 3, visual, text]."""
    g = torch.Generator().manual_seed(seed)
    length = 3 + n_visual + n_text
    logits = torch.randn(length, length, generator=g, dtype=torch.float64) * 2
    logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    rows = torch.softmax(logits, -1)
    return rows, torch.arange(3, 3 + n_visual), torch.arange(3 + n_visual, length)


@pytest.mark.parametrize("n", [576, 196, 48])
@pytest.mark.parametrize("n_text", [1, 20])
def test_select_matches_the_reference(n, n_text):
    side = math.isqrt(n) if math.isqrt(n) ** 2 == n else 8
    coords = torch.stack(
        [
            torch.zeros(n, dtype=torch.long),
            torch.zeros(n, dtype=torch.long),
            torch.arange(n) // side,
            torch.arange(n) % side,
        ],
        1,
    )
    for seed in range(6 if n == 576 else 12):
        rows, visual, text = random_rows(n, n_text, seed)
        scores = atp_scores(rows, visual, text)
        spatial = spatial_mask(coords, 1 / 16)
        for count in (1, n // 9, n // 3):
            got = atp_select(scores, spatial, count=count).tolist()
            assert got == reference(rows, visual.tolist(), text.tolist(), spatial.tolist(), "topk", count=count)
        for mass in (0.3, 0.9):
            got = atp_select(scores, spatial, mass=mass, n_min=2).tolist()
            want = reference(rows, visual.tolist(), text.tolist(), spatial.tolist(), "adaptive", mass=mass, n_min=2)
            assert got == want
        got = atp_select(scores, spatial, z_beta=0.5).tolist()
        assert got == reference(rows, visual.tolist(), text.tolist(), spatial.tolist(), "adaptive", z_beta=0.5)


def test_scores_by_hand():
    rows = torch.zeros(16, 16, dtype=torch.float64)
    # visual tokens at positions 10, 11, 12; text rows 13, 14
    rows[10, 10] = 0.6
    rows[11, 10], rows[11, 11] = 0.3, 0.4
    rows[12, 10], rows[12, 11], rows[12, 12] = 0.3, 0.2, 0.1
    rows[13, 10:13] = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    rows[14, 10:13] = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    scores = atp_scores(rows, torch.tensor([10, 11, 12]), torch.tensor([13, 14]))
    s = torch.tensor([(0.6 + 0.3 + 0.3) / 3, (0.4 + 0.2) / 2, 0.1], dtype=torch.float64)
    c = torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64)
    torch.testing.assert_close(scores, 0.5 * (s / s.sum() + c / c.sum()))
    assert abs(float(scores.sum()) - 1) < 1e-12


@pytest.mark.parametrize(("mass", "want"), [(0.5, [0]), (0.7, [0, 1]), (0.75, [0, 1]), (0.8, [0, 1, 2])])
def test_mass_rule_on_dyadic_scores(mass, want):
    assert sorted(mass_prefix(torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64), mass).tolist()) == want


def grid_coords(rows: int, cols: int) -> torch.Tensor:
    shape = ItemShape("image", (GridPart(0, 1, rows, cols),))
    return shape.coords()


def test_spatial_sampling_counts():
    coords = grid_coords(24, 24)
    picked = spatial_mask(coords, 1 / 16)
    assert int(picked.sum()) == 36
    assert set(coords[picked, 2].tolist()) == set(range(0, 24, 4)) == set(coords[picked, 3].tolist())
    assert int(spatial_mask(coords, 1 / 36).sum()) == 16
    assert int(spatial_mask(coords, 0.0).sum()) == 0
    assert int(spatial_mask(grid_coords(27, 27), 1 / 16).sum()) == 49
    assert int(spatial_mask(grid_coords(14, 14), 1 / 16).sum()) == 16


def test_clamp_adds_best_and_drops_worst_non_spatial_first():
    scores = torch.tensor([0.4, 0.1, 0.3, 0.05, 0.15])
    spatial = torch.tensor([False, True, False, True, False])
    keep = torch.tensor([False, True, False, False, False])
    assert clamp_count(keep, scores, spatial, 3, 5).nonzero().flatten().tolist() == [0, 1, 2]
    full = torch.ones(5, dtype=torch.bool)
    assert clamp_count(full, scores, spatial, 1, 3).nonzero().flatten().tolist() == [0, 1, 3]  # drops 4 then 2
    assert clamp_count(full, scores, spatial, 1, 1).nonzero().flatten().tolist() == [1]  # then lowest spatial


@pytest.mark.parametrize(
    ("layers", "n_layers", "target", "want"),
    [
        ((2, 8, 16), 32, 64, [46, 4, 1]),
        ((2, 8, 16), 32, 128, [214, 80, 30]),
        ((2, 8, 16), 32, 144, [241, 101, 42]),
        ((2, 8, 16), 32, 192, [305, 162, 86]),
        ((2, 7, 14), 28, 64, [9, 1, 1]),
        ((2, 7, 14), 28, 128, [204, 72, 26]),
        ((2, 7, 14), 28, 192, [300, 156, 81]),
    ],
)
def test_topk_schedule_reproduces_the_spec_table(layers, n_layers, target, want):
    assert atp_schedule(target, 576, layers, n_layers) == want
    assert default_prune_layers(32) == (2, 8, 16) and default_prune_layers(28) == (2, 7, 14)


def test_adaptive_parameters():
    masses, rates = adaptive_parameters(1.0, (0.9, 0.75, 0.55), (1 / 16, 1 / 36, 0.0))
    assert masses == [0.9, 0.75, 0.55] and rates == [1 / 16, 1 / 36, 0.0]
    masses, rates = adaptive_parameters(0.5, (0.9, 0.75, 0.55), (1 / 16, 1 / 36, 0.0))
    assert masses == pytest.approx([0.8, 0.5, 0.1]) and rates == pytest.approx([1 / 32, 1 / 72, 0.0])


def measure(vlm, inputs):
    seen: list[int] = []
    layers = get_adapter(vlm.model).lm_layers
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, k: seen.append(int(k["hidden_states"].shape[1])), with_kwargs=True
        )
        for layer in layers
    ]
    forward_with_hooks(vlm.model, inputs, handles)
    return seen


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl"])
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_per_layer_counts_follow_the_topk_schedule(family, keep):
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "atp", keep) as patch:
        lengths = measure(vlm, inputs)
        sample = patch.stats.last.samples[0]
    n = sample.visual_in
    layers = default_prune_layers(24)
    counts = atp_schedule(sum(round(keep * it.content) for it in sample.items), n, layers, 24)
    want = [n] * (layers[0] + 1) + [counts[0]] * (layers[1] - layers[0]) + [counts[1]] * (layers[2] - layers[1])
    want += [counts[2]] * (24 - 1 - layers[2])
    assert sample.visual_per_layer == want
    other = lengths[0] - n  # text and structural tokens are never pruned
    assert lengths == [other + v for v in want]


def test_structural_and_vision_markers_survive():
    ov = get_tiny("llava_onevision", "sdpa")
    inputs = video_inputs(ov)
    newline = ov.model.config.video_token_id
    with tokenzip.apply(ov.model, "atp", 0.25) as patch:
        lengths = measure(ov, inputs)
        sample = patch.stats.last.samples[0]
    assert lengths[-1] - sample.visual_per_layer[-1] == int((inputs["input_ids"] != newline).sum()) + 1
    qwen = get_tiny("qwen2_5_vl", "sdpa")
    inputs = image_inputs(qwen, 1)
    ids = inputs["input_ids"][0]
    start = int((ids == qwen.model.config.vision_start_token_id).nonzero()[0])
    end = int((ids == qwen.model.config.vision_end_token_id).nonzero()[0])
    with tokenzip.apply(qwen.model, "atp", 0.25) as patch, torch.no_grad():
        qwen.model(**inputs)
        decisions = patch._runtime.decisions.llm
    for rows in decisions.values():
        kept_slots = rows[0][0]
        assert not bool(((kept_slots == start) | (kept_slots == end)).any())  # only visual tokens are selected
    final = patch.stats.last.samples[0].sequence_per_layer[-1] - patch.stats.last.samples[0].visual_per_layer[-1]
    assert final == ids.numel() - 16  # every non-visual token (incl. vision start/end) is still there


def test_positions_are_original_in_every_layer():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    layers = get_adapter(vlm.model).lm_layers
    seen: dict[int, list[torch.Tensor]] = {}
    with tokenzip.apply(vlm.model, "atp", 0.25) as patch:
        hooks = [  # registered after tokenzip's own layer hooks, so they see what the layer receives
            layers[i].register_forward_pre_hook(
                lambda m, a, k, i=i: seen.setdefault(i, []).append(k["position_ids"].clone()), with_kwargs=True
            )
            for i in (0, 3, 23)
        ]
        cached_greedy(vlm.model, inputs, 3)
        kept_slots = patch._runtime.decisions.llm[3][0][0]
        for h in hooks:
            h.remove()
    length = inputs["input_ids"].shape[1]
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    prefill_3 = seen[3][0][0]
    visual_positions = prefill_3[(prefill_3 >= start) & (prefill_3 < start + 64)]
    assert torch.equal(visual_positions, kept_slots)  # LLM-input slots = original positions here (no pre-LLM)
    for i in (0, 3, 23):
        assert [int(p) for p in seen[i][1:]] == [length, length + 1]  # decode continues from L0 in every layer


def test_calibrated_gamma_meets_the_target_and_counts_grow_with_gamma():
    vlm = get_tiny("llava", "sdpa")
    calibration = [image_inputs(vlm, 1), image_inputs(vlm, 2)]

    def layer_average(gamma: float) -> float:
        values = []
        with tokenzip.apply(vlm.model, "atp", 0.25, schedule="adaptive", gamma=gamma) as patch, torch.no_grad():
            for inputs in calibration:
                vlm.model(**inputs)
                values += [s.visual_mean for s in patch.stats.last.samples]
        return sum(values) / len(values)

    averages = [layer_average(g) for g in (0.2, 0.5, 1.0, 2.0, 5.0)]
    assert averages == sorted(averages)
    target = 0.25 * 64
    gamma = calibrate_gamma(layer_average, target, steps=20)
    assert abs(layer_average(gamma) - target) <= 0.02 * target + 0.5  # +-2% up to count granularity
    with pytest.raises(tokenzip.PolicyOptionError, match="calibrated"):
        tokenzip.apply(vlm.model, "atp", 0.25, schedule="adaptive")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"p": ("a", "b", "c")}, "p="),  # r13: accepted before
        ({"p": (0.9, 0.75)}, "one value per pruning layer"),
        ({"spatial_rates": (0.1, float("nan"), 0.0)}, "spatial_rates="),
        ({"prune_layers": (8, 2, 16)}, "prune_layers="),
        ({"gamma": float("inf")}, "gamma="),
        ({"schedule": "thresholds"}, "schedule="),
        ({"n_min": 0}, "n_min="),
        ({"z_beta": 1.0}, "not used with schedule='topk'"),  # topk would ignore it
        ({"schedule": "adaptive", "gamma": 1.0, "rule": "z", "p": (0.8, 0.7, 0.5)}, "not used"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(tokenzip.PolicyOptionError, match=match):
        ATPPolicy(**options)
