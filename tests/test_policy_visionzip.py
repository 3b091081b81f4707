"""VisionZip (docs/specs/visionzip.md): the selection and merge equal the spec's reference on fixed tensors, ties
included; the counts follow the released split (54 + 10, 108 + 20, 162 + 30) and meet the budget; bad options are
refused; inside the tiny models of all three families the policy's output equals the reference applied to what it
saw, and on LLaVA-1.5 what it saw is the CLS attention row and head-mean keys of the CLIP feature layer.

The reference follows the spec's §3 pseudo-code with plain Python loops (one token at a time); the library is
vectorised (`tokenzip.policies.contextual`, shared with VisionDrop's stage 1).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, get_tiny, image_inputs

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.budget import item_budget
from tokenzip.contexts import ProjectorInputContext
from tokenzip.errors import PolicyOptionError
from tokenzip.policies.visionzip import VisionZipPolicy, visionzip_split


def reference(scores, values, metric, d: int, c: int, forced: list[int] = ()):
    """§3: `forced` tokens (CLS) are dominant first, then the d - len(forced) best-scored other tokens (ties -> lower
    index); the rest, in order, give c targets rest[0], rest[step], ... (step = max(1, R // c)); every other token
    joins its most cosine-similar target (ties -> the first target); contextual = target + mean of its members.
    Returns (indices in output order, values)."""
    n = values.shape[0]
    candidates = [i for i in range(n) if i not in forced]
    ranked = sorted(candidates, key=lambda i: (-float(scores[i]), i))
    dominant = sorted([*forced, *ranked[: d - len(forced)]])
    rest = [i for i in range(n) if i not in dominant]
    if c == 0 or not rest:
        return dominant, values[dominant]
    step = max(1, len(rest) // c)
    targets = rest[::step][:c]
    members: dict[int, list[int]] = {t: [] for t in targets}
    for i in rest:
        if i in targets:
            continue
        sims = [float(metric[i] @ metric[t] / (metric[i].norm() * metric[t].norm())) for t in targets]
        best = max(range(len(targets)), key=lambda j: (sims[j], -j))
        members[targets[best]].append(i)
    merged = [values[t] + (values[members[t]].mean(0) if members[t] else 0) for t in targets]
    return dominant + targets, torch.cat([values[dominant], torch.stack(merged)])


def test_the_split_reproduces_the_released_settings():
    assert [visionzip_split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    for k in range(1, 577):
        d, c = visionzip_split(k)
        assert d + c == k and d >= 1 and c == min(int(k * 10 / 64 + 0.5), k - 1)
    assert visionzip_split(16) == (13, 3)  # 2.5 rounds up
    assert visionzip_split(10, 0.0) == (10, 0) and visionzip_split(2, 0.9) == (1, 1)


def projector_context(seed: int, rows: int = 2, tokens: int = 65, keep=0.5, ties: bool = False, policy=None):
    policy = policy or VisionZipPolicy()
    state = policy.plan(get_adapter(get_tiny("llava", "sdpa").model).info(), keep).state
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, tokens, 24, generator=g, dtype=torch.float64)
    cls = torch.rand(rows, tokens, generator=g, dtype=torch.float64)
    keys = torch.randn(rows, tokens, 6, generator=g, dtype=torch.float64)
    if ties:
        cls = (cls * 4).round() / 4  # five distinct values: many ties at the top-k boundary
        keys[:, 1::2] = keys[:, :1]  # identical metric rows: equally close to several targets
    signals = {state.score.key: cls, state.metric.key: keys}
    return ProjectorInputContext(hidden, signals, keep, list(range(rows)), True, state=state), state


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("keep", [0.05, 0.25, 0.5, 0.9, 1, 64])
def test_projector_stage_equals_the_reference(keep, ties):
    for seed in range(6):
        ctx, state = projector_context(seed, keep=keep, ties=ties)
        d, c = visionzip_split(item_budget(keep, 64))
        for r, sel in enumerate(VisionZipPolicy().select_projector_input(ctx)):
            scores, keys = ctx.signals[state.score.key][r], ctx.signals[state.metric.key][r]
            want, values = reference(scores, ctx.hidden[r], keys, d, c, forced=[0])
            assert sel.keep.tolist() == want and sel.keep.numel() == item_budget(keep, 64)
            torch.testing.assert_close(sel.values, values, atol=1e-12, rtol=0)
            assert sel.keep[0] == 0 and torch.equal(sel.values[0], ctx.hidden[r, 0])  # CLS first, unchanged


def test_without_cls_the_patches_alone_are_ranked_and_merged():
    policy = VisionZipPolicy(include_cls=False)
    ctx, state = projector_context(3, keep=0.25, policy=policy)
    ctx.signals[state.score.key][:, 0] = 10.0  # a scored CLS would win
    d, c = visionzip_split(16)
    for r, sel in enumerate(policy.select_projector_input(ctx)):
        scores, keys = ctx.signals[state.score.key][r, 1:], ctx.signals[state.metric.key][r, 1:]
        want, values = reference(scores, ctx.hidden[r, 1:], keys, d, c)
        assert sel.keep.tolist() == [i + 1 for i in want] and 0 not in sel.keep.tolist()
        torch.testing.assert_close(sel.values, values, atol=1e-12, rtol=0)
        assert set(sel.groups[0].tolist()) | set(sel.keep.tolist()) == set(range(1, 65))  # every patch accounted for


def test_designed_ties():
    """Equal CLS scores -> the lower patch index; identical keys -> the first target; values = target + mean."""
    ctx, state = projector_context(0, rows=1, tokens=9, keep=4)  # K = 4 -> d = 3 (CLS + 2 patches), c = 1
    ctx.signals[state.score.key][0] = torch.tensor([9.0, 0.1, 0.5, 0.5, 0.2, 0.5, 0.1, 0.0, 0.0], dtype=torch.float64)
    ctx.hidden[0] = torch.arange(9, dtype=torch.float64)[:, None].expand(9, 24)
    (sel,) = VisionZipPolicy().select_projector_input(ctx)
    assert visionzip_split(4) == (3, 1)
    assert sel.keep.tolist() == [0, 2, 3, 1]  # patches 2 and 3 beat 5 (same score); target = first of the rest
    assert float(sel.values[3, 0]) == 1.0 + (4 + 5 + 6 + 7 + 8) / 5  # target 1 plus the mean of the others
    ctx2, state2 = projector_context(1, rows=1, tokens=9, keep=5)
    ctx2.signals[state2.metric.key][0] = 1.0  # every key identical: all ties go to the first target
    (sel2,) = VisionZipPolicy(contextual_ratio=0.4).select_projector_input(ctx2)
    d, c = visionzip_split(5, 0.4)
    assert (d, c) == (3, 2)
    targets = sel2.keep[d:].tolist()
    assert set(sel2.groups[1].tolist()) == {targets[0]}


@pytest.mark.parametrize(
    "options",
    [
        {"contextual_ratio": float("nan")},
        {"contextual_ratio": -0.1},
        {"contextual_ratio": 1.0},
        {"include_cls": 1},
        {"score_dtype": "fp16"},
    ],
)
def test_bad_options_are_refused(options):
    with pytest.raises(PolicyOptionError, match="visionzip"):
        VisionZipPolicy(**options)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_include_cls_is_refused_without_a_cls_token(family):
    with pytest.raises(PolicyOptionError, match="include_cls"):
        tokenzip.apply(get_tiny(family, "sdpa").model, "visionzip", 0.5, include_cls=True)


def capture_calls(monkeypatch, method: str) -> list:
    """Record (context, returned selection(s)) of every call of VisionZipPolicy.<method>."""
    calls: list = []
    original = getattr(VisionZipPolicy, method)

    def wrapper(self, ctx):
        out = original(self, ctx)
        calls.append((ctx, out))
        return out

    monkeypatch.setattr(VisionZipPolicy, method, wrapper)
    return calls


def item_start(vlm, inputs, b: int) -> int:
    token = vlm.model.config.image_token_id
    return int((inputs["input_ids"][b] == token).nonzero()[0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_inside_the_model_the_output_is_the_reference_on_what_the_policy_saw(family, keep, monkeypatch):
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 2)
    stage = "select_projector_input" if family == "llava" else "select_pre_llm"
    calls = capture_calls(monkeypatch, stage)
    seen: list[torch.Tensor] = []
    lm = get_adapter(vlm.model).lm
    with tokenzip.apply(vlm.model, "visionzip", keep) as patch, torch.no_grad():
        handle = lm.layers[0].register_forward_pre_hook(
            lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True
        )
        try:
            vlm.model(**inputs)
        finally:
            handle.remove()
    record = patch.stats.last
    state = calls[0][0].state
    for b, sample in enumerate(record.samples):
        assert sample.on_budget
        item = sample.items[0]
        k = item_budget(keep, item.content)
        d, c = visionzip_split(k)
        if family == "llava":
            ctx, sels = calls[0]
            sel = sels[b]
            want, values = reference(
                ctx.signals[state.score.key][b], ctx.hidden[b], ctx.signals[state.metric.key][b], d, c, forced=[0]
            )
            assert sel.keep.tolist() == want
            torch.testing.assert_close(sel.values, values, atol=1e-6, rtol=1e-6)
            llm_values = vlm.model.model.multi_modal_projector(values)  # projected, then into the LLM in order
            assert item.kept_indices.tolist() == [max(0, i - 1) for i in want]  # CLS stands at the first patch
        else:
            ctx, sel = calls[b]
            content = ctx.content_available
            pos, values = reference(
                ctx.signals[state.score.key][content],
                ctx.embeds[content],
                ctx.signals[state.metric.key][content],
                d,
                c,
            )
            tail = list(range(item.shape.length - item.shape.trailing, item.shape.length))
            assert sel.keep.tolist() == [*content[pos].tolist(), *tail]
            torch.testing.assert_close(sel.values[: len(pos)], values, atol=1e-6, rtol=1e-6)
            llm_values = values
            assert item.kept_indices.tolist() == sel.keep.tolist()
        assert item.kept == k
        # left padding: the text after the image ends every row, so the image run ends `after` tokens before the end
        after = inputs["input_ids"].shape[1] - item_start(vlm, inputs, b) - item.tokens
        end = seen[0].shape[1] - after
        torch.testing.assert_close(seen[0][b, end - k - item.shape.trailing : end - item.shape.trailing], llm_values)


def test_llava_signals_are_the_cls_row_and_head_mean_keys_of_the_feature_layer(monkeypatch):
    """What the projector stage saw equals eager CLIP's own attention probabilities (CLS query row, head mean) and
    its feature layer's keys (k_proj of the layer's normalised input, averaged over heads)."""
    vlm = get_tiny("llava", "eager")
    inputs = image_inputs(vlm, 2)
    calls = capture_calls(monkeypatch, "select_projector_input")
    with tokenzip.apply(vlm.model, "visionzip", 0.25), torch.no_grad():
        vlm.model(**inputs)
    ctx, _ = calls[0]
    tower = vlm.model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        layer_index = len(tower.encoder.layers) + vlm.model.config.vision_feature_layer
        layer = tower.encoder.layers[layer_index]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[layer_index]))
        keys = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(2)
    torch.testing.assert_close(ctx.hidden, out.hidden_states[layer_index + 1])
    torch.testing.assert_close(ctx.signals[ctx.state.score.key], out.attentions[layer_index][:, :, 0].mean(1))
    torch.testing.assert_close(ctx.signals[ctx.state.metric.key], keys)


def test_nominal_counts_k_per_item_on_every_layer():
    for family in FAMILIES:
        vlm = get_tiny(family, "sdpa")
        inputs = image_inputs(vlm, 1)
        with tokenzip.apply(vlm.model, "visionzip", 0.25) as patch, torch.no_grad():
            vlm.model(**inputs)
        sample = patch.stats.last.samples[0]
        k = item_budget(0.25, sample.items[0].content)
        assert sample.visual_per_layer == [k] * len(sample.visual_per_layer)
