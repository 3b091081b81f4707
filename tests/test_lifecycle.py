"""Patch lifecycle: stacked patches, inner `with` blocks, `viz.show`, `tokenzip.remove`, shared Policy instances."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import get_tiny, image_inputs

import tokenzip
from tokenzip.policies.registry import get_policy_class
from tokenzip.tiny import dummy_image, tiny_llava


def forward(vlm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return vlm.model(**inputs).logits


def kept(patch) -> int:
    return patch.stats.last.samples[0].items[0].kept


def hook_owners(model) -> set:
    """The objects whose bound methods are forward pre-hooks of `model` (a patch's runtime)."""
    return {getattr(hook, "__self__", None) for hook in model._forward_pre_hooks.values()}


def assert_unpatched(model) -> None:
    assert tokenzip.current_patch(model) is None
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_second_apply_warns_and_removing_it_restores_the_first():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    unpatched = forward(vlm, inputs)
    first = tokenzip.apply(vlm.model, "pool", 0.25)
    try:
        pooled = forward(vlm, inputs)
        with pytest.warns(tokenzip.TokenzipWarning, match="already has a tokenzip patch"):
            second = tokenzip.apply(vlm.model, "random", 0.5)
        assert first.suspended and not first.active and second.active
        assert tokenzip.current_patch(vlm.model) is second
        assert hook_owners(vlm.model) == {second._runtime}  # only the second patch's hooks are on the model
        forward(vlm, inputs)
        assert kept(second) == 32 and len(first.stats) == 1  # the suspended patch did not run
        second.remove()
        assert not second.active and not second.suspended
        assert tokenzip.current_patch(vlm.model) is first and first.active
        assert torch.equal(forward(vlm, inputs), pooled)
        assert kept(first) == 16 and len(first.stats) == 2
    finally:
        tokenzip.remove(vlm.model, all_patches=True)
    assert_unpatched(vlm.model)
    assert torch.equal(forward(vlm, inputs), unpatched)


def test_leaving_an_inner_with_block_restores_the_outer_patch():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "pool", 0.25, positions="original") as outer:
        stats = outer.stats
        before = forward(vlm, inputs)
        with pytest.warns(tokenzip.TokenzipWarning), tokenzip.apply(vlm.model, "random", 0.5) as inner:
            forward(vlm, inputs)
            assert kept(inner) == 32
        assert tokenzip.current_patch(vlm.model) is outer and outer.active
        assert (outer.policy.name, outer.keep, outer.positions) == ("pool", 0.25, "original")
        assert outer.stats is stats and len(stats) == 1
        assert torch.equal(forward(vlm, inputs), before)
        assert kept(outer) == 16 and len(stats) == 2
        with outer.replay():  # the outer patch's recorded selections survived the inner block
            assert torch.equal(forward(vlm, inputs), before)
    assert_unpatched(vlm.model)


def test_a_second_apply_that_fails_leaves_the_first_patch_in_place():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "pool", 0.25) as first:
        with pytest.raises(tokenzip.PolicyOptionError, match="object_layer"):  # found only when planning
            tokenzip.apply(vlm.model, "hiprune", 0.5, object_layer=99)
        with pytest.raises(tokenzip.PolicyOptionError, match="alpha"):
            tokenzip.apply(vlm.model, "hiprune", 0.5, alpha=float("nan"))
        assert tokenzip.current_patch(vlm.model) is first and first.active
        forward(vlm, inputs)
        assert kept(first) == 16
    assert_unpatched(vlm.model)


def test_removing_a_suspended_patch_drops_it_for_good():
    vlm = get_tiny("llava", "sdpa")
    first = tokenzip.apply(vlm.model, "pool", 0.25)
    with pytest.warns(tokenzip.TokenzipWarning):
        second = tokenzip.apply(vlm.model, "random", 0.5)
    assert hook_owners(vlm.model) == {second._runtime}
    first.remove()
    assert not first.suspended and not first.active and second.active
    assert tokenzip.current_patch(vlm.model) is second
    second.remove()
    assert_unpatched(vlm.model)
    assert "removed" in repr(first) and "removed" in repr(second)


def test_keep_set_on_a_suspended_patch_applies_when_it_comes_back():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    first = tokenzip.apply(vlm.model, "random", 0.5)
    try:
        with pytest.warns(tokenzip.TokenzipWarning), tokenzip.apply(vlm.model, "pool", 0.25) as second:
            first.keep = 0.25
            assert first.suspended and "suspended" in repr(first)
            assert hook_owners(vlm.model) == {second._runtime}
        forward(vlm, inputs)
        assert first.active and kept(first) == 16
    finally:
        tokenzip.remove(vlm.model, all_patches=True)
    assert_unpatched(vlm.model)


def test_tokenzip_remove():
    vlm = get_tiny("llava", "sdpa")
    assert tokenzip.remove(vlm.model) is None  # no patch: a no-op
    patch = tokenzip.apply(vlm.model, "random", 0.5)
    assert tokenzip.remove(vlm.model) is patch and not patch.active
    assert_unpatched(vlm.model)
    first = tokenzip.apply(vlm.model, "pool", 0.25)
    with pytest.warns(tokenzip.TokenzipWarning):
        second = tokenzip.apply(vlm.model, "random", 0.5)
    assert tokenzip.remove(vlm.model) is second and first.active  # the one it suspended comes back
    with pytest.warns(tokenzip.TokenzipWarning):
        tokenzip.apply(vlm.model, "random", 0.5)
    tokenzip.remove(vlm.model, all_patches=True)
    assert_unpatched(vlm.model)
    assert not first.active and not first.suspended


def test_viz_show_restores_the_users_patch():
    from tokenzip.viz import show

    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "pool", 0.25) as patch:
        stats = patch.stats
        before = forward(vlm, inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", tokenzip.TokenzipWarning)  # show stacks on purpose: no warning
            show(vlm.model, vlm.processor, dummy_image(), "What is in the image ?", "random", keep=0.5)
        assert tokenzip.current_patch(vlm.model) is patch and patch.active and patch.stats is stats
        assert torch.equal(forward(vlm, inputs), before)
    assert_unpatched(vlm.model)
    show(vlm.model, vlm.processor, dummy_image(), "What is in the image ?", "random", keep=0.5)
    assert_unpatched(vlm.model)  # no patch before show, none after


@pytest.mark.parametrize("policy", ["hiprune", "holov"])
def test_one_policy_instance_applied_to_two_models(policy):
    """r10: a policy keeps no per-model state (plan() returns it): one instance drives two models at once."""
    a = tiny_llava(text_layers=8, vision_layers=4)
    b = tiny_llava(text_layers=8, vision_layers=8)
    inputs_a = a.inputs([dummy_image()], a.prompt())
    inputs_b = b.inputs([dummy_image()], b.prompt())
    expected = {}
    for vlm, inputs in ((a, inputs_a), (b, inputs_b)):
        with tokenzip.apply(vlm.model, policy, 0.5) as patch:
            expected[id(vlm)] = (forward(vlm, inputs), patch.stats.last.samples[0].items[0].kept_indices)
    shared = get_policy_class(policy)()
    patch_a = tokenzip.apply(a.model, shared, 0.5)
    patch_b = tokenzip.apply(b.model, shared, 0.5)
    try:
        assert patch_a.policy is shared and patch_b.policy is shared
        for vlm, inputs, patch in ((a, inputs_a, patch_a), (b, inputs_b, patch_b)):
            got = forward(vlm, inputs)
            want, indices = expected[id(vlm)]
            assert torch.equal(got, want)
            assert torch.equal(patch.stats.last.samples[0].items[0].kept_indices, indices)
    finally:
        patch_a.remove()
        patch_b.remove()
    assert shared == get_policy_class(policy)()  # planning left the instance as it was


def test_a_policy_instance_cannot_be_changed_after_construction():
    vlm = get_tiny("llava", "sdpa")
    policy = get_policy_class("hiprune")()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.alpha = float("inf")
    with pytest.raises(tokenzip.PolicyOptionError, match="alpha=inf"):
        dataclasses.replace(policy, alpha=float("inf"))
    assert_unpatched(vlm.model)
