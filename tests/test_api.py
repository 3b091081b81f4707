"""The public API: instance scope, patch lifecycle, statistics and every bad-input error."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny, image_inputs

import tokenzip
from tokenzip.reference import cached_greedy
from tokenzip.tiny import tiny_llava


def logits(vlm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return vlm.model(**inputs).logits


def test_list_policies_names_and_descriptions():
    policies = tokenzip.list_policies()
    assert {"none", "random", "pool", "fastv", "hiprune"} <= set(policies)
    assert all(isinstance(d, str) and len(d) > 10 for d in policies.values())


def test_apply_twice_suspends_the_first_patch():
    """More of the patch lifecycle (inner `with` blocks, `tokenzip.remove`, viz.show) in test_lifecycle.py."""
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    first = tokenzip.apply(vlm.model, "random", 0.5)
    with pytest.warns(tokenzip.TokenzipWarning):
        second = tokenzip.apply(vlm.model, "pool", 0.25)
    try:
        assert not first.active and first.suspended and second.active
        assert tokenzip.current_patch(vlm.model) is second
        assert {getattr(h, "__self__", None) for h in vlm.model._forward_pre_hooks.values()} == {second._runtime}
        logits(vlm, inputs)
        assert second.stats.last.samples[0].items[0].kept == 16
        assert len(first.stats) == 0
        second.remove()
        assert tokenzip.current_patch(vlm.model) is first and first.active
    finally:
        tokenzip.remove(vlm.model, all_patches=True)
    assert tokenzip.current_patch(vlm.model) is None


def test_two_patched_models_do_not_interfere():
    a, b = tiny_llava(seed=0), tiny_llava(seed=1)
    inputs = image_inputs(a, 2)
    alone_a = {}
    for keep in (0.5, 0.25):
        with tokenzip.apply(a.model, "random", keep):
            alone_a[keep] = logits(a, inputs)
    base_b = logits(b, inputs)
    with tokenzip.apply(a.model, "random", 0.5), tokenzip.apply(b.model, "pool", 0.25) as patch_b:
        out_a = logits(a, inputs)
        out_b = logits(b, inputs)
        out_a2 = logits(a, inputs)
        patch_b.remove()
        assert torch.equal(logits(b, inputs), base_b)
    assert torch.equal(out_a, alone_a[0.5]) and torch.equal(out_a2, alone_a[0.5])
    assert out_b.shape[1] < base_b.shape[1]


def test_keep_is_settable_and_stats_record_it():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "random", 0.5) as patch:
        logits(vlm, inputs)
        patch.keep = 0.25
        logits(vlm, inputs)
        patch.keep = 1.0
        full = logits(vlm, inputs)
        kept = [r.samples[0].items[0].kept for r in patch.stats.history]
        keeps = [r.keep for r in patch.stats.history]
    assert kept == [32, 16, 64] and keeps == [0.5, 0.25, 1.0]
    with torch.no_grad():
        assert torch.equal(full, vlm.model(**inputs).logits)


def test_stats_report_items_layers_indices_and_time():
    vlm = get_tiny("llava_onevision", "sdpa")
    with tokenzip.apply(vlm.model, "fastv", 0.5) as patch:
        cached_greedy(vlm.model, image_inputs(vlm, 2), 2)
        record = patch.stats.last
    assert record.policy == "fastv" and record.keep == 0.5
    assert len(record.samples) == 2
    for sample in record.samples:
        assert len(sample.visual_per_layer) == len(vlm.model.model.language_model.layers)
        assert sample.visual_per_layer[0] == sample.visual_in > sample.visual_per_layer[-1]
        item = sample.items[0]
        assert item.kept_indices.numel() == item.tokens  # fastv acts inside the LLM: all enter it
    assert "llm@2" in record.seconds and record.seconds["llm@2"] > 0
    assert "fastv" in repr(patch) and "ForwardRecord" in repr(record)


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, float("nan"), True, "0.5", None, 0.0])
def test_invalid_keep_is_rejected(keep):
    vlm = get_tiny("llava", "sdpa")
    with pytest.raises(tokenzip.BudgetError, match="keep"):
        tokenzip.apply(vlm.model, "random", keep)


def test_unknown_policy_and_option_are_rejected():
    vlm = get_tiny("llava", "sdpa")
    names = ", ".join(tokenzip.list_policies())
    with pytest.raises(tokenzip.UnknownPolicyError, match=f"unknown policy 'hiprunee'; available policies: {names}"):
        tokenzip.apply(vlm.model, "hiprunee", 0.5)
    with pytest.raises(tokenzip.PolicyOptionError, match="its options are: layer, ratio"):
        tokenzip.apply(vlm.model, "fastv", 0.5, K=2)
    with pytest.raises(tokenzip.PolicyOptionError, match="stage"):
        tokenzip.apply(vlm.model, "random", 0.5, stage="middle")
    with pytest.raises(tokenzip.PolicyOptionError, match="positions"):
        tokenzip.apply(vlm.model, "random", 0.5, positions="shifted")
    assert tokenzip.current_patch(vlm.model) is None


def test_unsupported_models_name_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    for model in (text_only, torch.nn.Linear(2, 2)):
        with pytest.raises(tokenzip.UnsupportedModelError, match="LlavaForConditionalGeneration, Qwen2_5_VL"):
            tokenzip.apply(model, "random", 0.5)


def test_compact_positions_are_refused_on_mrope():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    with pytest.raises(tokenzip.UnsupportedModelError, match="M-RoPE"):
        tokenzip.apply(vlm.model, "random", 0.5, positions="compact")


def test_vision_stage_is_refused_where_features_are_resampled():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    with pytest.raises(tokenzip.UnsupportedModelError, match="vision-tower stage"):
        tokenzip.apply(vlm.model, "random", 0.5, stage="vision")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "qwen3_vl"])
def test_prompt_without_image_passes_through(family):
    vlm = get_tiny(family, "sdpa")
    enc = vlm.processor.tokenizer(["What is a cat ?"], return_tensors="pt")
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    base = logits(vlm, inputs)
    base_tokens = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tokenzip.apply(vlm.model, "fastv", 0.5) as patch:
        assert torch.equal(logits(vlm, inputs), base)
        assert torch.equal(vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False), base_tokens)
        assert patch.stats.last is None


def test_infeasible_fastv_budget_is_a_clear_error():
    vlm = get_tiny("llava", "sdpa")
    with tokenzip.apply(vlm.model, "fastv", 0.02, layer=2), pytest.raises(tokenzip.BudgetError, match="keep >="):
        logits(vlm, image_inputs(vlm, 1))


@pytest.mark.parametrize("policy", ["fastv", "random"])
def test_static_cache_is_a_clear_error(policy):
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, policy, 0.5):
        with pytest.raises(tokenzip.UnsupportedInputError, match="StaticCache"):
            vlm.model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
        tokens, _ = cached_greedy(vlm.model, inputs, 2)  # and the patch still works afterwards
    assert tokens.shape == (1, 2)


def test_images_after_prefill_are_refused():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "random", 0.5), torch.no_grad():
        out = vlm.model(**inputs, use_cache=True)
        more = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
        with pytest.raises(tokenzip.UnsupportedInputError, match="after prefill"):
            vlm.model(**more, past_key_values=out.past_key_values)


def test_beam_search_expands_selections_per_sample():
    vlm = get_tiny("llava_onevision", "sdpa")
    inputs = image_inputs(vlm, 2)
    with tokenzip.apply(vlm.model, "random", 0.25) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        single = [s.items[0].kept_indices.tolist() for s in patch.stats.last.samples]
        out = vlm.model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=3, do_sample=False)
        beams = [s.items[0].kept_indices.tolist() for s in patch.stats.history[-1].samples]
    assert out.shape[0] == 6
    assert beams == [single[0]] * 3 + [single[1]] * 3


def test_replay_needs_a_recorded_prefill():
    vlm = get_tiny("llava", "sdpa")
    with tokenzip.apply(vlm.model, "fastv", 0.5) as patch:
        replay = patch.replay()
        with pytest.raises(RuntimeError, match="nothing to replay"):
            replay.__enter__()
