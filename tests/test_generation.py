"""Generation invariants of every baseline policy on every family, backend and batch layout.

* keep=1.0 reproduces the unpatched logits and tokens exactly; `remove()` restores the model exactly.
* cached `generate` equals a cache-free recomputation of prompt + generated prefix under the same pruning
  (`patch.replay()` reapplies the prefill's selections; decode-stage KV edits are replayed as masks).
* bs=2 (different images and prompts, left padding) gives the tokens of two bs=1 runs.
* sdpa and eager select the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ATTENTION,
    FAMILIES,
    POLICY_CASES,
    apply_case,
    get_tiny,
    image_inputs,
    multi_image_inputs,
    single_inputs,
    video_inputs,
)

import tokenzip
from tokenzip.reference import cached_greedy, greedy_tokens, uncached_logits

STEPS = 4
KEEPS = (0.5, 0.25, 0.11)
# Policies whose fixed prune layers keep every visual token in the first layers cannot reach a layer average of
# 0.11 on these 24-layer LLMs (they refuse with BudgetError naming their smallest reachable keep: MustDrop 0.206-0.219,
# ATP 0.131-0.156 on the image cases, SparseVLM 0.141-0.180, MustDrop 0.375 on Qwen's two small images, PyramidDrop
# about 0.25 at layers 6 / 12 / 18); those cases run just above it.
LOWEST_REACHABLE = {
    "image": {"mustdrop": 0.23, "atp": 0.16, "sparsevlm": 0.2, "pdrop": 0.26},
    "multi": {"mustdrop": 0.4, "pdrop": 0.26},
    "video": {"pdrop": 0.26},
}


def reachable(case: str, keep: float, kind: str = "image") -> float:
    return max(keep, LOWEST_REACHABLE[kind].get(case.split("-")[0], 0.0))


def policy_cases(family: str) -> list[str]:
    return [name for name in POLICY_CASES if name != "random-vision" or family == "llava"]


apply = apply_case


def matrix():
    for family in FAMILIES:
        for attn in ATTENTION:
            for batch in (1, 2):
                for case in policy_cases(family):
                    yield pytest.param(family, attn, batch, case, id=f"{family}-{attn}-bs{batch}-{case}")


@pytest.mark.parametrize(("family", "attn", "batch", "case"), list(matrix()))
def test_keep_one_is_exact_identity(family, attn, batch, case):
    vlm = get_tiny(family, attn)
    inputs = image_inputs(vlm, batch)
    with torch.no_grad():
        base_logits = vlm.model(**inputs).logits
    base_tokens, base_step_logits = cached_greedy(vlm.model, inputs, STEPS)
    with apply(vlm.model, case, 1.0) as patch:
        with torch.no_grad():
            logits = vlm.model(**inputs).logits
        tokens, step_logits = cached_greedy(vlm.model, inputs, STEPS)
        assert patch.stats.last is not None
    assert torch.equal(logits, base_logits)
    assert torch.equal(tokens, base_tokens)
    assert torch.equal(step_logits, base_step_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_none_policy_and_remove_restore_exactly(family):
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 2)
    with torch.no_grad():
        before = vlm.model(**inputs).logits
        with tokenzip.apply(vlm.model, "none", 0.25):
            untouched = vlm.model(**inputs).logits
        patch = tokenzip.apply(vlm.model, "random", 0.25)
        pruned = vlm.model(**inputs).logits
        patch.remove()
        after = vlm.model(**inputs).logits
    assert torch.equal(untouched, before)
    assert pruned.shape[1] < before.shape[1]  # the patch really pruned
    assert torch.equal(after, before)
    assert not vlm.model._forward_pre_hooks and not vlm.model._forward_hooks
    assert "get_image_features" not in vlm.model.model.__dict__


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize(("family", "attn", "batch", "case"), list(matrix()))
def test_cached_generation_equals_uncached_recompute(family, attn, batch, case, keep):
    vlm = get_tiny(family, attn)
    inputs = image_inputs(vlm, batch)
    with apply(vlm.model, case, reachable(case, keep)) as patch:
        tokens, logits = cached_greedy(vlm.model, inputs, STEPS)
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy_tokens(vlm.model, reference), tokens)


def video_and_multi_cases():
    for case in (c for c in POLICY_CASES if c != "random-vision"):
        for attn in ATTENTION:
            yield pytest.param("llava_onevision", attn, "video", case, id=f"ov-{attn}-video-{case}")
            yield pytest.param("qwen2_5_vl", attn, "video", case, id=f"qwen-{attn}-video-{case}")
            yield pytest.param("llava_onevision", attn, "multi", case, id=f"ov-{attn}-multi-{case}")
            yield pytest.param("qwen2_5_vl", attn, "multi", case, id=f"qwen-{attn}-multi-{case}")
            yield pytest.param("llava", attn, "multi", case, id=f"llava-{attn}-multi-{case}")


@pytest.mark.parametrize(("family", "attn", "kind", "case"), list(video_and_multi_cases()))
def test_video_and_multi_image_generation(family, attn, kind, case):
    vlm = get_tiny(family, attn)
    inputs = video_inputs(vlm) if kind == "video" else multi_image_inputs(vlm)
    base_tokens, _ = cached_greedy(vlm.model, inputs, STEPS)
    with apply(vlm.model, case, 1.0):
        same_tokens, _ = cached_greedy(vlm.model, inputs, STEPS)
    assert torch.equal(same_tokens, base_tokens)
    with apply(vlm.model, case, reachable(case, 0.25, kind)) as patch:
        tokens, logits = cached_greedy(vlm.model, inputs, STEPS)
        record = patch.stats.history[-1]
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    n_items = 1 if kind == "video" else 2
    assert len(record.samples[0].items) == n_items
    assert record.samples[0].items[0].modality == ("video" if kind == "video" else "image")


@pytest.mark.parametrize("keep", (0.5, 0.11))
@pytest.mark.parametrize(
    ("family", "attn", "case"), [(f, a, c) for f in FAMILIES for a in ATTENTION for c in policy_cases(f)]
)
def test_batch_equals_single_runs(family, attn, case, keep):
    vlm = get_tiny(family, attn)
    with apply(vlm.model, case, reachable(case, keep)):
        batch_tokens, batch_logits = cached_greedy(vlm.model, image_inputs(vlm, 2), STEPS)
        for index in range(2):
            tokens, logits = cached_greedy(vlm.model, single_inputs(vlm, index), STEPS)
            assert torch.equal(batch_tokens[index], tokens[0])
            torch.testing.assert_close(batch_logits[index], logits[0], atol=1e-4, rtol=1e-4)


def _selections(vlm, case, keep) -> tuple[list, dict]:
    inputs = image_inputs(vlm, 2)
    with apply(vlm.model, case, keep) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        record = patch.stats.last
        decisions = patch._runtime.decisions
    kept = [[it.kept_indices.tolist() for it in sample.items] for sample in record.samples]
    llm = {layer: [orig.tolist() for orig, _, _ in rows] for layer, rows in decisions.llm.items()}
    return kept, llm


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", [c for c in POLICY_CASES if c not in ("random-decode", "random-vision")])
def test_sdpa_and_eager_select_the_same_tokens(family, case):
    sdpa = _selections(get_tiny(family, "sdpa"), case, 0.25)
    eager = _selections(get_tiny(family, "eager"), case, 0.25)
    assert sdpa == eager
    if case == "fastv":
        assert sdpa[1], "fastv recorded no in-LLM selection"
