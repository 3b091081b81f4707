"""SparseVLM (docs/specs/sparsevlm.md): raters, scores, top-k, recycling and counts equal the spec's plain reference,
ties included; the schedule meets keep; bad options are refused; inside the tiny models the policy's selection
equals the reference computed from what it saw (its context), on all three families.

The references below follow the spec's §3 literally with Python loops (no shared helper of the library).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, get_tiny, image_inputs

import tokenzip
from tokenzip.errors import BudgetError, PolicyOptionError
from tokenzip.policies.sparsevlm import (
    SparseVLMPolicy,
    check_budget,
    default_prune_layers,
    floor_totals,
    layer_average,
    official_totals,
    scored_count,
    select_raters,
    sparsevlm_schedule,
    sparsevlm_select,
    stage_total,
)


# ------------------------------------------------------------------------------------------ references
def ref_raters(visual: torch.Tensor, text: torch.Tensor) -> list[int]:
    nv, nt = visual.shape[0], text.shape[0]
    r = [0.0] * nt
    for i in range(nv):
        logits = [float(visual[i].double() @ text[j].double()) for j in range(nt)]
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        for j in range(nt):
            r[j] += e[j] / sum(e) / nv
    mean = sum(r) / nt
    return [j for j in range(nt) if r[j] > mean + 1e-12]


def ref_order(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, descending, ties -> lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def ref_stage(scores: list[float], hidden: torch.Tensor, k: int):
    n = len(scores)
    top = ref_order(scores, k)
    kept = sorted(top)
    dropped = [i for i in range(n) if i not in top]
    m = int(len(dropped) * 0.3) + 1 if dropped else 0
    if m == 0:
        return kept, [], []
    cand = [dropped[i] for i in ref_order([scores[j] for j in dropped], m)]
    c = int(m / 10) + 1
    x = hidden[cand].double()
    dim = x.shape[1]
    d = [[float((x[i] - x[j]).norm()) / math.sqrt(dim) for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:c]) / c) for i in range(m)]
    dmax = max(max(row) for row in d)
    delta = []
    for i in range(m):
        denser = [d[i][j] for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(denser) if denser else dmax)
    centres = ref_order([delta[i] * rho[i] for i in range(m)], c)
    assign = []
    for i in range(m):
        if i in centres:
            assign.append(centres.index(i))
        else:
            dists = [d[i][ce] for ce in centres]
            assign.append(dists.index(min(dists)))
    merged = []
    for q in range(c):
        members = [i for i in range(m) if assign[i] == q]
        merged.append(sum(x[i] for i in members) / (len(members) + 1e-6))
    return kept, [cand[ce] for ce in centres], merged


# ------------------------------------------------------------------------------------------ maths
@pytest.mark.parametrize("seed", range(10))
def test_raters_equal_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(int(torch.randint(2, 40, (1,), generator=g)), 16, generator=g)
    text = torch.randn(int(torch.randint(2, 20, (1,), generator=g)), 16, generator=g)
    assert select_raters(visual, text).tolist() == ref_raters(visual, text)


@pytest.mark.parametrize("seed", range(12))
def test_stage_equals_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 120, (1,), generator=g))
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    hidden = torch.randn(n, 8, generator=g, dtype=torch.float64)
    for k in sorted({0, 1, n // 3, n // 2, n - 1}):
        kept, centres, merged, groups = sparsevlm_select(scores, hidden, k)
        want_kept, want_centres, want_merged = ref_stage(scores.tolist(), hidden, k)
        assert kept.tolist() == want_kept and centres.tolist() == want_centres, (n, k)
        assert len(merged) == len(want_merged) == stage_total(n, k) - k
        for got, want in zip(merged, want_merged, strict=True):
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-9, atol=1e-12)
        assert set(groups[1].tolist()) <= set(centres.tolist())


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.9, 0.1, 0.5, 0.5])
    hidden = torch.ones(8, 4)  # every distance and density equal: the tie rules alone decide
    kept, centres, merged, _ = sparsevlm_select(scores, hidden, 3)
    want_kept, want_centres, _ = ref_stage(scores.tolist(), hidden, 3)
    assert kept.tolist() == want_kept == [0, 1, 4]
    assert centres.tolist() == want_centres == [2]  # candidates: the best 2 dropped (2, 3); cluster centre 2
    torch.testing.assert_close(merged[0], torch.ones(4) * 2 / (2 + 1e-6))


def test_counts():
    assert official_totals(192, 576) == [309, 204, 113]
    assert official_totals(128, 576) == [312, 117, 39]
    assert official_totals(64, 576) == [82, 32, 18]
    for v in (1, 2, 7, 50, 576):
        reach = {stage_total(v, k) for k in range(v)}
        assert reach == set(range(stage_total(v, 0), v + 1))  # every total in range is reachable
        for t in sorted(reach):
            assert stage_total(v, scored_count(v, t)) == t
    assert default_prune_layers(32) == (2, 6, 15) and default_prune_layers(2) == (0,)


@pytest.mark.parametrize("n", [16, 48, 80, 576, 2880])
@pytest.mark.parametrize("fraction", [0.111, 0.222, 0.333, 0.5])
def test_schedule_meets_the_layer_average(n, fraction):
    layers, depth = (2, 6, 15), 32
    target = max(1, round(fraction * n))
    if layer_average(n, floor_totals(n, 3), layers, depth) > target + 0.5:  # below what the stages can reach
        with pytest.raises(BudgetError, match="smallest reachable keep"):
            check_budget(target, target, n, [n], layers, depth)
        return
    totals = sparsevlm_schedule(target, n, layers, depth)
    assert totals == check_budget(target, target, n, [n], layers, depth)
    assert totals == sorted(totals, reverse=True) and totals[0] <= n
    assert abs(layer_average(n, totals, layers, depth) - target) <= 0.5


# ------------------------------------------------------------------------------------------ options
def test_bad_options_are_refused():
    vlm = get_tiny("llava")
    with pytest.raises(PolicyOptionError, match="schedule"):
        SparseVLMPolicy(schedule="nope")
    with pytest.raises(PolicyOptionError, match="three stages"):
        SparseVLMPolicy(schedule="official", prune_layers=(1, 2))
    with pytest.raises(PolicyOptionError, match="64, 128 and 192"):
        tokenzip.apply(vlm.model, "sparsevlm", 0.5, schedule="official").remove()
    with pytest.raises(PolicyOptionError, match="no layer after"):
        tokenzip.apply(vlm.model, "sparsevlm", 0.3, prune_layers=(1, 23)).remove()


def test_infeasible_budget_names_the_smallest_keep():
    vlm = get_tiny("llava")
    inputs = image_inputs(vlm, 1)
    with (
        tokenzip.apply(vlm.model, "sparsevlm", 0.05, prune_layers=(10, 12, 14)),
        torch.no_grad(),
        pytest.raises(BudgetError, match="smallest reachable keep"),
    ):
        vlm.model(**inputs)


# ------------------------------------------------------------------------------------------ in the model
@pytest.mark.parametrize("family", FAMILIES)
def test_the_policy_equals_the_reference_on_what_it_saw(family, monkeypatch):
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 2)
    seen = []
    original = SparseVLMPolicy.select_llm

    def spy(self, ctx):
        out = original(self, ctx)
        seen.append((ctx, out))
        return out

    monkeypatch.setattr(SparseVLMPolicy, "select_llm", spy)
    with tokenzip.apply(vlm.model, "sparsevlm", 0.3) as patch, torch.no_grad():
        vlm.model(**inputs)
    assert len(seen) == 3
    for ctx, out in seen:
        stage = ctx.layer - 1
        rows = ctx.signals[f"llm.rows_from_visual@{stage}"]
        embeds = ctx.signals["llm.hidden@0"]
        layout, layout0 = ctx.layout, ctx.input_layout
        for b, sel in enumerate(out):
            visual0 = layout0.visual_slots(b)
            text0 = [
                s for s in range(layout0.length) if layout0.valid[b, s] and layout0.item[b, s] < 0 and s > visual0.max()
            ]
            raters0 = [text0[j] for j in ref_raters(embeds[b, visual0].float(), embeds[b, text0].float())] or text0
            visual = layout.visual_slots(b)
            raters = [s for s in range(layout.length) if int(layout.lm_src[b, s]) in raters0 and layout.valid[b, s]]
            scores = rows[b][raters][:, visual].float().mean(0)
            n_kept = int(sel.keep.numel())
            if n_kept == visual.numel():  # this stage keeps every token
                continue
            k = next(k for k in range(visual.numel()) if stage_total(visual.numel(), k) == n_kept)
            want_kept, want_centres, want_merged = ref_stage(scores.tolist(), ctx.hidden_states[b, visual], k)
            assert sel.keep.tolist() == visual[want_kept + want_centres].tolist()
            got = sel.values[len(want_kept) :].double()
            torch.testing.assert_close(got, torch.stack(want_merged).to(got.dtype), rtol=1e-4, atol=1e-4)
    for sample in patch.stats.last.samples:
        assert sample.on_budget


@pytest.mark.parametrize("keep", [0.111, 64])
def test_the_official_schedule_runs_its_counts(keep):
    vlm = get_tiny("llava")  # 64 tokens per image, 24 layers: pruning after (2, 4, 11)
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "sparsevlm", keep, schedule="official") as patch, torch.no_grad():
        vlm.model(**inputs)
    counts = patch.stats.last.samples[0].visual_per_layer
    t = official_totals(64, 64)  # kept round((66, 30, 17) * 64 / 576) = (7, 3, 2), plus recycling
    assert counts == [64] * 3 + [t[0]] * 2 + [t[1]] * 7 + [t[2]] * 12
