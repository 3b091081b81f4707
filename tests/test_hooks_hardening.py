"""The patch's hooks and wrappers among other tools, copies and odd inputs.

r08: `remove()` restores another tool's feature wrapper (installed before apply) and keeps one installed after.
r09: `copy.deepcopy` of a patched model gives an independently patched copy.
r14: direct `get_image_features` calls do not accumulate records (nor their pixels).
r01: NaN in the inputs raises `UnsupportedInputError` naming the stage and the signal (HoloV looped forever).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import tokenzip
from tokenzip.errors import UnsupportedInputError
from tokenzip.policies.holov import holov_select, redistribute
from tokenzip.tiny import TinyVLM, dummy_image, tiny

FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl")


@functools.cache
def _vlm(family: str) -> TinyVLM:
    return tiny(family, text_layers=8)


def _inputs(vlm: TinyVLM) -> dict:
    return vlm.inputs([dummy_image()], vlm.prompt())


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------------ r08 other wrappers
def test_remove_restores_a_wrapper_installed_before_apply() -> None:
    vlm = _vlm("llava")
    model, base, inputs = vlm.model, vlm.model.model, _inputs(vlm)
    unpatched = _logits(model, inputs)
    original = base.get_image_features
    calls = []

    def other(*args, **kwargs):  # another tool's instance-level wrapper
        calls.append(1)
        return original(*args, **kwargs)

    base.get_image_features = other
    try:
        patch = tokenzip.apply(model, "pool", 0.5)
        pruned = _logits(model, inputs)
        assert calls and pruned.shape[1] < unpatched.shape[1]  # tokenzip wrapped the other tool's wrapper
        patch.remove()
        assert base.__dict__["get_image_features"] is other
        calls.clear()
        assert torch.equal(_logits(model, inputs), unpatched) and calls
    finally:
        base.__dict__.pop("get_image_features", None)
    assert "get_image_features" not in base.__dict__


def test_remove_keeps_a_wrapper_installed_after_apply() -> None:
    """Another tool wraps tokenzip's wrapper after apply: remove() leaves the other tool's wrapper installed and
    turns tokenzip's into a pass-through (nothing recorded, unpatched logits); a new patch works on top."""
    vlm = _vlm("llava")
    model, base, inputs = vlm.model, vlm.model.model, _inputs(vlm)
    unpatched = _logits(model, inputs)
    hooks = _hook_count(model)  # transformers' own hooks
    patch = tokenzip.apply(model, "pool", 0.5)
    inner = base.get_image_features

    def other(*args, **kwargs):
        return inner(*args, **kwargs)

    base.get_image_features = other
    try:
        pruned = _logits(model, inputs)
        patch.remove()
        assert base.__dict__["get_image_features"] is other
        recorded = len(patch.stats)
        assert torch.equal(_logits(model, inputs), unpatched)
        assert len(patch.stats) == recorded and _hook_count(model) == hooks
        with tokenzip.apply(model, "pool", 0.5) as again:
            assert torch.equal(_logits(model, inputs), pruned) and len(again.stats) == 1
        assert base.__dict__["get_image_features"] is other
    finally:
        base.__dict__.pop("get_image_features", None)


# ------------------------------------------------------------------------------------------ r09 deepcopy
@pytest.mark.parametrize(("family", "policy"), [("llava", "pool"), ("llava", "mustdrop"), ("qwen2_5_vl", "fastv")])
def test_deepcopy_gives_an_independent_patched_model(family: str, policy: str) -> None:
    vlm = _vlm(family)
    model, inputs = vlm.model, _inputs(vlm)
    unpatched = _logits(model, inputs)
    hooks = _hook_count(model)  # transformers' own hooks
    patch = tokenzip.apply(model, policy, 0.5)
    try:
        assert _hook_count(model) > hooks
        pruned = _logits(model, inputs)
        twin = copy.deepcopy(model)
        twin_patch = tokenzip.current_patch(twin)
        assert twin_patch is not None and twin_patch is not patch
        assert twin_patch._runtime.model is twin and twin_patch.model is twin
        wrapper = twin.model.get_image_features
        assert wrapper.runtime is twin_patch._runtime and wrapper.__wrapped__.__self__ is twin.model
        before = len(patch.stats)
        assert torch.equal(_logits(twin, inputs), pruned)
        assert len(twin_patch.stats) == before + 1 and len(patch.stats) == before  # the copy's hooks ran
        twin_patch.remove()
        assert _hook_count(twin) == hooks and "get_image_features" not in twin.model.__dict__
        assert torch.equal(_logits(twin, inputs), unpatched)
        assert torch.equal(_logits(model, inputs), pruned) and len(patch.stats) == before + 1  # original intact
    finally:
        patch.remove()
    assert torch.equal(_logits(model, inputs), unpatched) and _hook_count(model) == hooks


# ------------------------------------------------------------------------------------------ r14 direct calls
def test_direct_feature_calls_hold_only_what_a_forward_can_use() -> None:
    vlm = _vlm("llava")
    model, inputs = vlm.model, _inputs(vlm)
    patch = tokenzip.apply(model, "hiprune", 0.5)
    try:
        with torch.no_grad():
            reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            kept = patch.stats.last.samples[0].items[0].kept_indices
            for _ in range(30):
                model.model.get_image_features(
                    pixel_values=torch.randn(4, 3, 112, 112),
                    vision_feature_layer=-2,
                    vision_feature_select_strategy="default",
                )
            pending = patch._runtime.pending["image"]
            assert len(pending) == 1
            assert not any(k.startswith("pixel_values") for k in pending[0].arguments)
            again = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(again, reference)
        assert torch.equal(patch.stats.last.samples[0].items[0].kept_indices, kept)
        assert all(not calls for calls in patch._runtime.pending.values())
    finally:
        patch.remove()


# ------------------------------------------------------------------------------------------ r01 NaN inputs
# (policy, words the message names): a vision signal, pre-LLM features, an LLM signal
NAN_CASES = {
    "holov": ("vision signal",),
    "hiprune": ("vision signal",),
    "pool": ("pre_llm stage", "features"),
    "fastv": ("LLM signal 'last_row'", "decoder layer 1"),
}


@pytest.mark.parametrize("policy", list(NAN_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_nan_pixels_raise_a_clear_error(family: str, policy: str) -> None:
    vlm = _vlm(family)
    inputs = _inputs(vlm)
    inputs["pixel_values"] = inputs["pixel_values"].clone()
    inputs["pixel_values"][..., 0, 0] = float("nan")
    with tokenzip.apply(vlm.model, policy, 0.5), pytest.raises(UnsupportedInputError) as err:
        _logits(vlm.model, inputs)
    message = str(err.value)
    assert message.startswith(f"{policy}: NaN in the ")
    for words in NAN_CASES[policy]:
        assert words in message


def test_nan_in_llm_hidden_states_raises_at_the_llm_stage() -> None:
    """An in-LLM stage refuses non-finite hidden states of real tokens (e.g. an fp16 overflow in the LLM)."""
    vlm = _vlm("llava")
    layer = vlm.model.model.language_model.layers[1]

    def poison(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out[:, -1] = float("inf")

    handle = layer.register_forward_hook(poison)
    try:
        with tokenzip.apply(vlm.model, "atp", 0.5), pytest.raises(UnsupportedInputError, match="decoder layer"):
            _logits(vlm.model, _inputs(vlm))
    finally:
        handle.remove()


def test_holov_selection_refuses_nan_and_redistribute_is_bounded() -> None:
    features = torch.randn(12, 8)
    attention = torch.rand(12)
    attention[3] = float("nan")
    with pytest.raises(UnsupportedInputError, match="holov: NaN in the attention scores"):
        holov_select(features, attention, budget=6, crops=3, shortfall="redistribute")
    sizes = torch.tensor([4, 4, 4])
    with pytest.raises(UnsupportedInputError, match="crop weights must be finite"):
        redistribute(torch.tensor([6, 0, 0]), sizes, torch.tensor([float("nan"), 0.5, 0.5]))
    quotas = redistribute(torch.tensor([9, 1, 0]), sizes, torch.tensor([0.9, 0.1, 0.0]))
    assert quotas.tolist() == [4, 4, 2]
