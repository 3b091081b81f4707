"""training.attention_stats: tower attention mass on informative vs background patches (issue 20, item 3).

The recomputed attention is checked against references that do not share its code path: eager attention weights of
the CLIP / SigLIP towers (computed here, in the test only) and, for Qwen2.5-VL's windowed tower, a block-diagonal
masked attention that reproduces the block's own output. Geometry (Qwen's window order, OneVision's tiles) is
checked against pixels; area shares against `truth.coverage`.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from tokenzip.synthetic import sample
from tokenzip.synthetic.dataset import RENDER_SIDE
from tokenzip.synthetic.truth import coverage, needed_raster
from tokenzip.tiny import tiny
from training.attention_stats import (
    _Capture,
    measure,
    qwen_query_masses,
    qwen_tower_raster,
    sample_masses,
)

FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision")


@functools.cache
def small(family: str, attn: str = "sdpa"):
    """A tiny model with a 2-layer LLM (the tower is what is measured); same weights for every `attn`."""
    return tiny(family, attn=attn, text_layers=2)


def needing_sample(start: int = 0):
    """The first v2 test sample from `start` whose question needs some content (a non-empty truth raster)."""
    i = start
    while needed_raster(sample("test", i, version="v2")).sum() == 0:
        i += 1
    return sample("test", i, version="v2")


def _pixel_values(vlm, item, **kw) -> dict:
    prompt = vlm.prompt(item.question.text)
    return dict(vlm.processor(images=[item.image(RENDER_SIDE)], text=[prompt], return_tensors="pt", **kw))


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_vit_masses_match_eager_attention_weights(family):
    """Per query, informative / background / CLS-key mass equal those of the eager tower's attention weights."""
    vlm, eager = small(family), small(family, "eager")
    item = needing_sample()
    views, layers = sample_masses(vlm.model, vlm.processor, item)
    pixels = _pixel_values(vlm, item)["pixel_values"]
    pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # OneVision: [1, tiles, 3, s, s] -> rows
    with torch.no_grad():
        weights = eager.model.model.vision_tower(pixels, output_attentions=True).attentions
    assert len(weights) == len(layers)
    rows = {"image": slice(None), "base": slice(0, 1), "tiles": slice(1, None)}
    offset = int(family == "llava")
    checked = 0
    for ref, per_view in zip(weights, layers):
        probs = ref.float().mean(1)  # [R, T, T], heads averaged
        for view, qm in per_view.items():
            p = probs[rows[view]]
            inf = views[view].float()
            expected = (p[..., offset:] @ inf[..., None])[..., 0]
            torch.testing.assert_close(qm.informative, expected, atol=1e-5, rtol=1e-4)
            if offset:
                torch.testing.assert_close(qm.cls_key, p[..., 0], atol=1e-5, rtol=1e-4)
            assert expected.abs().sum() > 0
            checked += 1
    assert checked == len(layers) * (2 if family == "llava_onevision" else 1)


def test_qwen_masses_match_the_windowed_blocks_own_attention():
    """A block-diagonal (per `cu_seqlens` segment) attention reproduces each block's output, and its head-mean
    probabilities give the same per-query masses as `qwen_query_masses`; windowed blocks have several segments."""
    vlm = small("qwen2_5_vl")
    visual = vlm.model.model.visual
    item = needing_sample()
    inputs = _pixel_values(vlm, item)
    attns = [blk.attn for blk in visual.blocks]
    capture = _Capture(attns)
    outputs = {}
    handles = [a.register_forward_hook(lambda m, a_, o, i=i: outputs.__setitem__(i, o)) for i, a in enumerate(attns)]
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        capture.remove()
        for h in handles:
            h.remove()
    grid = tuple(int(x) for x in inputs["image_grid_thw"][0])
    inf = (coverage(needed_raster(item), 1, grid[1], grid[2]) > 0)[qwen_tower_raster(grid, visual.config)]
    full = set(visual.config.fullatt_block_indexes)
    for layer, attn in enumerate(attns):
        hidden, kwargs = capture.inputs[layer]
        bounds = kwargs["cu_seqlens"]
        n = hidden.shape[0]
        segment = torch.bucketize(torch.arange(n), bounds[1:].long(), right=True)  # segment id of each token
        assert (len(torch.unique(segment)) == 1) == (layer in full)  # windows only in windowed blocks
        q, k, v = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3)  # [H, N, hd] each
        cos, sin = (x[:, None].float() for x in kwargs["position_embeddings"])  # [N, 1, hd]

        def rope(x, cos=cos, sin=sin):
            x = x.transpose(0, 1)  # [N, H, hd]
            half = x.shape[-1] // 2
            rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
            return (x * cos + rotated * sin).transpose(0, 1)

        logits = rope(q) @ rope(k).transpose(-1, -2) * attn.scaling
        logits = logits.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
        probs = torch.softmax(logits, -1)  # [H, N, N]
        out = attn.proj((probs @ v).transpose(0, 1).reshape(n, -1))
        torch.testing.assert_close(out, outputs[layer], atol=1e-5, rtol=1e-4)
        qm = qwen_query_masses(attn, hidden, inf, bounds, kwargs["position_embeddings"])
        torch.testing.assert_close(qm.informative, probs.mean(0) @ inf.float(), atol=1e-5, rtol=1e-4)
    assert full and len(full) < len(attns)


def test_qwen_tower_raster_matches_the_patches_the_tower_sees():
    """The tower's window-permuted input at position p is the patch embedding of raster patch qwen_tower_raster[p]
    cut straight from the image (no resize, no normalisation)."""
    vlm = small("qwen2_5_vl")
    visual = vlm.model.model.visual
    image = sample("test", 0, version="v2").image(224)
    prompt = vlm.prompt("What is in the image ?")
    inputs = vlm.processor(
        images=[image], text=[prompt], return_tensors="pt", do_resize=False, do_rescale=False, do_normalize=False
    )
    t, h, w = (int(x) for x in inputs["image_grid_thw"][0])
    assert (h, w) == (16, 16)
    p = visual.config.patch_size
    pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)  # [3, 224, 224]
    raster = pixels.unfold(1, p, p).unfold(2, p, p).permute(1, 2, 0, 3, 4).reshape(h * w, 3, 1, p, p)
    raster = raster.expand(-1, -1, visual.config.temporal_patch_size, -1, -1).reshape(h * w, -1)
    seen = {}
    handle = visual.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            expected = visual.patch_embed(raster)[qwen_tower_raster((t, h, w), visual.config)]
    finally:
        handle.remove()
    torch.testing.assert_close(seen["x"], expected)
    assert not torch.equal(qwen_tower_raster((t, h, w), visual.config), torch.arange(h * w))  # really permuted


def test_onevision_tiles_are_the_quadrants_in_raster_order():
    """OneVision's tower rows are the base image, then the 2 x 2 tiles row by row: the tile boxes the statistics
    pool the truth raster onto."""
    vlm = small("llava_onevision")
    side = vlm.model.config.vision_config.image_size
    image = sample("test", 0, version="v2").image(2 * side)  # exactly the 2 x 2 pinpoint: tiles are crops
    prompt = vlm.prompt("What is in the image ?")
    pixels = vlm.processor(images=[image], text=[prompt], return_tensors="pt", do_rescale=False, do_normalize=False)[
        "pixel_values"
    ][0]
    assert pixels.shape[0] == 5
    full = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)
    for k in range(4):
        r, c = divmod(k, 2)
        torch.testing.assert_close(pixels[1 + k].float(), full[:, r * side : (r + 1) * side, c * side : (c + 1) * side])


def _uniform(model, family: str):
    """A copy of `model` whose tower attends uniformly (zero query and key projections: all logits 0)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        if family == "qwen2_5_vl":
            for blk in model.model.visual.blocks:
                d = blk.attn.dim
                blk.attn.qkv.weight[: 2 * d] = 0
                blk.attn.qkv.bias[: 2 * d] = 0
        else:
            for layer in model.model.vision_tower.encoder.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    lin.weight.zero_()
                    lin.bias.zero_()
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_attention_gives_ratio_one(family):
    """Attention no more concentrated than area reads as ratio 1 in every layer and view (windowed blocks too);
    the trained-like random tower does not."""
    vlm = small(family)
    rows = measure(_uniform(vlm.model, family), vlm.processor, n=4, version="v2")
    assert rows and all(r.area > 0 for r in rows)
    for r in rows:
        assert r.query_ratio == pytest.approx(1.0, abs=1e-5)
        if family == "llava":
            n_patches = (vlm.model.config.vision_config.image_size // vlm.model.config.vision_config.patch_size) ** 2
            assert r.cls_ratio == pytest.approx(1.0, abs=1e-5)
            assert r.cls_sink == pytest.approx(1 / (n_patches + 1), abs=1e-6)
            assert r.cls_mass == pytest.approx(r.area * n_patches / (n_patches + 1), abs=1e-6)
        else:
            assert r.cls_ratio is None
            assert r.query_mass == pytest.approx(r.area, abs=1e-6)
    real = measure(vlm.model, vlm.processor, n=2, version="v2")
    assert max(abs(r.query_ratio - 1) for r in real) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_masses_are_probabilities_that_sum_to_one(family):
    """Per query: every mass in [0, 1] and informative + background + CLS key = 1."""
    vlm = small(family)
    _, layers = sample_masses(vlm.model, vlm.processor, needing_sample())
    for per_view in layers:
        for qm in per_view.values():
            for x in (qm.informative, qm.background, qm.cls_key, qm.concentration):
                assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
            torch.testing.assert_close(qm.informative + qm.background + qm.cls_key, torch.ones_like(qm.informative))
            assert qm.informative.sum() > 0
            if family == "llava":
                assert qm.cls_key.min() > 0
            else:
                assert torch.equal(qm.cls_key, torch.zeros_like(qm.cls_key))


@pytest.mark.parametrize("family", FAMILIES)
def test_area_share_equals_truth_coverage(family):
    """The reported informative area share is the share of patch cells with truth.coverage > 0, per view."""
    vlm = small(family)
    n = 4
    rows = measure(vlm.model, vlm.processor, n=n, version="v2")
    vcfg = vlm.model.config.vision_config
    expected: dict[str, float] = {}
    for i in range(n):
        truth = needed_raster(sample("test", i, version="v2"))
        if family == "qwen2_5_vl":
            g = 16  # the tiny processor's 224 px maximum -> 16 x 16 patches
            shares = {"image": (coverage(truth, 1, g, g) > 0).float().mean()}
        else:
            g = vcfg.image_size // vcfg.patch_size
            base = (coverage(truth, 1, g, g) > 0).float().mean()
            shares = {"image": base} if family == "llava" else {"base": base}
            if family == "llava_onevision":
                half = truth.shape[1] // 2
                quads = [truth[:, r * half : (r + 1) * half, c * half : (c + 1) * half] for r in (0, 1) for c in (0, 1)]
                shares["tiles"] = torch.stack([(coverage(q, 1, g, g) > 0).float().mean() for q in quads]).mean()
        for view, s in shares.items():
            expected[view] = expected.get(view, 0.0) + float(s) / n
    assert {r.view for r in rows} == set(expected)
    for r in rows:
        assert r.area == pytest.approx(expected[r.view], abs=1e-9)
    assert all(v > 0 for v in expected.values())


def test_bad_version_and_n_are_named():
    from tokenzip.errors import UnsupportedInputError

    vlm = small("llava")
    with pytest.raises(UnsupportedInputError, match=r"v3.*v1"):
        measure(vlm.model, vlm.processor, n=1, version="v3")
    with pytest.raises(UnsupportedInputError, match="n=0"):
        measure(vlm.model, vlm.processor, n=0)
