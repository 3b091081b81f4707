"""`score_dtype` (HiPrune, HoloV, VisionDrop): "float32" scores equal float32 attention probabilities; "model"
reproduces the official half-precision scoring, i.e. equals the same averages taken over the attention weights an
eager fp16 / bf16 model returns (the reference below reads them with output_attentions, which only tests may use).
"""

from __future__ import annotations

import math

import pytest
import torch

import tokenzip
import tokenzip.adapters.base as adapters_base
import tokenzip.engine.llm_stage as llm_stage
from tokenzip.errors import PolicyOptionError
from tokenzip.policies.registry import get_policy_class
from tokenzip.signals.attention import decoder_attention_received, encoder_attention_received, encoder_attention_rows
from tokenzip.tiny import dummy_image, tiny_llava

LAYER = 3  # decoder layer scored (a VisionDrop stage boundary of an 8-layer LLM is 2, 4 or 6: any layer works)
VISION_LAYER = 2  # the tiny CLIP's feature layer (-2 of 4)


def _eager(dtype: torch.dtype):
    vlm = tiny_llava(attn="eager", text_layers=8, dtype=dtype)
    inputs = vlm.inputs([dummy_image()], vlm.prompt())
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return vlm, inputs


def _capture(module: torch.nn.Module, store: dict):
    def hook(mod, args, kwargs):
        store["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        store["kwargs"] = kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _decoder_case(dtype: torch.dtype):
    """(attention module, captured input, kwargs, visual query mask, eager weights [B, H, L, L] in `dtype`)."""
    vlm, inputs = _eager(dtype)
    attn = vlm.model.model.language_model.layers[LAYER].self_attn
    store: dict = {}
    handle = _capture(attn, store)
    try:
        with torch.no_grad():
            out = vlm.model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    visual = inputs["input_ids"] == vlm.model.config.image_token_id
    return attn, store, visual, out.attentions[LAYER]


def _reference_received(weights: torch.Tensor, visual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean over heads (in the weights' dtype), then over the visual query rows (rounded once to `dtype`)."""
    heads = weights.mean(1)  # [B, L, L], rounded to the weights' dtype
    return (heads.float() * visual[:, :, None]).sum(1).div(visual.sum(1, keepdim=True)).to(dtype).float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decoder_model_numerics_equal_the_half_precision_reference(dtype):
    attn, store, visual, weights = _decoder_case(dtype)
    kw = store["kwargs"]
    args = (attn, store["hidden"], kw["position_embeddings"], visual, kw.get("attention_mask"))
    model = decoder_attention_received(*args, score_dtype="model")
    fp32 = decoder_attention_received(*args, score_dtype="float32")
    reference = _reference_received(weights, visual, dtype)
    torch.testing.assert_close(model, reference, atol=1e-3, rtol=0)
    assert torch.equal(model.to(dtype).float(), model)  # values of the model dtype: half-precision ties survive
    assert not torch.equal(fp32.to(dtype).float(), fp32)  # float32 scores are not rounded (the modes differ)


def test_decoder_float32_equals_the_float32_reference():
    attn, store, visual, weights = _decoder_case(torch.float32)
    kw = store["kwargs"]
    args = (attn, store["hidden"], kw["position_embeddings"], visual, kw.get("attention_mask"))
    fp32 = decoder_attention_received(*args, score_dtype="float32")
    torch.testing.assert_close(fp32, _reference_received(weights, visual, torch.float32), atol=1e-6, rtol=0)
    assert torch.equal(decoder_attention_received(*args, score_dtype="model"), fp32)  # float32 model: same


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_encoder_scores_equal_the_eager_reference(dtype):
    vlm, inputs = _eager(dtype)
    tower = vlm.model.model.vision_tower
    attn = tower.encoder.layers[VISION_LAYER].self_attn
    store: dict = {}
    handle = _capture(attn, store)
    try:
        with torch.no_grad():
            weights = tower(inputs["pixel_values"], output_attentions=True).attentions[VISION_LAYER]
    finally:
        handle.remove()
    mode = "model" if dtype != torch.float32 else "float32"
    tol = 1e-3 if dtype != torch.float32 else 1e-6
    heads = weights.mean(1)  # [B, N, N] in the model dtype
    cls = encoder_attention_rows(attn, store["hidden"], slice(0, 1), score_dtype=mode)[:, 0]
    torch.testing.assert_close(cls, heads[:, 0].float(), atol=tol, rtol=0)
    received = encoder_attention_received(attn, store["hidden"], score_dtype=mode)
    torch.testing.assert_close(received, heads.float().mean(1).to(dtype).float(), atol=tol, rtol=0)
    if dtype != torch.float32:
        assert torch.equal(received.to(dtype).float(), received)


def test_bad_score_dtype_is_refused():
    with pytest.raises(ValueError, match="score_dtype"):
        encoder_attention_received(torch.nn.Identity(), torch.zeros(1, 2, 4), score_dtype="float16")
    for policy in ("hiprune", "holov", "visiondrop"):
        with pytest.raises(PolicyOptionError, match="score_dtype"):
            get_policy_class(policy)(score_dtype="float16")


@pytest.mark.parametrize(
    ("policy", "options", "expected"),
    [
        ("hiprune", {"score_dtype": "model"}, {"model"}),
        ("holov", {"score_dtype": "model"}, {"model"}),
        ("visiondrop", {"score_dtype": "model"}, {"model"}),
        ("visiondrop", {"compat": "official"}, {"model"}),  # official = the fp16 cast of the released code
        ("visiondrop", {}, {"float32"}),
    ],
)
def test_policies_pass_score_dtype_to_every_attention_score(monkeypatch, policy, options, expected):
    """Every attention score a policy computes (vision tower and LLM stages) uses the policy's score_dtype."""
    seen: list[str] = []
    for module, name in (
        (adapters_base, "encoder_attention_rows"),  # where the engine computes them
        (adapters_base, "encoder_attention_received"),
        (llm_stage, "decoder_attention_received"),
    ):
        original = getattr(module, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("score_dtype", args[4] if len(args) > 4 else "float32"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    vlm = tiny_llava(text_layers=8, dtype=torch.bfloat16)
    inputs = vlm.inputs([dummy_image()], vlm.prompt())
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with tokenzip.apply(vlm.model, policy, 0.25, **options) as patch, torch.no_grad():
        logits = vlm.model(**inputs).logits
        assert patch.stats.last.samples[0].items[0].kept < 64
    assert math.isfinite(float(logits.float().abs().sum()))
    assert seen and set(seen) == expected
