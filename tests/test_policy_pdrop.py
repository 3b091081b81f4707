"""PyramidDrop (docs/specs/pdrop.md): the selection equals the spec's reference, ties included; the schedule meets the
layer-averaged budget (the official lambda = 0.5 counts at 270 of 576) or refuses; bad options are refused; inside
real tiny models every stage keeps, per item, the tokens the spec's plain eager computation ranks first on exactly
what the policy saw (all three families, a left-padded batch of two).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, get_tiny, image_inputs

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.budget import item_budget
from tokenzip.errors import BudgetError, PolicyOptionError
from tokenzip.policies.pdrop import (
    PDropPolicy,
    default_layers,
    last_token_mask,
    pdrop_floor,
    pdrop_schedule,
    pdrop_select,
    ratio_counts,
)


# ------------------------------------------------------------------------------------------ the spec's reference
def reference_select(scores: list[float], count: int) -> list[int]:
    """§3: the `count` largest scores, equal scores ordered by index, returned in sequence order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:count])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_last_row(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor):
    """§2 written out eagerly: the head-mean softmax row of the last slot (left padding: the last prompt token) of
    decoder `layer`, from its input `hidden` [B, L, D]; keys on padding slots are masked. Returns [B, L] float32."""
    attn = layer.self_attn
    cfg = attn.config
    b, n, _ = hidden.shape
    hd = attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(b, n, cfg.num_attention_heads, hd)
    k = attn.k_proj(x).view(b, n, cfg.num_key_value_heads, hd)
    if hasattr(attn, "q_norm"):  # Qwen3 decoders normalise each head's query and key before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
    logits = (q[:, :, -1:].float() @ k.float().transpose(-1, -2))[:, :, 0] / hd**0.5  # [B, H, L]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(1)


# ------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("seed", range(10))
def test_selection_equals_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 200, (1,), generator=g))
    scores = torch.rand(n, generator=g)
    for count in sorted({1, max(1, n // 8), max(1, n // 2), n - 1, n}):
        assert pdrop_select(scores, count).tolist() == reference_select(scores.tolist(), count), (n, count)


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.3, 0.1, 0.2])
    assert pdrop_select(scores, 2).tolist() == [1, 2] == reference_select(scores.tolist(), 2)
    assert pdrop_select(scores, 4).tolist() == [1, 2, 3, 4] == reference_select(scores.tolist(), 4)
    flat = torch.full((9,), 0.5, dtype=torch.float16)  # half-precision head means tie often (score_dtype="model")
    assert pdrop_select(flat, 3).tolist() == [0, 1, 2]


def test_the_query_is_each_samples_last_real_slot():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True], [True, False, True, False]])
    assert last_token_mask(valid).nonzero().tolist() == [[0, 3], [1, 3], [2, 2]]


def test_scores_equal_the_eager_reference_on_fixed_tensors():
    """The engine's recomputed row (decoder_attention_received with the last-token mask) on a left-padded batch."""
    from tokenzip.signals.attention import decoder_attention_received

    vlm = get_tiny("llava", "sdpa")
    layer = get_adapter(vlm.model).lm_layers[3]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 30, vlm.model.config.text_config.hidden_size, generator=g)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :7] = False
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    rotary = vlm.model.model.language_model.rotary_emb
    cos, sin = rotary(hidden, positions)
    mask = valid[:, None, None, :] & torch.ones(30, 30, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        got = decoder_attention_received(
            layer.self_attn, layer.input_layernorm(hidden), (cos, sin), last_token_mask(valid), mask
        )
        want = reference_last_row(layer, hidden, cos, sin, valid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ schedule
def test_keep_maps_to_the_official_lambda_half_schedule():
    assert default_layers(32) == (8, 16, 24) and default_layers(24) == (6, 12, 18)
    assert pdrop_schedule(270, 576, (8, 16, 24), 32) == [288, 144, 72]  # 270 = 576 (1 + 1/2 + 1/4 + 1/8) / 4
    assert ratio_counts(576, (0.5, 0.25, 0.125)) == [288, 144, 72]  # int(N r_k), the released scripts


@pytest.mark.parametrize("target", [192, 200, 150, 145, 300, 500, 576])
def test_the_layer_average_meets_the_budget(target):
    counts = pdrop_schedule(target, 576, (8, 16, 24), 32)
    assert counts == sorted(counts, reverse=True) and counts[-1] >= 1
    average = (8 * 576 + 8 * sum(counts)) / 32
    assert abs(average - target) <= 0.5, (counts, average)


def test_ratio_counts_floor_like_the_official_int_and_never_reach_zero():
    assert ratio_counts(577, (0.5, 0.25, 0.125)) == [288, 144, 72]
    assert ratio_counts(16, (0.5, 0.05, 0.01)) == [8, 1, 1]  # the official int() would keep 0 tokens


def test_a_budget_below_the_floor_names_the_smallest_reachable_keep():
    assert pdrop_floor(576, (8, 16, 24), 32) == 144.75
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 1)
    below = pytest.raises(BudgetError, match=r"smallest reachable keep is 0\.2")
    with below, torch.no_grad(), tokenzip.apply(vlm.model, "pdrop", 0.111):
        vlm.model(**inputs)
    with tokenzip.apply(vlm.model, "pdrop", 0.111, layers=(1, 3, 6)) as patch, torch.no_grad():  # earlier layers
        vlm.model(**inputs)
    sample = patch.stats.last.samples[0]
    assert abs(sample.visual_mean - item_budget(0.111, sample.items[0].content)) <= 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratios": (0.25, 0.5, 0.125)}, "non-increasing"),
        ({"ratios": (0.5, 0.25)}, "one value per stage"),
        ({"layers": (4, 8), "ratios": (0.5, 0.25, 0.1)}, "one value per stage"),
        ({"ratios": (0.5, 0.0, 0.1)}, "ratios"),
        ({"layers": (8, 4, 12)}, "layers"),
        ({"score_dtype": "float16"}, "score_dtype"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(PolicyOptionError, match=message):
        PDropPolicy(**options)


def test_layers_beyond_the_llm_are_refused_at_apply():
    vlm = get_tiny("llava", "sdpa")
    with pytest.raises(PolicyOptionError, match="exceed"):
        tokenzip.apply(vlm.model, "pdrop", 0.5, layers=(4, 8, 40))


def test_ratios_give_the_official_counts_in_a_model():
    vlm = get_tiny("llava", "sdpa")
    with tokenzip.apply(vlm.model, "pdrop", 0.5, ratios=(0.5, 0.25, 0.125)) as patch, torch.no_grad():
        vlm.model(**image_inputs(vlm, 1))
    sample = patch.stats.last.samples[0]
    n = sample.items[0].content
    per_layer = sample.visual_per_layer
    assert [per_layer[5], per_layer[6], per_layer[12], per_layer[18]] == [n, *ratio_counts(n, (0.5, 0.25, 0.125))]


# ------------------------------------------------------------------------------------------ inside real models
@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_keeps_the_reference_tokens_of_what_the_policy_saw(family, monkeypatch):
    vlm = get_tiny(family, "sdpa")
    layers = get_adapter(vlm.model).lm_layers
    stages = default_layers(len(layers))
    seen, rope = [], {}
    original = PDropPolicy.select_llm

    def spy(self, ctx):
        out = original(self, ctx)
        seen.append((ctx.layer, ctx.hidden_states.detach().clone(), ctx.layout, ctx.items, out))
        return out

    def capture_rope(index):
        def hook(module, args, kwargs):
            rope[index] = tuple(t.detach().clone() for t in kwargs["position_embeddings"])

        return hook

    monkeypatch.setattr(PDropPolicy, "select_llm", spy)
    with tokenzip.apply(vlm.model, "pdrop", 0.5):  # layers b - 1 run on the layout stage b selects from
        handles = [layers[b - 1].self_attn.register_forward_pre_hook(capture_rope(b), with_kwargs=True) for b in stages]
        try:
            with torch.no_grad():
                vlm.model(**image_inputs(vlm, 2))
        finally:
            for h in handles:
                h.remove()
    assert [s[0] for s in seen] == list(stages)
    n_layers = len(layers)
    for stage, (index, hidden, layout, items, selections) in enumerate(seen):
        assert bool(layout.valid[:, -1].all())  # left padding: the last slot is the last prompt token
        cos, sin = rope[index]
        with torch.no_grad():
            row = reference_last_row(layers[index], hidden, cos, sin, layout.valid)
        for b, per_item in enumerate(items.per_sample):
            want = []
            for j, item in enumerate(per_item):
                slots = ((layout.valid[b] & layout.visual[b]) & (layout.item[b] == j)).nonzero().flatten()
                n = item.shape.n_content
                count = pdrop_schedule(item_budget(0.5, n), n, stages, n_layers)[stage]
                want += slots[reference_select(row[b, slots].tolist(), count)].tolist()
            assert sorted(selections[b].keep.tolist()) == sorted(want), (family, index, b)
