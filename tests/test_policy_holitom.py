"""HoliTom: the pure functions against the spec's reference (§3-§5, §9, §11.5, §12 items 1-8) and model-level
behaviour on the tiny offline models (§12 items 9-12).

The reference below is written from the spec's pseudo-code (§9) and the official code's semantics with plain
Python loops, lists and sets: distances in float64, one token at a time, noise drawn only where the official
code draws it. Model-level checks recompute the outer stage's inputs on their own (features from the model's
`get_video_features`, attention received from the eager vision tower's own `output_attentions`, pooled with the
model's `apply_pooling`) and the inner stage's inputs from the eager decoder's own attention weights and layer
outputs, never from tokenzip's signals.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import (
    assert_identity_and_restore,
    forward_with_hooks,
    get_tiny,
    image_inputs,
    single_inputs,
    video_inputs,
)
from test_policy_hiprune import _qwen_scores, _tower_scores
from test_positions import record_positions, record_rope_rows
from test_schedule import measured_lengths

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.adapters.base import ModelInfo
from tokenzip.budget import item_budget
from tokenzip.contexts import PreLLMItem, VisionSignal
from tokenzip.errors import PolicyOptionError
from tokenzip.items import GridPart, ItemShape, VisualItem
from tokenzip.policies.holitom import (
    HoliTomPolicy,
    default_inner_layer,
    dpc_knn_merge,
    holitom_outer,
    holitom_ratio,
    inner_merge,
    rescaled_ratio,
    segment_frames,
    temporal_similarity,
)
from tokenzip.reference import cached_greedy, greedy_tokens, uncached_logits
from tokenzip.tiny import ov_video_inputs, qwen_video_inputs

# --------------------------------------------------------------------------------------------------------------
# The spec's §9 reference, one element at a time


def ref_cosines(frames: torch.Tensor) -> list[list[float]]:
    """sigma[t][j] = cos(E[t, j], E[t + 1, j]) in float64."""
    e = frames.double()
    out = []
    for t in range(e.shape[0] - 1):
        row = []
        for j in range(e.shape[1]):
            a, b = e[t, j], e[t + 1, j]
            row.append(float(a @ b) / (float(a.norm()) * float(b.norm())))
        out.append(row)
    return out


def ref_segments(sig: list[list[float]], tau: float, wmax: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """§3 DP: strict > in increasing window length (ties keep the single frame, then the shorter window).

    The official `feature_sim > tau` compares a float32 tensor with a Python float, i.e. against float32(tau)."""
    n_frames = len(sig) + 1
    n_tokens = len(sig[0]) if sig else 0
    tau = float(np.float32(tau))

    def gain(s: int, e: int) -> int:
        if e <= s:
            return 0
        return sum(all(sig[t][j] > tau for t in range(s, e)) for j in range(n_tokens)) * (e - s)

    best, start = {-1: 0}, {}
    for i in range(n_frames):
        best[i], start[i] = best[i - 1], i
        for length in range(2, min(i + 1, wmax) + 1):
            value = best[i - length] + gain(i - length + 1, i)
            if value > best[i]:
                best[i], start[i] = value, i - length + 1
    segments, i = [], n_frames - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1], best[n_frames - 1]


def ref_ratio(rho: float, n_frames: int, n_tokens: int, saved: float) -> float:
    """rho' as the official code evaluates it: Python floats, R = dp[-1].item() (a float32 total)."""
    total = n_frames * n_tokens
    return min(rho / ((total - saved) / total), 1)


def ref_topk(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[: max(0, k)]


def ref_dpc(z: torch.Tensor, k_sta: int, knn: int, beta: float | None, noise: list[float] | None = None):
    """§4 / §9 dpc_knn_merge: (centres ascending, merged rows, members per centre, densities).

    Distances in float64; the density (+ noise) is a float32 value as in the official code, so that the noise
    breaks exact ties at float32 resolution."""
    n, d = z.shape
    if k_sta <= 0 or n == 0:
        return [], [], {}, []
    z64 = z.double()
    dist = ((z64[:, None] - z64[None]) ** 2).sum(-1).sqrt() / math.sqrt(d)
    dist_rows = dist.tolist()
    k = min(knn, n)
    density = []
    for i in range(n):
        nearest = sorted(x * x for x in dist_rows[i])[:k]  # self (distance 0) included
        value = np.float32(math.exp(-sum(nearest) / k))
        density.append(float(value + np.float32(noise[i]) if noise is not None else value))
    largest = max(max(row) for row in dist_rows)
    score = []
    for i in range(n):
        denser = [dist_rows[i][j] for j in range(n) if density[j] > density[i]]
        score.append(density[i] * (min(denser) if denser else largest))
    centres = sorted(ref_topk(score, k_sta))
    members: dict[int, list[int]] = {c: [] for c in centres}
    for i in range(n):
        if i not in members:
            members[min(centres, key=lambda c: (dist_rows[i][c], c))].append(i)
    merged = []
    for c in centres:
        if not members[c]:
            merged.append(z[c])
        elif beta is None:
            merged.append(torch.stack([z[c]] + [z[m] for m in members[c]]).mean(0))
        else:
            merged.append(beta * z[c] + (1 - beta) * torch.stack([z[m] for m in members[c]]).mean(0))
    return centres, merged, members, density


def ref_outer(frames, attention, rho, tau, beta=0.6, knn=7, wmax=1024, noise=None):
    """§9 holitom_outer: (representatives [(frame, position)], values, segments, rho', merged output slots).

    `noise(n)` is called once per clustering call that the official code makes (k_sta > 0 only)."""
    n_frames, n_tokens, _ = frames.shape
    sig = ref_cosines(frames)
    segments, saved = ref_segments(sig, tau, wmax) if n_frames > 1 else ([(0, 0)], 0)
    ratio = ref_ratio(rho, n_frames, n_tokens, float(saved))
    reps, values, merged_slots = [], [], []
    for s, e in segments:
        if s == e:
            for j in sorted(ref_topk(attention[s].tolist(), math.ceil(n_tokens * ratio))):
                reps.append((s, j))
                values.append(frames[s, j])
            continue
        static = [j for j in range(n_tokens) if all(sig[t][j] > tau for t in range(s, e))]
        dynamic = [j for j in range(n_tokens) if j not in static]
        z = frames[s : e + 1][:, static].mean(0)  # the official expression: mean over the window's frames
        k_sta = round(len(static) * ratio)  # Python round: ties to even
        if k_sta > 0:
            centres, merged, members, _ = ref_dpc(
                z, k_sta, min(knn, k_sta), beta, noise(len(static)).tolist() if noise else None
            )
            for c, value in zip(centres, merged, strict=True):
                if members[c]:
                    merged_slots.append(len(reps))
                reps.append((s, static[c]))
                values.append(value)
        k_dyn = math.ceil(len(dynamic) * ratio)
        for t in range(s, e + 1):
            for i in sorted(ref_topk([float(attention[t, j]) for j in dynamic], k_dyn)):
                reps.append((t, dynamic[i]))
                values.append(frames[t, dynamic[i]])
    return reps, values, segments, ratio, merged_slots


def ref_inner(hidden: torch.Tensor, weights: list[float], r: float) -> tuple[list[int], torch.Tensor]:
    """§5 / §9 holitom_inner: similarities once, then sequential in-place (h + h_q) / 2 in ascending q order."""
    n = hidden.shape[0]
    top = ref_topk(weights, round(n * (1 - r)))  # descending weight
    rest = [i for i in range(n) if i not in set(top)]
    h = hidden.clone()
    unit = hidden.double() / hidden.double().norm(dim=-1, keepdim=True)
    targets = []
    for q in rest:
        sims = [float(unit[q] @ unit[t]) for t in top]
        targets.append(top[max(range(len(top)), key=lambda i: (sims[i], -i))])
    for q, t in zip(rest, targets, strict=True):
        h[t] = (h[t] + h[q]) / 2
    kept = sorted(top)
    return kept, h[kept]


def _reps(result) -> list[tuple[int, int]]:
    return [tuple(r) for r in result[0].tolist()]


# --------------------------------------------------------------------------------------------------------------
# 1. Segmentation


def test_segments_without_static_tokens_are_single_frames():
    """sigma <= tau everywhere -> F singletons, R = 0; sigma == tau exactly is not static (strict >)."""
    tau = 0.8
    for sig in (torch.full((7, 5), tau), torch.rand(7, 5, generator=torch.Generator().manual_seed(0)) * tau):
        segments, saved = segment_frames(sig, tau)
        assert segments == [(i, i) for i in range(8)] and saved == 0
    just_above = torch.full((7, 5), tau)
    just_above[:, 2] = torch.nextafter(torch.tensor(tau), torch.tensor(2.0))  # the next float32: static
    assert segment_frames(just_above, tau) == ([(0, 7)], 7.0)


def test_segments_four_frames_one_static_token():
    """F = 4, N = 2: token 0 static over all pairs, token 1 never -> one segment [0, 3] with R = 1 * 3."""
    sig = torch.tensor([[0.9, 0.1], [0.95, 0.2], [0.99, 0.3]])
    assert segment_frames(sig, 0.8) == ([(0, 3)], 3.0)
    assert ref_segments(sig.tolist(), 0.8) == ([(0, 3)], 3)


def test_segment_ties_prefer_the_single_frame():
    """F = 3, N = 2: [0, 1] saves 1 (token 0), then frame 2 alone (best[1] = 1) ties with [1, 2] (best[0] + 1 = 1):
    the strict comparison keeps the single frame -> [(0, 1), (2, 2)], never [(0, 0), (1, 2)]."""
    sig = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert segment_frames(sig, 0.8) == ([(0, 1), (2, 2)], 1.0)
    assert ref_segments(sig.tolist(), 0.8) == ([(0, 1), (2, 2)], 1)


def test_segments_equal_the_loop_reference_on_seeded_sigma():
    """Random sigma (F <= 32), quantised so that exact ties in gain and sigma == tau occur; several max windows."""
    for seed in range(150):
        g = torch.Generator().manual_seed(seed)
        n_frames = int(torch.randint(2, 33, (1,), generator=g))
        n_tokens = int(torch.randint(1, 7, (1,), generator=g))
        levels = torch.tensor([0.2, 0.5, 0.8, 0.9, 0.95])
        sig = levels[torch.randint(0, 5, (n_frames - 1, n_tokens), generator=g)]
        for wmax in (2, 3, 1024):
            got = segment_frames(sig, 0.8, wmax)
            want = ref_segments(sig.tolist(), 0.8, wmax)
            assert got[0] == want[0] and got[1] == want[1], (seed, wmax)
            assert all(e - s + 1 <= wmax for s, e in got[0])
            assert [s for s, _ in got[0]] == [0] + [e + 1 for _, e in got[0][:-1]]  # a partition, in order


def test_temporal_similarity_is_the_cosine_of_the_same_position_in_the_next_frame():
    """sigma[t, j] = cos(E[t, j], E[t + 1, j]), [F - 1, N], against a float64 loop."""
    g = torch.Generator().manual_seed(3)
    frames = torch.randn(5, 7, 16, generator=g)
    torch.testing.assert_close(
        temporal_similarity(frames).double(), torch.tensor(ref_cosines(frames), dtype=torch.float64), atol=1e-6, rtol=0
    )


# --------------------------------------------------------------------------------------------------------------
# 2-3. rho' and the per-segment counts


def test_rescaled_ratio_is_the_official_expression_bit_for_bit():
    """rho' = min(rho / ((F N - R) / (F N)), 1) in that order; the official code evaluates it with Python floats
    (R = dp[-1].item()), and a float32 evaluation would move ceil(N rho') by one token at integer products."""
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        n_frames, n_tokens = int(torch.randint(1, 65, (1,), generator=g)), int(torch.randint(1, 800, (1,), generator=g))
        saved = float(torch.randint(0, n_frames * n_tokens, (1,), generator=g))
        rho = float(torch.rand(1, generator=g))
        got = rescaled_ratio(rho, n_frames, n_tokens, saved)
        assert got == ref_ratio(rho, n_frames, n_tokens, saved)
    assert rescaled_ratio(0.1, 2, 10, 0.0) == 0.1 and math.ceil(10 * rescaled_ratio(0.1, 2, 10, 0.0)) == 1
    assert rescaled_ratio(0.6, 4, 5, 12.0) == 1  # 0.6 / 0.4 clamps to 1


def _window_video(n_tokens: int, static: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two frames, d = 8: `static` positions repeat (sigma = 1), the others are unrelated (sigma <= 0)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(n_tokens, 8, generator=g)
    second = torch.randn(n_tokens, 8, generator=g)
    for j in range(n_tokens):
        if j in static:
            second[j] = first[j]
        elif float(first[j] @ second[j]) > 0:
            second[j] = -second[j]
    return torch.stack([first, second]), torch.rand(2, n_tokens, generator=g)


@pytest.mark.parametrize(("n_static", "k_static", "k_dynamic"), [(5, 2, 2), (7, 4, 1)])
def test_static_count_is_bankers_rounding_and_dynamic_count_a_ceiling(n_static, k_static, k_dynamic):
    """A two-frame window with n_static static tokens of N = 8 and rho' = 0.5 exactly: round(2.5) = 2,
    round(3.5) = 4 static centres; ceil(n_dyn / 2) dynamic tokens per frame (ceil(1.5) = 2, ceil(0.5) = 1)."""
    n_tokens = 8
    static = list(range(1, 1 + n_static))
    frames, attention = _window_video(n_tokens, static)
    rho = 0.5 * (2 * n_tokens - n_static) / (2 * n_tokens)  # dyadic: rho' = rho / ((16 - n_s) / 16) = 0.5
    assert ref_ratio(rho, 2, n_tokens, float(n_static)) == 0.5
    reps, _, segments = holitom_outer(frames, attention, rho, 0.8)
    assert segments == [(0, 1)]
    static_reps = [(f, j) for f, j in reps.tolist() if j in static]
    assert len(static_reps) == k_static and all(f == 0 for f, _ in static_reps)
    for t in (0, 1):
        assert sum(1 for f, j in reps.tolist() if f == t and j not in static) == k_dynamic
    assert _reps((reps,)) == ref_outer(frames, attention, rho, 0.8)[0]


def test_single_frame_count_is_a_ceiling():
    """Singletons keep ceil(N rho') tokens by attention, ascending (F = 1: rho' = rho; 10 * 0.25 -> 3)."""
    g = torch.Generator().manual_seed(1)
    frames, attention = torch.randn(1, 10, 4, generator=g), torch.rand(1, 10, generator=g)
    reps, values, segments = holitom_outer(frames, attention, 0.25, 0.8)
    want = sorted(ref_topk(attention[0].tolist(), 3))
    assert segments == [(0, 0)] and reps.tolist() == [[0, j] for j in want]
    assert torch.equal(values, frames[0, want])


# --------------------------------------------------------------------------------------------------------------
# 4-5. DPC-kNN clustering and the merge values


def test_dpc_knn_merge_equals_the_loop_reference_without_noise():
    """Centres (ascending) and members as the loop reference, for n <= 25 (exact-distance cdist path: structural
    density ties such as mutual nearest neighbours go to the lower index) and n > 25 with k' >= 3."""
    checked = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, 26, (1,), generator=g)) if seed % 3 else int(torch.randint(26, 70, (1,), generator=g))
        z = torch.randn(n, 12, generator=g)
        k_sta = int(torch.randint(0, n + 1, (1,), generator=g))
        knn = min(7, k_sta) if n <= 25 else max(3, min(7, k_sta))
        for beta in (0.6, None):
            centres, merged = dpc_knn_merge(z, k_sta, knn, beta, None)
            want, want_values, _, _ = ref_dpc(z, k_sta, knn, beta)
            assert centres.tolist() == want, (seed, beta)
            assert torch.equal(centres, torch.sort(centres).values)
            assert merged.shape == (len(want), 12) and merged.dtype == z.dtype
            if want:
                torch.testing.assert_close(merged, torch.stack(want_values), atol=1e-6, rtol=0)
            checked += len(want)
    assert checked > 200


def test_dpc_knn_merge_with_global_noise_equals_the_reference_seeded_the_same_way():
    """Duplicated points tie exactly in density; the U(0, 1e-6) noise from the global RNG decides which copy
    becomes a centre. torch.manual_seed before each call gives the reference's torch.rand draws."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    z = torch.cat([base, base])  # i and i + 6 are identical
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        centres, merged = dpc_knn_merge(z, 4, 4, 0.6, torch.rand(12) * 1e-6)
        torch.manual_seed(seed)
        want, want_values, _, _ = ref_dpc(z, 4, 4, 0.6, (torch.rand(12) * 1e-6).tolist())
        assert centres.tolist() == want
        torch.testing.assert_close(merged, torch.stack(want_values), atol=1e-6, rtol=0)
        outcomes.add(tuple(want))
    assert len(outcomes) > 1  # the noise really decides
    no_noise, _ = dpc_knn_merge(z, 4, 4, 0.6, None)
    assert no_noise.tolist() == ref_dpc(z, 4, 4, 0.6)[0]


def test_outer_uses_k_prime_min_7_k_static():
    """holitom_outer clusters with k' = min(knn, k_sta): find a window whose centres differ between k' = 3 and
    k' = 7; the library's centres are the k' = 3 ones (k_sta = round(20 * 0.15) = 3)."""
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        first = torch.randn(20, 6, generator=g)
        frames = torch.stack([first, first])  # every token static
        z = frames.mean(0)
        small, large = ref_dpc(z, 3, 3, 0.6)[0], ref_dpc(z, 3, 7, 0.6)[0]
        if small == large:
            continue
        attention = torch.rand(2, 20, generator=g)
        rho = 0.15 * 20 / 40  # rho' = rho / (20 / 40) = 0.15
        reps, _, segments = holitom_outer(frames, attention, rho, 0.8, knn=7)
        assert segments == [(0, 1)]
        assert [j for _, j in reps.tolist()] == small
        assert [j for _, j in _reps(holitom_outer(frames, attention, rho, 0.8, knn=2))] == ref_dpc(z, 3, 2, 0.6)[0]
        return
    raise AssertionError("no seed separates k' = 3 from k' = 7")


def test_densest_point_is_always_a_centre_and_centres_ascend():
    """The densest point's delta is the largest distance of the set, so density * delta ranks it first (n <= 25:
    the exact-distance path, where equal densities stay equal and the lowest tied index counts as densest)."""
    for seed in range(60):
        g = torch.Generator().manual_seed(100 + seed)
        n = int(torch.randint(2, 26, (1,), generator=g))
        z = torch.randn(n, 5, generator=g) * torch.rand(n, 1, generator=g)
        k_sta = int(torch.randint(1, n + 1, (1,), generator=g))
        centres, _ = dpc_knn_merge(z, k_sta, min(7, k_sta), 0.6, None)
        density = ref_dpc(z, k_sta, min(7, k_sta), 0.6)[3]
        assert max(range(n), key=lambda i: (density[i], -i)) in centres.tolist()
        assert centres.tolist() == sorted(set(centres.tolist())) and len(centres) == k_sta


def _merge_probe() -> torch.Tensor:
    """Dyadic points (all sums exact): c densest, m1 and m2 next to it, f apart; k_sta = 2 -> centres c and f."""
    shift = torch.tensor([0.5, 0.25])
    pts = torch.tensor([[0.0, 0.0], [0.125, 0.0], [-0.1875, 0.0], [1.0, 0.0]]) + shift
    return pts[[3, 1, 0, 2]]  # f, m1, c, m2 -> c = 2, members 1 and 3, f = 0 alone


@pytest.mark.parametrize("beta", [0.6, 0.3, None])
def test_merge_values(beta):
    """Centre c with members m1, m2 -> beta c + (1 - beta) mean(m1, m2); a centre without members stays itself;
    beta None -> mean(c, m1, m2)."""
    z = _merge_probe()
    centres, merged = dpc_knn_merge(z, 2, 3, beta, None)
    assert centres.tolist() == [0, 2] == ref_dpc(z, 2, 3, beta)[0]
    assert torch.equal(merged[0], z[0])
    if beta is None:
        assert torch.equal(merged[1], torch.stack([z[2], z[1], z[3]]).mean(0))
    else:
        assert torch.equal(merged[1], beta * z[2] + (1 - beta) * torch.stack([z[1], z[3]]).mean(0))
    if beta == 0.6:  # through the outer stage: a two-frame window of static tokens, rho' = 0.5 -> k_sta = 2
        reps, values, _ = holitom_outer(torch.stack([z, z]), torch.rand(2, 4), 0.25, 0.8)
        centres, _, members, _ = ref_dpc(z, 2, 2, beta)  # k' = min(7, 2) = 2
        assert reps.tolist() == [[0, c] for c in centres]
        for value, c in zip(values, centres, strict=True):
            if members[c]:
                assert torch.equal(value, beta * z[c] + (1 - beta) * z[members[c]].mean(0))
            else:
                assert torch.equal(value, z[c])


def test_static_merge_values_equal_the_reference_expression():
    """beta * c + (1 - beta) * mean(members) (beta None: mean of centre and members) per cluster, the official
    expression, to float32 rounding: tokenzip sums all clusters' members at once (index_add_), torch.mean sums one
    cluster in another order, so the last bit may differ (spec §12.6 asks for 0.0; the order is the only
    difference). Clusters of 3+ members make any other formula miss by far more than the tolerance."""
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(24, 16, generator=g)
        for beta in (0.6, None):
            centres, merged = dpc_knn_merge(z, 4, 4, beta, None)
            want, values, _, _ = ref_dpc(z, 4, 4, beta)
            assert centres.tolist() == want
            torch.testing.assert_close(merged, torch.stack(values), atol=5e-7, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# 6. Output order and the full outer pipeline


def planted_video(seed: int = 0, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """12 x 196 (14 x 14): frames 0-4 share rows 0-6 (98 static tokens clustered around 12 prototypes, small
    per-frame noise), frames 5 and 6 are unrelated, frames 7-11 share columns 0-6; every other token is fresh
    noise in every frame. Attention: seeded uniform."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(12, 196, d, generator=g)
    rows, cols = torch.arange(196) // 14, torch.arange(196) % 14
    for region, span in ((rows < 7, range(0, 5)), (cols < 7, range(7, 12))):
        idx = region.nonzero().flatten()
        protos = torch.randn(12, d, generator=g)
        choice = torch.randint(0, 12, (idx.numel(),), generator=g)
        base = protos[choice] + 0.3 * torch.randn(idx.numel(), d, generator=g)
        for f in span:
            frames[f, idx] = base + 0.05 * torch.randn(idx.numel(), d, generator=g)
    return frames, torch.rand(12, 196, generator=g)


def test_outer_output_order_per_segment():
    """Per segment: [static (ascending centre position, at frame s), frame s dynamic, ..., frame e dynamic], each
    frame's dynamic tokens ascending; singletons ascending; segments in temporal order."""
    frames, attention = planted_video()
    reps, _, segments = holitom_outer(frames, attention, 0.15, 0.8)
    assert segments == [(0, 4), (5, 5), (6, 6), (7, 11)]
    rows, cols = torch.arange(196) // 14, torch.arange(196) % 14
    static_sets = {
        (0, 4): set((rows < 7).nonzero().flatten().tolist()),
        (7, 11): set((cols < 7).nonzero().flatten().tolist()),
    }
    pairs = [tuple(p) for p in reps.tolist()]
    cursor = 0
    for s, e in segments:
        static = static_sets.get((s, e), set())
        block = []
        while cursor < len(pairs) and s <= pairs[cursor][0] <= e:
            block.append(pairs[cursor])
            cursor += 1
        n_head = sum(1 for _, j in block if j in static)
        head, tail = block[:n_head], block[n_head:]
        assert all(f == s and j in static for f, j in head)  # static tokens first, at frame s
        assert [j for _, j in head] == sorted(j for _, j in head)
        assert [f for f, _ in tail] == sorted(f for f, _ in tail)  # then frame s, s + 1, ..., e
        assert {f for f, _ in tail} == set(range(s, e + 1))
        for t in range(s, e + 1):
            own = [j for f, j in tail if f == t]
            assert own == sorted(own) and not set(own) & static
    assert cursor == len(pairs)


@pytest.mark.parametrize("noise", ["off", "global", "seeded"])
def test_outer_pipeline_equals_the_reference_on_a_planted_video(noise):
    """Seeded 12 x 196 video, rho = 0.15, tau = 0.8: segments [(0, 4), (5, 5), (6, 6), (7, 11)], R = 2 * 98 * 4,
    rho' = 0.225; every output token's (frame, position) equals the reference's, in order; kept rows are
    bit-equal, merged static rows within 1e-6 (their bit-exactness is the next-but-one test's subject)."""
    frames, attention = planted_video()

    def seeded(n):
        return torch.rand(n, generator=torch.Generator().manual_seed(0)) * 1e-6

    fn = {"off": None, "global": lambda n: torch.rand(n) * 1e-6, "seeded": seeded}[noise]
    torch.manual_seed(11)
    reps, values, segments = holitom_outer(frames, attention, 0.15, 0.8, noise=fn)
    torch.manual_seed(11)
    want_reps, want_values, want_segments, ratio, merged_slots = ref_outer(frames, attention, 0.15, 0.8, noise=fn)
    assert segments == want_segments == [(0, 4), (5, 5), (6, 6), (7, 11)]
    assert ratio == 0.15 / ((2352 - 784) / 2352)
    k_sta, k_dyn, k_one = round(98 * ratio), math.ceil(98 * ratio), math.ceil(196 * ratio)
    assert (k_sta, k_dyn, k_one) == (22, 23, 45)
    assert reps.shape == (2 * (k_sta + 5 * k_dyn) + 2 * k_one, 2)
    assert _reps((reps,)) == want_reps
    assert len(merged_slots) > 10
    copied = [i for i in range(len(want_reps)) if i not in set(merged_slots)]
    assert torch.equal(values[copied], torch.stack(want_values)[copied])  # kept rows are the frames' own rows
    torch.testing.assert_close(values, torch.stack(want_values), atol=1e-6, rtol=0)


def test_global_noise_is_drawn_only_for_clustering_calls():
    """The official code draws torch.rand only when a window clusters (k_sta = round(n_static rho') > 0). Window
    [0, 1] has one static token and k_sta = round(0.35) = 0; window [2, 3] has 8 static tokens in identical pairs,
    so the noise picks the centres: after identical torch.manual_seed calls both must draw the same numbers (the
    global RNG ends in the same state) and choose the same copies."""
    g = torch.Generator().manual_seed(5)
    first, pair = torch.randn(8, 6, generator=g), torch.randn(4, 6, generator=g)
    second = -first
    second[0] = first[0]  # token 0: the only static token of frames 0-1
    later = pair.repeat(2, 1)  # tokens i and i + 4 identical; frames 2 and 3 identical
    video = torch.stack([first, second, later, later])
    attention = torch.rand(4, 8, generator=g)

    def noise(n):
        return torch.rand(n) * 1e-6

    differing = []
    for seed in range(10):
        torch.manual_seed(seed)
        got = _reps(holitom_outer(video, attention, 0.25, 0.8, noise=noise))
        got_next = torch.rand(1)
        torch.manual_seed(seed)
        want, _, segments, ratio, _ = ref_outer(video, attention, 0.25, 0.8, noise=noise)
        want_next = torch.rand(1)
        assert segments == [(0, 1), (2, 3)] and round(ratio) == 0 and round(8 * ratio) == 3
        if got != want or not torch.equal(got_next, want_next):
            differing.append(seed)
    assert not differing, f"seeds {differing}: the library draws noise for a window that does not cluster"


# --------------------------------------------------------------------------------------------------------------
# 7. Inner merge


def test_inner_merge_by_hand():
    """Tops T1 (index 0) and T2 (index 3); q1 = 1 and q2 = 2 are both most similar to T1 before any update (after
    T1 absorbs q1, q2 would prefer T2): T1 ends as T1 / 4 + q1 / 4 + q2 / 2, T2 unchanged; kept ascending."""
    t1, q1, q2, t2 = [1.0, 0.0], [1.0, -2.0], [1.0, 0.875], [0.0, 1.0]
    hidden = torch.tensor([t1, q1, q2, t2])
    unit = hidden / hidden.norm(dim=-1, keepdim=True)
    assert float(unit[2] @ unit[0]) > float(unit[2] @ unit[3])  # q2 -> T1 on the original states
    after = (hidden[0] + hidden[1]) / 2
    assert float(unit[2] @ (after / after.norm())) < float(unit[2] @ unit[3])  # ... but not after T1 absorbed q1
    kept, values = inner_merge(hidden, torch.tensor([0.8, 0.1, 0.2, 0.9]), 0.5)
    assert kept.tolist() == [0, 3]
    assert torch.equal(values[0], hidden[0] / 4 + hidden[1] / 4 + hidden[2] / 2)
    assert torch.equal(values[1], hidden[3])
    want_kept, want_values = ref_inner(hidden, [0.8, 0.1, 0.2, 0.9], 0.5)
    assert kept.tolist() == want_kept and torch.equal(values, want_values)


@pytest.mark.parametrize(("n", "r", "count"), [(5, 0.5, 2), (7, 0.5, 4), (6, 0.5, 3), (13, 0.5, 6), (10, 0.3, 7)])
def test_inner_count_is_bankers_rounding(n, r, count):
    """round(n (1 - r)): 2.5 -> 2, 3.5 -> 4, 6.5 -> 6."""
    g = torch.Generator().manual_seed(n)
    weights = torch.rand(n, generator=g)
    kept, values = inner_merge(torch.randn(n, 4, generator=g), weights, r)
    assert kept.numel() == count == round(n * (1 - r)) and values.shape == (count, 4)
    assert kept.tolist() == sorted(ref_topk(weights.tolist(), count))


def test_inner_merge_equals_the_sequential_reference():
    """Random states (float32): kept indices ascending and values bit-equal to the sequential in-place averaging."""
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 40, (1,), generator=g))
        hidden = torch.randn(n, 16, generator=g)
        weights = torch.rand(n, generator=g)
        if seed % 4 == 0:
            weights = (weights * 4).floor()  # tied weights: the lower index wins
        r = (0.5, 0.25, 0.75)[seed % 3]
        kept, values = inner_merge(hidden, weights, r)
        want_kept, want_values = ref_inner(hidden, weights.tolist(), r)
        assert kept.tolist() == want_kept
        assert torch.equal(values, want_values), seed


# --------------------------------------------------------------------------------------------------------------
# 8. keep -> (rho, r) and tau

# §11.5 worked numbers, N = 576, F = 1: keep -> (rho to 4 places, n_0, n_K, layer average to 1 place)
TABLE = {
    (32, 21): {0.111: (0.1340, 78, 39, 64.6), 0.222: (0.2681, 155, 78, 128.5), 0.333: (0.4021, 232, 116, 192.1)},
    (28, 18): {0.111: (0.1351, 78, 39, 64.1), 0.222: (0.2703, 156, 78, 128.1), 0.333: (0.4054, 234, 117, 192.2)},
    (36, 23): {0.111: (0.1355, 79, 40, 64.9), 0.222: (0.2709, 157, 78, 128.5), 0.333: (0.4064, 235, 118, 192.8)},
}


def _info(family: str, n_layers: int) -> ModelInfo:
    return ModelInfo(family, n_layers, 24, 22, family == "llava", "sdpa", family != "qwen2_5_vl", True, False)


@pytest.mark.parametrize(
    ("layers", "family"), [((32, 21), "llava"), ((28, 18), "qwen2_5_vl"), ((36, 23), "qwen2_5_vl")]
)
def test_keep_mapping_reproduces_the_spec_table(layers, family):
    """rho = keep L / (K + (L - K)(1 - r)) with keep counted as round(keep N) / N; n_0 = ceil(N rho),
    n_K = round(n_0 / 2) in the spec's table; the policy's nominal schedule is n_0 before K and, from K on, the
    count solved for the budget, round((L T - K n_0) / (L - K)), within three tokens of the table's and with a layer
    average within half a token of T (the table's is up to 0.9 off); w/o M: rho = keep."""
    n_layers, layer = layers
    assert default_inner_layer(n_layers) == layer
    shape = ItemShape("image", (GridPart(0, 1, 24, 24),))
    for keep, (rho4, n0, nk, average) in TABLE[layers].items():
        assert round(holitom_ratio(keep, n_layers, layer, 0.5, True)[0], 4) == rho4  # the table's rho: raw keep
        fraction = item_budget(keep, 576) / 576  # the policy counts keep as round(keep N) / N
        rho, r = holitom_ratio(fraction, n_layers, layer, 0.5, True)
        assert r == 0.5 and rho == fraction * n_layers / (layer + (n_layers - layer) * 0.5)
        assert math.ceil(576 * rho) == n0 and round(n0 * 0.5) == nk
        assert round((layer * n0 + (n_layers - layer) * nk) / n_layers, 1) == average
        tokens = HoliTomPolicy().nominal(_info(family, n_layers), shape, keep).tokens
        target = item_budget(keep, 576)
        solved = round((n_layers * target - layer * n0) / (n_layers - layer))
        assert tokens == [n0] * layer + [solved] * (n_layers - layer) and abs(solved - nk) <= 3
        assert abs(sum(tokens) / n_layers - target) <= 0.5
        official = HoliTomPolicy(rho=rho).nominal(_info(family, n_layers), shape, keep).tokens  # explicit rho: r
        assert official == [n0] * layer + [nk] * (n_layers - layer)
        flat = HoliTomPolicy(inner=False).nominal(_info(family, n_layers), shape, keep).tokens
        assert flat == [round(keep * 576)] * n_layers
        assert holitom_ratio(fraction, n_layers, layer, 0.5, False) == (fraction, 0.0)
    assert [default_inner_layer(n) for n in (24, 28, 32, 36)] == [15, 18, 21, 23]


def test_keep_mapping_video_rows_and_the_clamp():
    """OV-7B video (L 28, K 18): keep 0.10 / 0.15 / 0.20 / 0.25 -> rho 0.1217 / 0.1826 / 0.2435 / 0.3043; rho > 1
    -> rho = 1 and r = clamp(1 - (keep L - K) / (L - K), 0, inner_r)."""
    for keep, rho4 in ((0.10, 0.1217), (0.15, 0.1826), (0.20, 0.2435), (0.25, 0.3043)):
        assert round(holitom_ratio(keep, 28, 18, 0.5, True)[0], 4) == rho4
    rho, r = holitom_ratio(0.9, 28, 18, 0.5, True)
    assert rho == 1.0 and r == pytest.approx(1 - (0.9 * 28 - 18) / 10) and 0 < r < 0.5
    assert holitom_ratio(1.0, 28, 18, 0.5, True) == (1.0, 0.0)
    rho, r = holitom_ratio(0.95, 28, 18, 0.2, True)  # 0.95 * 28 / 26 > 1: r = 1 - 0.86 = 0.14 <= inner_r
    assert rho == 1.0 and r == pytest.approx(1 - (0.95 * 28 - 18) / 10) and r <= 0.2


@pytest.mark.parametrize("keep", [53, 0.27, 63, 106, 40])
def test_one_shot_image_budget_is_exact(keep):
    """inner=False ("w/o M"): rho = keep, so an image of N = 196 content tokens keeps ceil(N rho) = round(keep N)
    tokens (53 for keep = 53 or 0.27): in the nominal schedule and in the selection itself. ceil(196 * (53 / 196))
    evaluated in floating point is 54."""
    info = ModelInfo("llava_onevision", 28, 26, 25, False, "sdpa", True, False, False)
    shape = ItemShape("image", (GridPart(0, 1, 14, 14),))
    want = item_budget(keep, 196)
    policy = HoliTomPolicy(inner=False)
    nominal = policy.nominal(info, shape, keep).tokens
    state = policy.plan(info, keep).state
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(196, generator=g)
    item = VisualItem(shape, 0, 0, 0, 0)
    signals = {VisionSignal("received", 25).key: scores}
    ctx = PreLLMItem(item, torch.randn(196, 8, generator=g), torch.arange(196), keep, signals, state=state)
    selection = policy.select_pre_llm(ctx)
    assert selection.keep.tolist() == sorted(ref_topk(scores.tolist(), want))
    assert nominal == [want] * 28


def test_tau_switches_at_rho_0_10():
    """tau = 0.65 when rho <= 0.10, else 0.80 (rho from keep or the `rho` option); the `tau` option overrides."""
    info = _info("llava_onevision", 28)

    def tau_of(keep, **options):
        policy = HoliTomPolicy(**options)
        return policy._ratios(policy.plan(info, keep).state, keep, 6272)

    assert tau_of(0.5, rho=0.10)[:2] == (0.10, 0.65)
    assert tau_of(0.5, rho=math.nextafter(0.10, 1.0))[1] == 0.80
    assert tau_of(0.5, rho=0.10, tau=0.9)[1] == 0.9
    rho, tau, r = tau_of(0.08)  # keep 0.08 -> rho = 0.08 * 28 / 23 = 0.0974
    assert rho == item_budget(0.08, 6272) / 6272 * 28 / 23 < 0.10 and tau == 0.65 and r == 0.5
    rho, tau, _ = tau_of(0.0822)
    assert rho > 0.10 and tau == 0.80
    assert tau_of(0.08, inner=False)[:2] == (item_budget(0.08, 6272) / 6272, 0.65)


# --------------------------------------------------------------------------------------------------------------
# Model level: LLaVA-OneVision video (the official family)

FRAMES = 8


@functools.cache
def planted_pixels() -> torch.Tensor:
    """8 frames of 56 x 56: frames 0-3 identical (every token static), frame 5 = frame 4 with a new top-left
    quadrant (three of four pooled tokens stay static), frames 6 and 7 unrelated."""
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(1, FRAMES, 3, 56, 56, generator=g)
    pix[0, 1:4] = pix[0, 0]
    pix[0, 5] = pix[0, 4]
    pix[0, 5, :, :28, :28] = torch.randn(3, 28, 28, generator=g)
    return pix


def ov_video(vlm, text: str = "Describe this video ?") -> dict:
    inputs = ov_video_inputs(vlm, frames=FRAMES, text=text)
    inputs["pixel_values_videos"] = planted_pixels().clone()
    return inputs


def ov_outer_inputs(vlm, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E [F, N, d] projected + pooled features without the newline, a [F, N] attention received at the feature
    layer: mean over heads and queries, pooled with the model's own bilinear `apply_pooling`)."""
    base = vlm.model.model
    cfg = vlm.model.config
    n = cfg.vision_config.num_hidden_layers
    layer = cfg.vision_feature_layer % (n + 1) - 1 if cfg.vision_feature_layer < 0 else cfg.vision_feature_layer
    out, scores = _tower_scores(vlm, lambda: base.get_video_features(pixel_values_videos=pixels), (layer,))
    frames = pixels.shape[1]
    features = out.pooler_output[0, :-1].reshape(frames, -1, cfg.text_config.hidden_size)
    with torch.no_grad():
        attention = base.apply_pooling(scores[layer][:, :, None])[..., 0]
    return features, attention


def ov_ratios(keep: float, n_content: int, n_layers: int = 24, r: float = 0.5) -> tuple[float, float, int]:
    """(rho, tau, K) of §11.5 for the tiny OneVision (24 layers)."""
    layer = round(18 * n_layers / 28)
    fraction = min(n_content, max(1, round(keep * n_content))) / n_content
    rho = fraction * n_layers / (layer + (n_layers - layer) * (1 - r))
    return rho, (0.65 if rho <= 0.10 else 0.80), layer


def seeded_noise(n: int) -> torch.Tensor:
    """tie_noise="seeded", noise_seed=0: the same U(0, 1e-6) draw from a fresh generator at every call."""
    return torch.rand(n, generator=torch.Generator().manual_seed(0)) * 1e-6


class Capture:
    """Hooks (registered after tokenzip's, so they see what the layers really get) on the decoder: layer-0 input,
    layer K-1 output and attention weights (eager), layer K input and position ids."""

    def __init__(self, vlm, layer: int):
        self.seen: dict[str, list] = {}
        layers = get_adapter(vlm.model).lm_layers
        self.handles = [
            layers[0].register_forward_pre_hook(self._pre("in0"), with_kwargs=True),
            layers[layer].register_forward_pre_hook(self._pre("inK"), with_kwargs=True),
            layers[layer - 1].register_forward_hook(self._post("outKm1")),
            layers[layer - 1].self_attn.register_forward_hook(self._post("attnKm1")),
        ]

    def _pre(self, name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.seen.setdefault(name, []).append((hidden.clone(), kwargs["position_ids"].clone()))

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.seen.setdefault(name, []).append(output[1] if name == "attnKm1" else output)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_onevision_video_outer_and_inner_stages_equal_the_reference():
    """Eager tiny OneVision, planted 8-frame video, keep 0.25 (rho = 0.25 * 24 / 19.5, tau 0.8, K = 15, seeded
    noise): the video run entering the LLM is the reference's outer tokens + the trailing newline, with a rebuilt
    placeholder run; before layer K the content tokens keep the top n_K = round((L T - K n_0) / (L - K)) by the
    last prompt token's layer K-1 attention (the module's budget rule: the layer average meets T = 8) with the
    sequentially merged states and their original positions, the newline kept as it is; layers >= K process and
    cache n_K visual tokens; decode positions continue from the layer-0 length."""
    vlm = get_tiny("llava_onevision", "eager")
    inputs = ov_video(vlm)
    frames, attention = ov_outer_inputs(vlm, inputs["pixel_values_videos"])
    n_frames, n_tokens = frames.shape[:2]
    rho, tau, layer = ov_ratios(0.25, n_frames * n_tokens)
    reps, values, segments, _, _ = ref_outer(frames, attention, rho, tau, noise=seeded_noise)
    assert segments == [(0, 3), (4, 5), (6, 6), (7, 7)]  # the planted structure
    n_out = len(reps)
    newline = vlm.model.model.image_newline
    video_id = vlm.model.config.video_token_id
    v0 = int((inputs["input_ids"][0] == video_id).nonzero()[0])
    text = inputs["input_ids"].shape[1] - (n_frames * n_tokens + 1)
    with tokenzip.apply(vlm.model, "holitom", 0.25) as patch:
        capture = Capture(vlm, layer)
        try:
            lengths, cache = measured_lengths(vlm, inputs)
        finally:
            capture.remove()
        record = patch.stats.last
        layer_k = get_adapter(vlm.model).lm_layers[layer]
        decode_positions = record_positions(layer_k, lambda: cached_greedy(vlm.model, inputs, 3))
    item = record.samples[0].items[0]
    # outer stage: representatives, order, newline last, placeholder run = outer tokens + 1
    assert item.kept == n_out
    assert item.kept_indices.tolist() == [f * n_tokens + j for f, j in reps] + [n_frames * n_tokens]
    embeds, positions0 = capture.seen["in0"][0]
    length0 = text + n_out + 1
    assert embeds.shape[1] == length0 and torch.equal(positions0[0], torch.arange(length0))
    assert torch.equal(embeds[0, v0 : v0 + n_out], torch.stack(values))
    assert torch.equal(embeds[0, v0 + n_out], newline.to(embeds.dtype))
    # inner stage: scores from the eager layer K-1's own attention weights, states from its output
    span = torch.arange(v0, v0 + n_out + 1)
    weights = capture.seen["attnKm1"][0][0, :, -1].mean(0)[span].tolist()
    hidden = capture.seen["outKm1"][0][0]
    budget = item_budget(0.25, n_frames * n_tokens)
    n_k = min(n_out, max(1, round((24 * budget - layer * n_out) / (24 - layer))))
    assert n_k < round((n_out + 1) * 0.5)  # the fixed r = 0.5 (newline counted) would overshoot the budget
    kept, merged = ref_inner(hidden[span[:-1]], weights[:-1], 1 - n_k / n_out)
    assert len(kept) == n_k
    keep_rows = torch.cat([torch.arange(v0), v0 + torch.tensor(kept), torch.arange(v0 + n_out, length0)])
    got_hidden, got_positions = capture.seen["inK"][0]
    assert torch.equal(got_positions[0], keep_rows)  # original (post-outer) positions, not compacted
    assert torch.equal(got_hidden[0, v0 : v0 + n_k], merged)
    assert torch.equal(got_hidden[0, :v0], hidden[:v0])
    assert torch.equal(got_hidden[0, v0 + n_k :], hidden[v0 + n_out :])  # the newline, then the text
    # per-layer counts: processed, cached, and in the stats (the newline is structural, not content)
    sample = record.samples[0]
    assert lengths == [length0] * layer + [length0 - (n_out - n_k)] * (24 - layer)
    assert cache == lengths and sample.cache_per_layer == lengths and sample.sequence_per_layer == lengths
    assert sample.visual_per_layer == [n_out] * layer + [n_k] * (24 - layer)
    assert abs(sum(sample.visual_per_layer) / 24 - budget) <= 0.5
    # decode at layer K continues from the layer-0 length
    assert torch.equal(decode_positions[0][0], keep_rows)
    assert [int(p) for p in decode_positions[1:]] == [length0, length0 + 1]


def test_onevision_video_tie_noise_modes():
    """inner=False (rho = keep = 0.25, rho' = 0.47): window [0, 3] clusters 4 static tokens with k' = 2 (exact
    density ties between mutual nearest neighbours) and window [4, 5] 3 with k' = 1 (all densities 1): the noise
    decides. "global": the reference drawing torch.rand after the same torch.manual_seed (several outcomes);
    "seeded": a fresh generator seeded with noise_seed at every call, whatever the global RNG; "off": no noise."""
    vlm = get_tiny("llava_onevision", "eager")
    inputs = ov_video(vlm)
    frames, attention = ov_outer_inputs(vlm, inputs["pixel_values_videos"])
    rho = item_budget(0.25, 32) / 32

    def kept(seed, **options):
        with tokenzip.apply(vlm.model, "holitom", 0.25, inner=False, **options) as patch:
            torch.manual_seed(seed)
            with torch.no_grad():
                vlm.model(**inputs)
            return patch.stats.last.samples[0].items[0].kept_indices.tolist()

    def expected(noise):
        return [f * 4 + j for f, j in ref_outer(frames, attention, rho, 0.8, noise=noise)[0]] + [32]

    outcomes = set()
    for seed in range(3):
        torch.manual_seed(seed)
        want = expected(lambda n: torch.rand(n) * 1e-6)
        assert kept(seed, tie_noise="global") == want
        outcomes.add(tuple(want))
    assert len(outcomes) > 1
    for noise_seed in range(2):

        def fresh(n, noise_seed=noise_seed):
            return torch.rand(n, generator=torch.Generator().manual_seed(noise_seed)) * 1e-6

        want = expected(fresh)
        assert all(kept(seed, noise_seed=noise_seed) == want for seed in (0, 7))
    assert kept(0, tie_noise="off") == expected(None)


def test_onevision_video_cached_generation_equals_the_replayed_recompute():
    """Cached greedy generate equals a cache-free recomputation under the same outer result and inner groups."""
    vlm = get_tiny("llava_onevision", "sdpa")
    inputs = ov_video(vlm)
    with tokenzip.apply(vlm.model, "holitom", 0.25) as patch:
        tokens, logits = cached_greedy(vlm.model, inputs, 4)
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy_tokens(vlm.model, reference), tokens)


def test_onevision_video_batch_equals_single_runs():
    """bs = 2 (two different videos and prompts, left padding) selects and generates as two bs = 1 runs."""
    vlm = get_tiny("llava_onevision", "sdpa")
    texts = ["Describe this video ?", "What is in the video ? Describe the color"]
    singles = [ov_video(vlm, text) for text in texts]
    singles[1]["pixel_values_videos"] = singles[1]["pixel_values_videos"].flip(1)  # frames reversed
    tok = vlm.processor.tokenizer
    tok.padding_side = "left"
    prompts = [tok.decode(s["input_ids"][0]) for s in singles]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert [int(m.sum()) for m in enc.attention_mask] == [s["input_ids"].shape[1] for s in singles]
    batch = dict(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        pixel_values_videos=torch.cat([s["pixel_values_videos"] for s in singles]),
    )
    with tokenzip.apply(vlm.model, "holitom", 0.25) as patch:
        batch_tokens, batch_logits = cached_greedy(vlm.model, batch, 3)
        batch_kept = [s.items[0].kept_indices for s in patch.stats.history[-1].samples]
        batch_layers = [s.visual_per_layer for s in patch.stats.history[-1].samples]
        for index, single in enumerate(singles):
            tokens, logits = cached_greedy(vlm.model, single, 3)
            sample = patch.stats.history[-1].samples[0]
            assert torch.equal(sample.items[0].kept_indices, batch_kept[index])
            assert sample.visual_per_layer == batch_layers[index]
            assert torch.equal(batch_tokens[index], tokens[0])
            torch.testing.assert_close(batch_logits[index], logits[0], atol=1e-4, rtol=1e-4)
    assert not torch.equal(batch_kept[0], batch_kept[1])


def test_noncausal_km1_option():
    """noncausal_km1=False: changing the last prompt token leaves every earlier state of layers K-2 and K-1
    unchanged (causal); True: layer K-1 alone attends bidirectionally in prefill, so its earlier states change,
    and its output equals the layer run with no mask on the same input."""
    vlm = get_tiny("llava_onevision", "eager")
    first = ov_video(vlm, "Describe this video ?")
    second = ov_video(vlm, "Describe this video .")
    assert first["input_ids"].shape == second["input_ids"].shape
    layers = get_adapter(vlm.model).lm_layers
    layer = default_inner_layer(24)

    def outputs(inputs, noncausal):
        seen = {}

        def keep_output(name):
            def hook(module, args, output):
                seen[name] = output

            return hook

        def keep_input(module, args, kwargs):
            seen["in"] = (args[0] if args else kwargs["hidden_states"], dict(kwargs))

        with tokenzip.apply(vlm.model, "holitom", 0.25, noncausal_km1=noncausal):
            handles = [
                layers[layer - 2].register_forward_hook(keep_output("km2")),
                layers[layer - 1].register_forward_hook(keep_output("km1")),
                layers[layer - 1].register_forward_pre_hook(keep_input, with_kwargs=True),
            ]
            forward_with_hooks(vlm.model, inputs, handles)
        return seen

    changed = int((first["input_ids"][0] != second["input_ids"][0]).nonzero()[0])
    for noncausal in (False, True):
        a, b = outputs(first, noncausal), outputs(second, noncausal)
        p = changed - (first["input_ids"].shape[1] - a["km1"].shape[1])  # after the outer stage
        assert not torch.equal(a["km1"][:, p:], b["km1"][:, p:])
        assert torch.equal(a["km2"][:, :p], b["km2"][:, :p])
        assert torch.equal(a["km1"][:, :p], b["km1"][:, :p]) is (not noncausal)
    hidden, kwargs = a["in"]
    with torch.no_grad():
        clean = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
        free = layers[layer - 1](hidden, **{**clean, "attention_mask": None, "use_cache": False})
    torch.testing.assert_close(free, a["km1"], atol=1e-6, rtol=1e-6)


def test_qwen_video_slices_are_frames_with_original_mrope_positions(monkeypatch):
    """Qwen2.5-VL video (8 frames -> 4 temporal slices of 4 x 4 merged tokens): slices 0 and 1 identical except
    merge window 0, slices 2 and 3 unrelated. Features = the merger outputs, attention = the last vision block's
    column mean per slice, 4 -> 1, in raster order; tie_noise is "off". The kept tokens are the reference's, in
    its order, and each keeps its own (t, h, w) M-RoPE row of the unpruned prompt (static tokens: slice s's)."""
    vlm = get_tiny("qwen2_5_vl", "eager")
    inputs = qwen_video_inputs(vlm, frames=8, side=112)
    flat, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    per_slice = int(grid[0, 1] * grid[0, 2])
    flat[per_slice : 2 * per_slice] = flat[:per_slice]
    flat[per_slice : per_slice + 4] = torch.randn(4, flat.shape[1], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = vlm.model.model.get_video_features(pixel_values_videos=flat, video_grid_thw=grid)
    layer = vlm.model.config.vision_config.depth - 1
    frames = out.pooler_output[0].reshape(4, 16, -1)
    attention = _qwen_scores(monkeypatch, vlm, flat, grid, (layer,), column_sum=False)[layer][0].reshape(4, 16)
    rho, tau, _ = ov_ratios(0.25, 64)
    reps, _, segments, _, _ = ref_outer(frames, attention, rho, tau, noise=None)
    assert segments[0] == (0, 1) and segments[1:] == [(2, 2), (3, 3)]
    base_rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 1))[0][:, 0]  # [3, L]
    with tokenzip.apply(vlm.model, "holitom", 0.25) as patch:
        rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 1))[0][:, 0]
        item = patch.stats.history[-1].samples[0].items[0]
    assert item.kept_indices.tolist() == [f * 16 + j for f, j in reps]
    start = int((inputs["input_ids"][0] == vlm.model.config.video_token_id).nonzero()[0])
    want = torch.cat([base_rows[:, :start], base_rows[:, start + item.kept_indices], base_rows[:, start + 64 :]], 1)
    assert torch.equal(rows, want)


# --------------------------------------------------------------------------------------------------------------
# Model level: images, identity, options


def test_llava_image_keeps_the_top_attention_tokens_and_merges_inside():
    """Images are the F = 1 case (image_mode="topk"): ceil(N rho) tokens by the feature layer's attention received
    (CLS key dropped), ascending; then the count that meets the budget from layer K on (9, where the fixed
    r = 0.5 gave 10 and a layer average of 16.25 against 16). "passthrough": all 64 enter the LLM, half of them
    from layer K on (the official fixed r)."""
    vlm = get_tiny("llava", "eager")
    inputs = image_inputs(vlm, 2)
    cfg = vlm.model.config
    feature = cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1) - 1
    pixels = inputs["pixel_values"]
    _, scores = _tower_scores(vlm, lambda: vlm.model.model.get_image_features(pixel_values=pixels), (feature,))
    rho = item_budget(0.25, 64) / 64 * 24 / (15 + 9 * 0.5)
    n0 = math.ceil(64 * rho)
    with tokenzip.apply(vlm.model, "holitom", 0.25) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        record = patch.stats.last
    for b, sample in enumerate(record.samples):
        assert sample.items[0].kept_indices.tolist() == sorted(ref_topk(scores[feature][b, 1:].tolist(), n0))
        solved = round((24 * 16 - 15 * n0) / 9)
        assert sample.visual_per_layer == [n0] * 15 + [solved] * 9 and (n0, solved) == (20, 9)
    with tokenzip.apply(vlm.model, "holitom", 0.25, image_mode="passthrough") as patch:
        with torch.no_grad():
            vlm.model(**single_inputs(vlm, 0))
        sample = patch.stats.last.samples[0]
    assert sample.visual_per_layer[:15] == [64] * 15 and sample.visual_per_layer[15:] == [32] * 9


@pytest.mark.parametrize("family", ["llava_onevision", "llava"])
def test_keep_one_is_identity_and_remove_restores(family):
    """keep = 1.0 leaves the logits bit-identical (OneVision video, LLaVA images); remove() restores them."""
    vlm = get_tiny(family, "sdpa")
    inputs = ov_video(vlm) if family == "llava_onevision" else image_inputs(vlm, 2)
    assert_identity_and_restore(vlm, inputs, "holitom")


@pytest.mark.parametrize(
    "options",
    [
        {"D": 0.1},
        {"beta": 1.5},
        {"beta": -0.1},
        {"inner_r": 1.0},
        {"inner_r": -0.5},
        {"rho": 0.0},
        {"rho": 1.5},
        {"tie_noise": "random"},
        {"image_mode": "drop"},
        {"knn": 0},
        {"max_window": 1},
        {"inner_layer": 0},
        {"inner_layer": 24},
        {"gamma": 1},
        {"inner": "no"},  # r13: a string is not a bool
        {"beta": "x"},  # r13
        {"tau": float("nan")},
        {"rho": float("inf")},
        {"inner": False, "inner_r": 0.3},  # would be silently ignored
        {"tie_noise": "off", "noise_seed": 3},  # would be silently ignored
    ],
)
def test_bad_options_raise(options):
    """Invalid or unknown options raise PolicyOptionError at apply() and leave no hook behind."""
    vlm = get_tiny("llava_onevision", "sdpa")
    with pytest.raises(PolicyOptionError):
        tokenzip.apply(vlm.model, "holitom", 0.25, **options)
    assert not get_adapter(vlm.model).lm_layers[0]._forward_pre_hooks  # nothing left behind


def test_onevision_short_video_lowers_rho_to_reach_the_budget():
    """A 4-frame x 2x2 OneVision video (16 tokens) at keep 0.25 (T = 4, K = 15 of 24): the mapped rho 0.308 keeps
    ceil(4 rho) = 2 tokens per frame, 8 in all, and 15 layers of 8 already exceed 24 (T + 1); the policy lowers rho
    until the outer count fits (1 per frame), so no BudgetError, the layer average meets T within one token, the
    newline is kept at layer K, and `nominal` predicts the measured per-layer lengths."""
    vlm = get_tiny("llava_onevision", "sdpa")
    inputs = video_inputs(vlm)
    info = get_adapter(vlm.model).info()
    with tokenzip.apply(vlm.model, "holitom", 0.25) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        sample = patch.stats.last.samples[0]
        shape = patch._runtime.state.items.all[0].shape
        nominal = patch.policy.nominal(info, shape, 0.25)
    assert shape.n_content == 16
    budget = item_budget(0.25, 16)
    layer = round(18 * 24 / 28)
    cap = (24 * (budget + 1) - (24 - layer)) // layer
    n0 = sample.visual_per_layer[0]
    assert n0 <= cap < 8  # the mapped rho's 2 tokens per frame would not fit
    assert abs(sum(sample.visual_per_layer) / 24 - budget) <= 1
    text = inputs["input_ids"].shape[1] - shape.length
    assert [text + n for n in nominal.tokens] == sample.sequence_per_layer
    assert sample.sequence_per_layer[layer] - text == sample.visual_per_layer[layer] + shape.trailing  # newline kept
