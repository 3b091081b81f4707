"""Exact kept counts of HiPrune, HoloV and VisionDrop at the spec's budgets on real-size grids.

LLaVA-1.5: a tiny model with a 336 px / 14 px tower (24 x 24 = 576 tokens, CLS included in the tower) and a
32-layer LLM, so the spec's worked numbers apply verbatim. Qwen2.5-VL: a hand-built 448 x 448 image (32 x 32
patches -> 16 x 16 = 256 merged tokens). LLaVA-OneVision: the policies' pre-LLM selection on the real 27 x 27
base grid and a packed high-resolution grid, with synthetic scores.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tokenzip
from tokenzip.contexts import PreLLMItem, VisionSignal
from tokenzip.items import GridPart, ItemShape, VisualItem
from tokenzip.policies.hiprune import HiPrunePolicy
from tokenzip.policies.holov import HoloVPolicy
from tokenzip.policies.visiondrop import VisionDropPolicy
from tokenzip.tiny import dummy_image, tiny_llava, tiny_qwen25vl

SPEC_KEEPS = {0.111: 64, 0.222: 128, 0.333: 192}
VISIONDROP_576 = {  # spec §9.7: per-stage counts, blocks of 8 layers of a 32-layer LLM
    0.111: [96, 70, 52, 38],
    0.222: [192, 141, 103, 76],
    0.333: [288, 211, 155, 114],
}


@functools.cache
def llava_576():
    vlm = tiny_llava(image_size=336, text_layers=32)
    inputs = vlm.inputs([dummy_image(336, 336, 5)], vlm.prompt("What is in the image ?"))
    return vlm, inputs


def run(vlm, inputs, policy, keep):
    with tokenzip.apply(vlm.model, policy, keep) as patch, torch.no_grad():
        vlm.model(**inputs)
        return patch.stats.last.samples[0]


@pytest.mark.parametrize("keep", list(SPEC_KEEPS))
def test_llava_576_counts(keep):
    vlm, inputs = llava_576()
    budget = SPEC_KEEPS[keep]
    for policy in ("hiprune", "holov"):
        sample = run(vlm, inputs, policy, keep)
        item = sample.items[0]
        assert item.content == 576
        assert item.kept + item.padded == budget  # HoloV's official shortfall pads with zero rows
        assert sample.visual_per_layer == [budget] * 32
    sample = run(vlm, inputs, "visiondrop", keep)
    assert sample.visual_per_layer == [n for n in VISIONDROP_576[keep] for _ in range(8)]
    assert sample.visual_mean == budget


def qwen_448_inputs(vlm):
    """A hand-built 448 x 448 image (the tiny processor caps images at 224 px): 32 x 32 patches, 256 tokens."""
    vcfg = vlm.model.config.vision_config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(32 * 32, 3 * vcfg.temporal_patch_size * 14 * 14, generator=g)
    prompt = vlm.prompt("What is in the image ?").replace("<|image_pad|>", "<|image_pad|>" * 256)
    enc = vlm.processor.tokenizer(prompt, return_tensors="pt")
    mm = (enc.input_ids == vlm.model.config.image_token_id).long()
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, 32, 32]]),
        "mm_token_type_ids": mm,
    }


def test_qwen_448_counts():
    vlm = tiny_qwen25vl(window_size=112)
    inputs = qwen_448_inputs(vlm)
    for policy in ("hiprune", "holov"):
        sample = run(vlm, inputs, policy, 0.111)
        assert sample.items[0].content == 256
        assert sample.items[0].kept == 28  # spec HiPrune §9.7: round(256 * 0.111) = 28, k_a = 1
        assert sample.items[0].padded == 0  # Qwen default = fixed: shortfall redistributed
    sample = run(vlm, inputs, "visiondrop", 0.111)
    assert sample.visual_per_layer[0] == 42  # stage 1 keeps round(1.5 * 28)
    with tokenzip.apply(vlm.model, "holov", 0.111, compat="official") as patch, torch.no_grad():
        vlm.model(**inputs)
        item = patch.stats.last.samples[0].items[0]
    assert item.kept + item.padded + int((item.kept_indices < 0).sum()) == 28 + 1  # int(256*0.111) + tail


def onevision_item(keep, rows_hr=54, cols_hr=48, seed=0) -> tuple[PreLLMItem, ItemShape]:
    base = GridPart(0, 1, 27, 27)
    high = GridPart(729, 1, rows_hr, cols_hr, newline_per_row=True)
    shape = ItemShape("image", (base, high))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape.length, generator=g)
    keys = torch.randn(shape.length, 8, generator=g)
    scores[~shape.content_mask()] = float("nan")
    signals = {}
    for layer in range(4):
        signals[VisionSignal("received", layer).key] = scores
        signals[VisionSignal("keys", layer).key] = keys
    embeds = torch.randn(shape.length, 16, generator=g)
    item = VisualItem(shape, 0, 10, 0, 0)
    return PreLLMItem(item, embeds, torch.arange(shape.length), keep, signals), shape


def ov_info():
    from conftest import get_tiny

    from tokenzip.adapters import get_adapter

    return get_adapter(get_tiny("llava_onevision", "sdpa").model).info()


@pytest.mark.parametrize("keep", [0.111, 0.222, 0.333])
def test_onevision_anyres_counts(keep):
    ctx, shape = onevision_item(keep)
    n = shape.n_content  # 729 + 54 * 48
    budget = round(keep * n)
    policy = HiPrunePolicy()
    ctx.state = policy.plan(ov_info(), keep).state
    sel = policy.select_pre_llm(ctx)
    k_base = round(budget * 729 / n)
    assert int((sel.keep < 729).sum()) == k_base
    assert int(shape.content_mask()[sel.keep].sum()) == budget
    assert not bool(shape.newline_mask()[sel.keep].any())  # newlines dropped by default
    holov = HoloVPolicy()
    ctx.state = holov.plan(ov_info(), keep).state
    sel = holov.select_pre_llm(ctx)
    assert sel.keep.numel() == budget and sel.padding == 0
    visiondrop = VisionDropPolicy()
    ctx.state = visiondrop.plan(ov_info(), keep).state
    sel = visiondrop.select_pre_llm(ctx)
    assert sel.keep.numel() == round(1.5 * budget)
