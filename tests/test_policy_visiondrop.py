"""VisionDrop: the contextual merge and the schedule against the spec's reference, and model-level behaviour.

The reference below is written from the spec's pseudo-code (§7) with plain loops; the library's merge is
vectorised. Model-level checks use the tiny offline models and the test's own hooks.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import forward_with_hooks, get_tiny, image_inputs
from test_positions import record_rope_rows

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.contexts import ProjectorInputContext
from tokenzip.policies.visiondrop import (
    VisionDropPolicy,
    default_boundaries,
    merge_contextual,
    stage_split,
    visiondrop_schedule,
)
from tokenzip.reference import cached_greedy


def reference_merge(x: torch.Tensor, metric: torch.Tensor, dominant: list[int], c: int):
    """§7 merge_contextual, one token at a time."""
    n = x.shape[0]
    dom = sorted(dominant)
    rest = [i for i in range(n) if i not in set(dom)]
    if c <= 0 or not rest:
        return dom, x[dom]
    step = max(1, len(rest) // c)
    targets = rest[0::step][:c]
    others = [i for i in rest if i not in set(targets)]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    members: dict[int, list[int]] = {t: [] for t in range(len(targets))}
    for o in others:
        sims = [float(unit[o] @ unit[t]) for t in targets]
        best = max(range(len(targets)), key=lambda t: (sims[t], -t))
        members[best].append(o)
    ctx = [x[t] + (x[members[k]].mean(0) if members[k] else 0) for k, t in enumerate(targets)]
    return dom + targets, torch.cat([x[dom], torch.stack(ctx)])


@pytest.mark.parametrize(("n", "d", "c"), [(577, 42, 6), (577, 84, 12), (96, 61, 9), (48, 30, 5), (48, 47, 1)])
def test_merge_matches_the_reference(n, d, c):
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 16, generator=g, dtype=torch.float64)
        metric = torch.randn(n, 8, generator=g, dtype=torch.float64)
        dominant = torch.randperm(n, generator=g)[:d]
        reps, values = merge_contextual(x, metric, dominant, c)
        want_reps, want_values = reference_merge(x, metric, dominant.tolist(), c)
        assert reps.tolist() == want_reps
        torch.testing.assert_close(values, want_values, atol=1e-12, rtol=0)


def test_targets_are_evenly_spaced_through_the_rest():
    n, dominant = 577, torch.arange(42)  # R = 535, c = 6 -> step 89
    reps, _ = merge_contextual(torch.zeros(n, 2), torch.randn(n, 3), dominant, 6)
    rest = list(range(42, 577))
    assert reps[42:].tolist() == [rest[i] for i in (0, 89, 178, 267, 356, 445)]


def test_ties_go_to_the_first_target_and_values_add_the_member_mean():
    x = torch.tensor([[1.0], [2.0], [4.0], [7.0], [9.0]])
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # dominant {4}; rest [0, 1, 2, 3], c = 2 -> step 2 -> targets 0 and 2, identical metric rows
    reps, values = merge_contextual(x, metric, torch.tensor([4]), 2)
    assert reps.tolist() == [4, 0, 2]
    assert values[:, 0].tolist() == [9.0, 1.0 + (2.0 + 7.0) / 2, 4.0]  # members 1 and 3 join target 0
    # target value 1 with members 2 and 4 -> 1 + 3 = 4 (target plus mean, not mean of all three)
    x2 = torch.tensor([[1.0], [2.0], [4.0]])
    reps, values = merge_contextual(x2, torch.ones(3, 2), torch.zeros(0, dtype=torch.long), 1)
    assert reps.tolist() == [0] and values[:, 0].tolist() == [4.0]


def test_fewer_remaining_tokens_than_contextual_slots():
    x = torch.randn(10, 4)
    reps, values = merge_contextual(x, torch.randn(10, 3), torch.arange(6), 6)  # R = 4 < c = 6
    assert reps.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and values.shape[0] == 10
    torch.testing.assert_close(values[6:], x[6:])


@pytest.mark.parametrize(
    ("target", "counts", "splits"),
    [
        (32, [48, 35, 26, 19], [(42, 6), (30, 5), (22, 4), (16, 3)]),  # the official default
        (64, [96, 70, 52, 38], [(84, 12), (61, 9), (45, 7), (33, 5)]),
        (128, [192, 141, 103, 76], [(168, 24), (123, 18), (90, 13), (66, 10)]),
        (192, [288, 211, 155, 114], [(252, 36), (184, 27), (135, 20), (99, 15)]),
    ],
)
def test_schedule_reproduces_the_spec_table(target, counts, splits):
    got = visiondrop_schedule(target, 577, 32, default_boundaries(32))
    assert got == counts
    assert [stage_split(n) for n in got] == splits
    assert sum(8 * n for n in got) / 32 == target


@pytest.mark.parametrize("layers", [28, 36])
def test_schedule_average_is_exact_for_other_depths(layers):
    bounds = default_boundaries(layers)
    assert bounds == ((7, 14, 21) if layers == 28 else (9, 18, 27))
    for target in (64, 128, 192):
        counts = visiondrop_schedule(target, 576, layers, bounds)
        edges = (0, *bounds, layers)
        average = sum((edges[k + 1] - edges[k]) * counts[k] for k in range(4)) / layers
        assert abs(average - target) <= 0.5 / ((layers - bounds[-1]) / layers)  # n_3 rounding only
        assert counts == sorted(counts, reverse=True) and counts[0] == round(1.5 * target)


def test_video_schedule_example():
    # 32 frames x 196 tokens, keep 0.111 -> 696; encoder factor 3.0 on a 28-layer LLM (spec §9.7)
    assert visiondrop_schedule(696, 6272, 28, (7, 14, 21), 3.0) == [2088, 528, 134, 34]
    assert math.isclose(sum(7 * n for n in [2088, 528, 134, 34]) / 28, 696)


def test_stage_one_on_llava_keeps_cls_first_and_dominant_in_order():
    policy = VisionDropPolicy()
    state = policy.plan(get_adapter(get_tiny("llava", "sdpa").model).info(), 0.5).state
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 65, 32, generator=g)
    cls = torch.rand(2, 65, generator=g)
    keys = torch.randn(2, 65, 16, generator=g)
    signals = {state.score.key: cls, state.metric.key: keys}
    ctx = ProjectorInputContext(hidden, signals, 0.5, [0, 1], True, state=state)
    for r, sel in enumerate(policy.select_projector_input(ctx)):
        count = visiondrop_schedule(32, 65, 24, default_boundaries(24))[0]
        d, c = stage_split(count)
        assert sel.keep.numel() == d + c == count
        assert sel.keep[0] == 0 and torch.equal(sel.values[0], hidden[r, 0])  # CLS first, unchanged
        dominant = sel.keep[:d]
        assert torch.equal(dominant, torch.sort(dominant).values)
        assert set(dominant[1:].tolist()) == set((torch.topk(cls[r, 1:], d - 1).indices + 1).tolist())


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


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_llava_layers_follow_the_schedule_with_cls_in_the_llm(keep):
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    text = inputs["input_ids"].shape[1] - 64
    counts = visiondrop_schedule(round(64 * keep), 65, 24, (6, 12, 18))
    seen_embeds: list[torch.Tensor] = []
    lm = get_adapter(vlm.model).lm
    with tokenzip.apply(vlm.model, "visiondrop", keep) as patch:
        handle = lm.layers[0].register_forward_pre_hook(lambda m, a, k: seen_embeds.append(a[0]), with_kwargs=True)
        lengths = measure(vlm, inputs)
        handle.remove()
        record = patch.stats.last
    assert lengths == [text + n for n in counts for _ in range(6)]
    assert record.samples[0].visual_per_layer == [n for n in counts for _ in range(6)]
    # the CLS token's projected feature-layer state is the first visual token in the LLM
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    captured = []
    tower = vlm.model.model.vision_tower
    h = tower.encoder.layers[2].register_forward_hook(
        lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        vlm.model.model.get_image_features(pixel_values=inputs["pixel_values"])
    h.remove()
    cls_embedding = vlm.model.model.multi_modal_projector(captured[0][:, :1])[0, 0]
    torch.testing.assert_close(seen_embeds[0][0, start], cls_embedding, atol=1e-5, rtol=1e-5)


def test_llava_positions_are_compact_in_every_block():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    layers = get_adapter(vlm.model).lm_layers
    positions: dict[int, list[torch.Tensor]] = {}
    with tokenzip.apply(vlm.model, "visiondrop", 0.25):
        handles = [
            layers[i].register_forward_pre_hook(
                lambda m, a, k, i=i: positions.setdefault(i, []).append(k["position_ids"].clone()), with_kwargs=True
            )
            for i in (0, 6, 12, 18)
        ]
        cached_greedy(vlm.model, inputs, 2)
        for h in handles:
            h.remove()
    for i in (0, 6, 12, 18):
        prefill = positions[i][0][0]
        assert torch.equal(prefill, torch.arange(prefill.numel()))  # 0..L'-1 in each block
        assert int(positions[i][1]) == prefill.numel()  # decode continues from that block's own length


def test_qwen_tokens_keep_their_targets_mrope_positions():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    inputs = image_inputs(vlm, 1)
    base = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 1))[0][:, 0]  # [3, L]
    with tokenzip.apply(vlm.model, "visiondrop", 0.5) as patch:
        rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 1))[0][:, 0]
        item = patch.stats.last.samples[0].items[0]
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    reps = item.kept_indices + start  # representatives in output order (dominant, then contextual targets)
    assert torch.equal(rows[:, start : start + reps.numel()], base[:, reps])
    assert torch.equal(rows[:, :start], base[:, :start])
    assert torch.equal(rows[:, start + reps.numel() :], base[:, start + 16 :])


# ------------------------------------------------------------------------------------------ options (r13), compat
@pytest.mark.parametrize(
    "options",
    [
        {"decay": float("nan")},
        {"decay": float("inf")},
        {"decay": 1.5},
        {"decay": 0},
        {"encoder_factor": float("nan")},
        {"encoder_factor": -1.0},
        {"ctx_div": 0},
        {"ctx_div": 2.0},
        {"boundaries": (2, 2, 4)},
        {"boundaries": (2, 4)},
        {"include_cls": 1},
        {"stage1_space": "clip"},
        {"score_dtype": "fp16"},
        {"compat": "paper"},
        {"include_cls": False, "stage1_space": "post_projector"},  # no CLS there: would be silently ignored
    ],
)
def test_bad_options_are_refused(options):
    with pytest.raises(tokenzip.errors.PolicyOptionError, match="visiondrop"):
        VisionDropPolicy(**options)


def test_include_cls_is_refused_on_families_without_cls():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    with pytest.raises(tokenzip.errors.PolicyOptionError, match="include_cls"):
        tokenzip.apply(vlm.model, "visiondrop", 0.5, include_cls=True)


@pytest.mark.parametrize(
    ("options", "cls", "score_dtype"),
    [
        ({}, True, "float32"),
        ({"compat": "official"}, True, "model"),
        ({"compat": "fixed"}, False, "float32"),
        ({"compat": "official", "score_dtype": "float32"}, True, "float32"),  # explicit options win
        ({"compat": "fixed", "include_cls": True}, True, "float32"),
    ],
)
def test_compat_sets_the_official_or_fixed_forms(options, cls, score_dtype):
    """compat="official": CLS in the LLM and half-precision scoring (the released code's fp16 cast); "fixed": no
    CLS (index 0 of the feature layer never selected), float32 scores."""
    policy = VisionDropPolicy(**options)
    state = policy.plan(get_adapter(get_tiny("llava", "sdpa").model).info(), 0.5).state
    assert state.score_dtype == score_dtype
    assert state.score.score_dtype == score_dtype  # the CLS-row signal the engine computes
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 65, 32, generator=g)
    scores = torch.rand(1, 65, generator=g)
    scores[0, 0] = 1.0  # CLS attends to itself most: a scored CLS would be dominant
    keys = torch.randn(1, 65, 16, generator=g)
    signals = {state.score.key: scores, state.metric.key: keys}
    ctx = ProjectorInputContext(hidden, signals, 0.5, [0], True, state=state)
    (sel,) = policy.select_projector_input(ctx)
    assert (0 in sel.keep.tolist()) == cls
    assert sel.keep.numel() == visiondrop_schedule(32, 64 + int(cls), 24, default_boundaries(24))[0]
