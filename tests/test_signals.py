"""Attention signals recomputed from captured q/k equal eager attention weights; vision scores map onto items.

The reference is always the eager model's own attention probabilities (`output_attentions=True`, or the
weights eager attention computes, captured in the test), compared with rows recomputed from the inputs that
an sdpa model's attention modules receive (same weights: same seed).
"""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny, image_inputs, video_inputs

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.contexts import Plan, PreLLMItem, Selection, VisionSignal
from tokenzip.policies.base import Policy
from tokenzip.signals import (
    decoder_attention_received,
    decoder_attention_rows,
    encoder_attention_received,
    encoder_attention_rows,
    qwen_vision_attention_received,
)
from tokenzip.tiny import dummy_image

ATOL = 1e-5


def capture_inputs(module: torch.nn.Module, call):
    """Run `call()` and return the (args, kwargs) `module` received (first call)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
@pytest.mark.parametrize("layer", [0, 2])
def test_vit_rows_and_received_equal_eager(family, layer):
    eager, sdpa = get_tiny(family, "eager"), get_tiny(family, "sdpa")
    inputs = image_inputs(eager, 1)
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:
        pixels = pixels[0]
    with torch.no_grad():
        attn = eager.model.model.vision_tower(pixels, output_attentions=True).attentions[layer]  # [R, H, T, T]
    adapter = get_adapter(sdpa.model)
    module = adapter.vision_attention(layer)
    _, kwargs = capture_inputs(module, lambda: sdpa.model.model.vision_tower(pixels))
    hidden = kwargs["hidden_states"]
    received = encoder_attention_received(module, hidden, chunk=7)
    torch.testing.assert_close(received, attn.mean(1).mean(1), atol=ATOL, rtol=0)
    rows = encoder_attention_rows(module, hidden, slice(0, 3))
    torch.testing.assert_close(rows, attn[:, :, :3].mean(1), atol=ATOL, rtol=0)


def test_vit_received_respects_padding_mask():
    vlm = get_tiny("llava", "sdpa")
    module = get_adapter(vlm.model).vision_attention(0)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, module.embed_dim, generator=g)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    mask = torch.where(valid[:, None, None, :], 0.0, torch.finfo(torch.float32).min).expand(2, 1, 9, 9)
    out = encoder_attention_received(module, hidden, mask)
    alone = encoder_attention_received(module, hidden[1:, :6])
    torch.testing.assert_close(out[1, :6], alone[0], atol=1e-6, rtol=0)
    assert torch.all(out[1, 6:] == 0)


def _qwen_eager_weights(monkeypatch, model, inputs, block: int) -> torch.Tensor:
    """Per-segment eager attention weights of vision block `block`, as [N] mean received (tower order)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    captured: list[torch.Tensor] = []
    original = mq.eager_attention_forward
    target = model.model.visual.blocks[block].attn

    def spy(module, query, key, value, attention_mask, **kw):
        out, weights = original(module, query, key, value, attention_mask, **kw)
        if module is target:
            captured.append(weights)
        return out, weights

    monkeypatch.setattr(mq, "eager_attention_forward", spy)
    with torch.no_grad():
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    monkeypatch.undo()
    return torch.cat([w[0].mean(0).mean(0) for w in captured])


@pytest.mark.parametrize("block", [0, 1])  # 0 = windowed block, 1 = full-attention block
def test_qwen_vision_received_equals_eager(monkeypatch, block):
    eager, sdpa = get_tiny("qwen2_5_vl", "eager"), get_tiny("qwen2_5_vl", "sdpa")
    inputs = image_inputs(eager, 2)  # two images: segments must not mix
    reference = _qwen_eager_weights(monkeypatch, eager.model, inputs, block)
    module = get_adapter(sdpa.model).vision_attention(block)
    args, kwargs = capture_inputs(
        module, lambda: sdpa.model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    )
    ours = qwen_vision_attention_received(module, args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"], chunk=5)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "qwen3_vl"])
def test_decoder_rows_and_received_equal_eager(family):
    eager, sdpa = get_tiny(family, "eager"), get_tiny(family, "sdpa")
    inputs = image_inputs(eager, 2)  # left-padded batch: padding and GQA (4 query / 2 KV heads) exercised
    layer = 3
    with torch.no_grad():
        attn = eager.model(**inputs, output_attentions=True).attentions[layer]  # [B, H, L, L]
    module = get_adapter(sdpa.model).lm_layers[layer].self_attn
    _, kwargs = capture_inputs(module, lambda: sdpa.model(**inputs))
    rows = torch.tensor([-1, -7])  # query rows that are real tokens in both samples
    ours = decoder_attention_rows(
        module, kwargs["hidden_states"], kwargs["position_embeddings"], rows, kwargs.get("attention_mask")
    )
    torch.testing.assert_close(ours, attn[:, :, rows].mean(1), atol=ATOL, rtol=0)
    token_ids = [v for v in get_adapter(sdpa.model).token_ids.values()]
    query_mask = torch.isin(inputs["input_ids"], torch.tensor(token_ids))
    received = decoder_attention_received(
        module,
        kwargs["hidden_states"],
        kwargs["position_embeddings"],
        query_mask,
        kwargs.get("attention_mask"),
        chunk=9,
    )
    expected = (attn.mean(1) * query_mask[:, :, None]).sum(1) / query_mask.sum(1, keepdim=True)
    torch.testing.assert_close(received, expected, atol=ATOL, rtol=0)


def test_qwen_scores_come_back_in_raster_order():
    """Spec check (HiPrune §10.8): patch scores = raster index of their 2x2 unit, laid out in window order."""
    from transformers.vision_utils import get_vision_window_index

    vlm = get_tiny("qwen2_5_vl", "sdpa")
    adapter = get_adapter(vlm.model)
    vcfg = vlm.model.config.vision_config
    for (h, w), window_size, share in [((16, 24), 112, 0.833), ((8, 8), 112, 0.0)]:
        window_index, _ = get_vision_window_index(torch.tensor([[1, h, w]]), 2, window_size, 14)
        n = h * w // 4
        assert abs(float((window_index != torch.arange(n)).float().mean()) - share) < 1e-3
    h, w = 16, 24
    window_index, _ = get_vision_window_index(torch.tensor([[1, h, w]]), 2, vcfg.window_size, 14)
    unit_scores = window_index.float()  # window order: the raster index of each unit
    patch_scores = unit_scores.repeat_interleave(4)
    from tokenzip.items import GridPart, ItemShape

    shape = ItemShape("image", (GridPart(0, 1, h // 2, w // 2),), vision_rows=(0, h * w))
    mapped = adapter.vision_scores_to_items("image", patch_scores, [shape], {"image_grid_thw": [[1, h, w]]})
    assert torch.equal(mapped[0], torch.arange(h * w // 4).float())


def _projector_rows(vlm, call):
    seen = []
    handle = vlm.model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            out = call()
    finally:
        handle.remove()
    return seen[0], out


@pytest.mark.parametrize("kind", ["anyres", "multi", "video"])
def test_onevision_scores_follow_feature_packing(kind):
    """Mapping a per-tile score through the adapter equals the model's own packing of the features."""
    vlm = get_tiny("llava_onevision", "sdpa")
    adapter = get_adapter(vlm.model)
    base = vlm.model.model
    if kind == "video":
        inputs = video_inputs(vlm)
        rows, out = _projector_rows(vlm, lambda: base.get_video_features(inputs["pixel_values_videos"]))
        args = {"pixel_values_videos": inputs["pixel_values_videos"]}
        modality, packed = "video", [out.pooler_output[0]]
    else:
        images = [dummy_image(150, 90, 3)] if kind == "anyres" else [[dummy_image(56, 56, 1), dummy_image(70, 50, 2)]]
        inputs = vlm.inputs(images, vlm.prompt("What", images=1 if kind == "anyres" else 2))
        args = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
        rows, out = _projector_rows(vlm, lambda: base.get_image_features(**args))
        modality, packed = "image", list(out.pooler_output)
    shapes = adapter.item_shapes(modality, args, out)
    for channel in (0, 5):
        mapped = adapter.vision_scores_to_items(modality, rows[..., channel], shapes, args)
        for shape, vec, feats in zip(shapes, mapped, packed, strict=True):
            content = shape.content_mask()
            torch.testing.assert_close(vec[content], feats[content, channel].float(), atol=1e-6, rtol=0)
            assert torch.isnan(vec[~content]).all()
    if kind == "anyres":
        assert shapes[0].parts[1].newline_per_row and len(shapes[0].parts) == 2


class SignalProbe(Policy):
    """Test policy: records the vision signals the engine delivers, keeps everything."""

    name = "signal-probe"
    description = "test only"
    defaults = {}  # noqa: RUF012

    def __init__(self, layer: int, kinds: tuple[str, ...]):
        super().__init__()
        self.layer, self.kinds, self.seen = layer, kinds, []

    def plan(self, info, keep):
        return Plan(pre_llm=True, vision_signals=tuple(VisionSignal(k, self.layer) for k in self.kinds))

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        self.seen.append({k: v.clone() for k, v in ctx.signals.items()})
        return Selection(ctx.available)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl"])
def test_engine_delivers_vision_signals_inside_generate(family):
    vlm = get_tiny(family, "sdpa")
    clip = family in ("llava", "llava_next")  # CLIP towers have CLS
    kinds = ("received", "cls") if clip else ("received",)
    probe = SignalProbe(1, kinds)
    inputs = image_inputs(vlm, 2)
    with tokenzip.apply(vlm.model, probe, 0.5) as patch, torch.no_grad():
        vlm.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    probe = patch.policy  # apply works on its own copy of a Policy instance
    assert len(probe.seen) == 2  # one item per sample
    adapter = get_adapter(vlm.model)
    module = adapter.vision_attention(1)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        args, kwargs = capture_inputs(
            module, lambda: vlm.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        )
        raw = qwen_vision_attention_received(module, args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"])
        arguments = {"image_grid_thw": inputs["image_grid_thw"]}
    else:
        pixels = inputs["pixel_values"]
        feature_args = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in inputs}
        _, kwargs = capture_inputs(module, lambda: vlm.model.model.get_image_features(**feature_args))
        raw = encoder_attention_received(module, kwargs["hidden_states"])
        arguments = feature_args
        del pixels
    with torch.no_grad():
        out = vlm.model.model.get_image_features(**arguments) if family not in ("qwen2_5_vl", "qwen3_vl") else None
    shapes = (
        adapter.item_shapes("image", arguments, out)
        if out is not None
        else adapter.item_shapes("image", arguments, None)
    )
    expected = adapter.vision_scores_to_items("image", raw, shapes, arguments)
    for seen, exp in zip(probe.seen, expected, strict=True):
        got = seen[VisionSignal("received", 1).key]
        assert torch.equal(torch.isnan(got), torch.isnan(exp))
        torch.testing.assert_close(got[~torch.isnan(got)], exp[~torch.isnan(exp)], atol=1e-6, rtol=0)
        if clip:
            assert VisionSignal("cls", 1).key in seen
