"""Shared fixtures: tiny offline models (built once per session) and their inputs."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from tokenzip.tiny import VIDEO_INPUTS, TinyVLM, dummy_image, tiny

FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision", "qwen2_vl", "llava_next", "qwen3_vl")
VIDEO_FAMILIES = tuple(f for f in FAMILIES if f in VIDEO_INPUTS)  # the families that take videos

# Baseline policies exercising every stage: name -> apply() options (policy = the part before "-").
POLICY_CASES = {
    "random": {},
    "pool": {},
    "fastv": {},
    "random-llm": {"stage": "llm"},
    "random-decode": {"stage": "decode", "layer": 4},
    "random-vision": {"stage": "vision", "layer": 1},
    "hiprune": {},
    "holov": {},
    "visiondrop": {},
    "mustdrop": {},
    "atp": {},
    "holitom": {},
    "dart": {},
    "divprune": {},
    "pdrop": {},
    "visionzip": {},
    "sparsevlm": {},
}


def oracle_truth(policy: str, items_per_sample: list[int]):
    """A `ground_truth` block for the `oracle` policy (which reads the synthetic generator's ground truth): one
    [1, 240, 240] raster per image item, covering a box in its upper-left quarter; a no-op block for any other
    policy. Lets tests that run every registered policy on arbitrary images run the oracle too."""
    import contextlib

    from tokenzip.policies.oracle import ground_truth

    if policy != "oracle":
        return contextlib.nullcontext()
    raster = torch.zeros(1, 240, 240)
    raster[:, 30:100, 20:110] = 1
    return ground_truth([[raster] * n for n in items_per_sample])


def forward_with_hooks(model, inputs: dict, handles: list, **kwargs):
    """`model(**inputs, **kwargs)` without gradients; the test's hook `handles` are removed afterwards (also on
    error), so a failing assertion never leaves hooks on the shared tiny models."""
    try:
        with torch.no_grad():
            return model(**inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def assert_identity_and_restore(vlm, inputs: dict, policy: str, prune_keep=0.25, **options) -> None:
    """keep=1.0 gives bit-identical logits; `prune_keep` really shortens the LLM input; `remove()` restores
    bit-identical logits and leaves no hook on the model."""
    import tokenzip

    with torch.no_grad():
        before = vlm.model(**inputs).logits
        with tokenzip.apply(vlm.model, policy, 1.0, **options):
            same = vlm.model(**inputs).logits
        patch = tokenzip.apply(vlm.model, policy, prune_keep, **options)
        pruned = vlm.model(**inputs).logits
        patch.remove()
        after = vlm.model(**inputs).logits
    assert torch.equal(same, before)
    assert pruned.shape[1] < before.shape[1]
    assert torch.equal(after, before)
    assert not vlm.model._forward_pre_hooks and not vlm.model._forward_hooks


def apply_case(model, case: str, keep, **extra):
    """`tokenzip.apply` for a POLICY_CASES entry."""
    import tokenzip

    return tokenzip.apply(model, case.split("-")[0], keep, **{**POLICY_CASES[case], **extra})


ATTENTION = ("sdpa", "eager")

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@functools.cache
def get_tiny(family: str, attn: str = "sdpa") -> TinyVLM:
    """One tiny model per (family, attention backend); identical weights across backends (same seed)."""
    return tiny(family, attn=attn)


def _samples(vlm: TinyVLM) -> tuple[list, list[str]]:
    """Two images (different sizes where the family allows) and two different prompts."""
    if vlm.family == "qwen2_5_vl":
        images = [dummy_image(112, 112, 0), dummy_image(224, 168, 1)]
    elif vlm.family in ("llava_onevision", "llava_next"):  # anyres: different tile layouts
        images = [dummy_image(112, 100, 0), dummy_image(100, 60, 1)]
    else:
        images = [dummy_image(112, 112, 0), dummy_image(112, 112, 1)]
    return images, [vlm.prompt("What is in the image ?"), vlm.prompt("Describe this image")]


def image_inputs(vlm: TinyVLM, batch: int) -> dict:
    """`batch` (1 or 2) samples with different images and prompts, left-padded."""
    images, prompts = _samples(vlm)
    if batch == 1:
        return vlm.inputs(images[:1], prompts[0])
    return vlm.inputs(images[:batch], prompts[:batch])


def single_inputs(vlm: TinyVLM, index: int) -> dict:
    """Sample `index` of `image_inputs(vlm, 2)` on its own (batch 1, no padding)."""
    images, prompts = _samples(vlm)
    return vlm.inputs(images[index : index + 1], prompts[index])


def video_inputs(vlm: TinyVLM) -> dict:
    """A 4-frame video prompt (112 px frames on the Qwen families)."""
    if vlm.family not in VIDEO_INPUTS:
        raise ValueError(f"{vlm.family} has no video inputs")
    return VIDEO_INPUTS[vlm.family](vlm, frames=4)


def multi_image_inputs(vlm: TinyVLM) -> dict:
    """Sample 0: two images in one prompt; sample 1: one image (batch 2)."""
    images = [[dummy_image(56, 56, 1), dummy_image(70, 50, 2)], [dummy_image(100, 60, 4)]]
    if vlm.family == "llava":
        images = [[dummy_image(112, 112, 1), dummy_image(112, 112, 2)], [dummy_image(112, 112, 4)]]
    prompts = [vlm.prompt("What is in the image ?", images=2), vlm.prompt("Describe", images=1)]
    return vlm.inputs(images, prompts)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=ATTENTION)
def attn(request) -> str:
    return request.param
