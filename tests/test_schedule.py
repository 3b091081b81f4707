"""The tokens reaching each decoder layer equal each policy's schedule, measured by the test's own hooks.

The hooks sit on every decoder layer's attention module (inside the layer, after tokenzip's layer pre-hooks)
and record the sequence length it processes; expected lengths are derived from the prompt, the item
geometry and each policy's public budget functions. KV-cache lengths are read from the returned cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import forward_with_hooks, get_tiny, image_inputs, video_inputs

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.budget import item_budget
from tokenzip.ops.pool import pooled_grid_shape
from tokenzip.policies.common import split_budget
from tokenzip.policies.fastv import fastv_count
from tokenzip.tiny import dummy_image

KEEPS = (0.5, 0.25, 0.11)


def measured_lengths(vlm, inputs) -> tuple[list[int], list[int]]:
    """(tokens processed by each decoder layer in prefill, KV entries each layer holds after prefill)."""
    seen: list[int] = []
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, k: seen.append(int(k["hidden_states"].shape[1])), with_kwargs=True
        )
        for layer in get_adapter(vlm.model).lm_layers
    ]
    out = forward_with_hooks(vlm.model, inputs, handles, use_cache=True)
    return seen, [int(layer.keys.shape[2]) for layer in out.past_key_values.layers]


def item_shapes(vlm, inputs):
    adapter = get_adapter(vlm.model)
    base = vlm.model.model
    if "pixel_values_videos" in inputs:
        modality, args = "video", {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw") if k in inputs}
        fn = base.get_video_features
    else:
        keys = ("pixel_values", "image_sizes", "batch_num_images", "image_grid_thw")
        modality, args = "image", {k: inputs[k] for k in keys if k in inputs}
        fn = base.get_image_features
    with torch.no_grad():
        out = fn(**args)
    return adapter.item_shapes(modality, args, out)


def pooled_tokens(shape, budget: int) -> int:
    units = [(part, f) for part in shape.parts for f in range(part.frames)]
    shares = split_budget(budget, [p.rows * p.cols for p, _ in units])
    total = shape.leading + shape.trailing
    for (part, _), share in zip(units, shares, strict=True):
        if share:
            r, c = pooled_grid_shape(part.rows, part.cols, share)
            total += r * c + (r if part.newline_per_row else 0)
    return total


def expected(case: str, keep, vlm, inputs) -> tuple[list[int], list[int]]:
    shapes = item_shapes(vlm, inputs)
    n_layers = len(get_adapter(vlm.model).lm_layers)
    full = int(inputs["input_ids"].shape[1])
    n_visual = sum(s.n_content for s in shapes)
    target = sum(item_budget(keep, s.n_content) for s in shapes)
    structural = sum(s.length - s.n_content for s in shapes)
    text = full - sum(s.length for s in shapes)
    if case in ("random", "random-vision"):
        n = text + structural + target
        return [n] * n_layers, [n] * n_layers
    if case == "pool":
        n = text + sum(pooled_tokens(s, item_budget(keep, s.n_content)) for s in shapes)
        return [n] * n_layers, [n] * n_layers
    if case in ("fastv", "random-llm"):
        kept = fastv_count(target, n_visual, 2, n_layers)
        lengths = [full] * 2 + [full - n_visual + kept] * (n_layers - 2)
        return lengths, lengths
    if case == "random-decode":
        return [full] * n_layers, [full] * 4 + [text + structural + target] * (n_layers - 4)
    raise ValueError(case)


CASES = {
    "random": {"newlines": "keep"},
    "pool": {},
    "fastv": {},
    "random-llm": {"stage": "llm"},
    "random-decode": {"stage": "decode", "layer": 4},
    "random-vision": {"stage": "vision", "layer": 1},
}


def schedule_cases():
    for family, kinds in (
        ("llava", ("image",)),
        ("qwen2_5_vl", ("image", "video")),
        ("llava_onevision", ("image", "video", "multi")),
        ("llava_next", ("image", "multi")),
    ):
        for kind in kinds:
            for case in CASES:
                if case == "random-vision" and family != "llava":
                    continue
                yield pytest.param(family, kind, case, id=f"{family}-{kind}-{case}")


def make_inputs(vlm, kind):
    if kind == "video":
        return video_inputs(vlm)
    if kind == "multi":  # one sample holding two images (OneVision does not tile them, LLaVA-NeXT does)
        return vlm.inputs([[dummy_image(56, 56, 1), dummy_image(70, 50, 2)]], [vlm.prompt("What", images=2)])
    return image_inputs(vlm, 1)


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize(("family", "kind", "case"), list(schedule_cases()))
def test_tokens_per_layer_follow_the_schedule(family, kind, case, keep):
    vlm = get_tiny(family, "sdpa")
    inputs = make_inputs(vlm, kind)
    want_processed, want_cached = expected(case, keep, vlm, inputs)
    with tokenzip.apply(vlm.model, case.split("-")[0], keep, **CASES[case]) as patch:
        processed, cached = measured_lengths(vlm, inputs)
        record = patch.stats.last
    assert processed == want_processed
    assert cached == want_cached
    sample = record.samples[0]
    assert sample.sequence_per_layer == processed
    assert sample.cache_per_layer == cached


def test_multi_image_sample_is_not_tiled():
    vlm = get_tiny("llava_onevision", "sdpa")
    inputs = make_inputs(vlm, "multi")
    shapes = item_shapes(vlm, inputs)
    assert [(len(s.parts), s.trailing) for s in shapes] == [(1, 1), (1, 1)]
    assert [s.length for s in shapes] == [17, 17]


@pytest.mark.parametrize("keep", [1, 3, 64])  # above 64: BudgetError (tests/test_budget_rule.py)
def test_integer_keep_counts_tokens_per_image(keep):
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 2)
    with tokenzip.apply(vlm.model, "random", keep) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        kept = [s.items[0].kept for s in patch.stats.last.samples]
    assert kept == [min(keep, 64)] * 2


def test_keep_rounding_to_zero_keeps_one_token():
    vlm = get_tiny("llava", "sdpa")
    with tokenzip.apply(vlm.model, "random", 1e-6) as patch:
        with torch.no_grad():
            vlm.model(**image_inputs(vlm, 1))
        assert patch.stats.last.samples[0].items[0].kept == 1
