"""Position ids: 'compact' renumbers kept tokens (LLaVA convention), 'original' keeps them (Qwen M-RoPE).

Checked with the test's own hooks on the decoder (prefill and every decode step), against the unpatched
model's position ids, and through manual decode loops that pass no position ids at all.
"""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny, image_inputs

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.reference import cached_greedy


def record_positions(module: torch.nn.Module, call) -> list[torch.Tensor]:
    """position_ids a decoder layer receives on each call while running `call()`."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"].clone()), with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen


def record_rope_rows(vlm, call) -> list[torch.Tensor]:
    """The (3-row for Qwen2.5-VL) position ids the decoder's rotary embedding receives on each call."""
    seen: list[torch.Tensor] = []
    rotary = get_adapter(vlm.model).rotary_emb
    handle = rotary.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    try:
        call()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_llava_pre_llm_positions(mode):
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    layer0 = get_adapter(vlm.model).lm_layers[0]
    length = inputs["input_ids"].shape[1]
    with tokenzip.apply(vlm.model, "random", 0.25, positions=mode) as patch:
        seen = record_positions(layer0, lambda: cached_greedy(vlm.model, inputs, 3))
        kept = patch.stats.last.samples[0].items[0].kept_indices
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    n = length - 64 + 16
    prefill = seen[0][0]
    assert prefill.numel() == n
    if mode == "compact":
        assert torch.equal(prefill, torch.arange(n))
        decode = [int(p) for p in seen[1:]]
        assert decode == [n, n + 1]
    else:
        expected = torch.cat([torch.arange(start), kept + start, torch.arange(start + 64, length)])
        assert torch.equal(prefill, expected)
        assert [int(p) for p in seen[1:]] == [length, length + 1]


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_llava_next_pre_llm_positions(mode):
    """LLaVA-NeXT's 1-D RoPE: compact renumbers the kept tokens (newlines included) like LLaVA-1.5; original keeps
    each kept token's position in the anyres run."""
    vlm = get_tiny("llava_next", "sdpa")
    inputs = image_inputs(vlm, 1)
    layer0 = get_adapter(vlm.model).lm_layers[0]
    length = inputs["input_ids"].shape[1]
    with tokenzip.apply(vlm.model, "random", 0.25, positions=mode) as patch:
        seen = record_positions(layer0, lambda: cached_greedy(vlm.model, inputs, 3))
        item = patch.stats.last.samples[0].items[0]
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    n = length - item.tokens + item.kept_indices.numel()
    prefill = seen[0][0]
    assert prefill.numel() == n and item.kept_indices.numel() < item.tokens
    if mode == "compact":
        assert torch.equal(prefill, torch.arange(n))
        assert [int(p) for p in seen[1:]] == [n, n + 1]
    else:
        rest = torch.arange(start + item.tokens, length)
        assert torch.equal(prefill, torch.cat([torch.arange(start), item.kept_indices + start, rest]))
        assert [int(p) for p in seen[1:]] == [length, length + 1]


def test_compact_positions_restart_after_an_llm_stage():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    layers = get_adapter(vlm.model).lm_layers
    with tokenzip.apply(vlm.model, "random", 0.25, stage="llm", layer=2, positions="compact") as patch:
        before = record_positions(layers[1], lambda: cached_greedy(vlm.model, inputs, 3))
        after = record_positions(layers[2], lambda: cached_greedy(vlm.model, inputs, 3))
        n_after = patch.stats.last.samples[0].sequence_per_layer[2]
    length = inputs["input_ids"].shape[1]
    assert torch.equal(before[0][0], torch.arange(length))
    assert torch.equal(after[0][0], torch.arange(n_after))
    assert [int(p) for p in after[1:]] == [n_after, n_after + 1]
    assert [int(p) for p in before[1:]] == [length, length + 1]


def test_qwen_keeps_original_mrope_positions_and_rope_deltas():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    inputs = image_inputs(vlm, 2)
    base_rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 3))
    base_deltas = vlm.model.model.rope_deltas.clone()
    with tokenzip.apply(vlm.model, "random", 0.25) as patch:
        rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 3))
        record = patch.stats.last
    assert torch.equal(vlm.model.model.rope_deltas, base_deltas)
    full = base_rows[0]  # [3, B, L] unpruned prefill positions
    mask = inputs["attention_mask"].bool()
    for b, sample in enumerate(record.samples):
        item = sample.items[0]
        start = int((inputs["input_ids"][b] == vlm.model.config.image_token_id).nonzero()[0])
        keep = torch.zeros(full.shape[-1], dtype=torch.bool)
        keep[mask[b]] = True
        keep[start : start + item.tokens] = False
        keep[start + item.kept_indices] = True
        expected = full[:, b, keep]
        got = rows[0][:, b]
        assert torch.equal(got[:, -expected.shape[1] :], expected)
    for step in (1, 2):  # decode positions continue from the unpruned sequence
        assert torch.equal(rows[step], base_rows[step])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl"])
@pytest.mark.parametrize("case", ["random", "fastv", "random-decode"])
def test_manual_decode_loop_without_positions_matches_generate(family, case):
    """A hand-written decode loop (no position_ids, a growing 2-D mask) sees the same logits as generate()."""
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 1)
    options = {"stage": "decode", "layer": 4} if case == "random-decode" else {}
    with tokenzip.apply(vlm.model, case.split("-")[0], 0.25, **options):
        tokens, step_logits = cached_greedy(vlm.model, inputs, 3)
        with torch.no_grad():
            out = vlm.model(**inputs, use_cache=True)
            manual = [out.logits[:, -1]]
            mask = inputs["attention_mask"]
            for t in range(2):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                # transformers 5.23's Qwen2.5-VL (and 5.25's Qwen3-VL, the same `compute_3d_position_ids`) builds
                # full-length positions from a 2-D mask in decode and crashes even unpatched, so its loop passes no
                # mask (batch 1 has no padding)
                step_mask = None if family in ("qwen2_5_vl", "qwen3_vl") else mask
                out = vlm.model(
                    input_ids=tokens[:, t : t + 1], attention_mask=step_mask, past_key_values=out.past_key_values
                )
                manual.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(manual, 1), step_logits, atol=1e-4, rtol=1e-4)
