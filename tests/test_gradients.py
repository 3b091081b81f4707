"""Gradients through patched models equal central finite differences (r03).

Policies select without gradient, but merged values (pooled windows, contextual tokens, clustered or folded
hidden states) are differentiable functions of the model's activations, so d(loss)/dW of any parameter upstream of
a merge must be the true derivative, never a silent zero. Checked on float64 tiny models with 8 text layers: the
directional derivative <grad W, V> from autograd against (loss(W + eps V) - loss(W - eps V)) / (2 eps) along a
fixed random direction V of the whole weight matrix, for the projector and the vision tower's patch embedding
(upstream of every merge, vision-stage ones included).
"""

from __future__ import annotations

import functools

import pytest
import torch

import tokenzip
from tokenzip.tiny import dummy_image, ov_video_inputs, tiny_llava, tiny_llava_ov


class _ExactRMSNorm(torch.nn.Module):
    """RMSNorm computed in the input dtype: the transformers one rounds float64 inputs through float32, which would
    swamp a central difference in rounding noise (test-only stand-in, same maths)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _exact_float64(vlm):
    for name, module in list(vlm.model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            parent, _, child = name.rpartition(".")
            setattr(vlm.model.get_submodule(parent), child, _ExactRMSNorm(module))
    return vlm


@functools.cache
def _model(family: str):
    build = tiny_llava if family == "llava" else tiny_llava_ov
    vlm = _exact_float64(build(text_layers=8, dtype=torch.float64))
    vlm.model.requires_grad_(True)
    return vlm


def _inputs(family: str) -> dict:
    vlm = _model(family)
    if family == "llava":
        inputs = vlm.inputs([dummy_image()], vlm.prompt())
    else:  # an OneVision video of 4 identical frames: every token is static, so HoliTom's clustering runs
        inputs = ov_video_inputs(vlm, frames=4)
        video = inputs["pixel_values_videos"]
        inputs["pixel_values_videos"] = video[:, :1].expand_as(video).contiguous()
    return {k: v.double() if torch.is_floating_point(v) else v for k, v in inputs.items()}


def _directional_check(vlm, inputs: dict) -> dict[str, tuple[float, float]]:
    """{parameter: (autograd <grad, V>, central difference along V)} for the projector and the patch embedding."""
    params = {
        "projector": vlm.model.model.multi_modal_projector.linear_1.weight,
        "patch_embedding": vlm.model.model.vision_tower.embeddings.patch_embedding.weight,
    }

    def loss() -> torch.Tensor:
        return vlm.model(**inputs).logits[:, -1].pow(2).sum()

    vlm.model.zero_grad(set_to_none=True)
    loss().backward()
    out = {}
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name, weight in params.items():
        direction = torch.randn(weight.shape, generator=gen, dtype=weight.dtype)
        direction /= direction.norm()
        auto = float((weight.grad * direction).sum()) if weight.grad is not None else 0.0
        with torch.no_grad():
            weight.add_(eps * direction)
            plus = float(loss())
            weight.sub_(2 * eps * direction)
            minus = float(loss())
            weight.add_(eps * direction)
        out[name] = (auto, (plus - minus) / (2 * eps))
    vlm.model.zero_grad(set_to_none=True)
    return out


GRADIENT_CASES = [
    ("pool", "llava", 0.25, {}),  # pooled windows (pre-LLM merge)
    ("visiondrop", "llava", 0.5, {}),  # CLIP-space contextual merge before the projector + 3 in-LLM merges
    ("visiondrop", "llava", 0.5, {"stage1_space": "post_projector"}),  # stage 1 on projector outputs
    ("holitom", "llava", 0.5, {}),  # inner merge (tokens folded into kept ones at layer K)
    ("holitom", "llava_onevision", 0.3, {}),  # outer DPC-kNN clustering of static video tokens
    ("mustdrop", "llava", 0.5, {}),  # 3x3 window merge inside the vision tower
    ("fastv", "llava", 0.5, {}),  # pruning only
]


@pytest.mark.parametrize(("policy", "family", "keep", "options"), GRADIENT_CASES)
def test_gradients_match_finite_differences(policy, family, keep, options):
    vlm = _model(family)
    inputs = _inputs(family)
    with tokenzip.apply(vlm.model, policy, keep, **options) as patch:
        checks = _directional_check(vlm, inputs)
        sample = patch.stats.last.samples[0]
    assert min(sample.visual_per_layer) < sample.items[0].content  # the policy really shortened the visual tokens
    for name, (auto, numeric) in checks.items():
        assert abs(numeric) > 1e-6, f"{policy}: the loss does not depend on the {name}; the check would be vacuous"
        assert auto == pytest.approx(numeric, rel=1e-5, abs=1e-9), f"{policy}: d loss / d {name}"


def test_merged_values_carry_no_graph_under_no_grad():
    """Re-enabling autograd for merged values records nothing when the user runs without gradients."""
    vlm = _model("llava")
    inputs = _inputs("llava")
    with tokenzip.apply(vlm.model, "pool", 0.25), torch.no_grad():
        logits = vlm.model(**inputs).logits
    assert not logits.requires_grad and logits.grad_fn is None
