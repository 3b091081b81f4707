"""MustDrop: the pure functions against the spec's reference (§9, §11.7, §12 items 1-2, 4-6, 8) and model-level
behaviour on the tiny offline models (§12 items 9-12).

The references below are written from the spec's pseudo-code (§9, §11.2) with plain Python loops, lists and
sets; the library is vectorised. On the models, the merge is recomputed from the unpatched tower's own layer-0
output, the key set and the text-attention filter from the eager models' own attention probabilities (forward
hooks on the attention modules), never from tokenzip's signals.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from conftest import assert_identity_and_restore, forward_with_hooks, get_tiny
from PIL import Image
from test_positions import record_rope_rows

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.budget import item_budget
from tokenzip.errors import BudgetError, PolicyOptionError
from tokenzip.items import GridPart, ItemShape
from tokenzip.policies.mustdrop import (
    PRESETS,
    budget_filter,
    default_prune_layers,
    dual_filter,
    key_set,
    layer_weights,
    merge_counts,
    mustdrop_schedule,
    spatial_merge,
    window_index,
    window_similarity,
)
from tokenzip.reference import cached_greedy, greedy_tokens, uncached_logits
from tokenzip.tiny import TinyVLM, dummy_image, tiny

OFFICIAL_LAYERS = (2, 6, 10, 14)


# --------------------------------------------------------------------------------------------------------------
# The spec's §9 / §11.2 reference, one element at a time


def ref_topk(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, descending, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[: max(0, k)]


def ref_windows(rows: int, cols: int, k: int = 3) -> list[list[int]]:
    """§9 `win[w]` on a rows x cols raster grid (windows row-major from the top-left, slots row-major)."""
    gr, gc = rows // k, cols // k
    return [[(k * (w // gc) + a) * cols + k * (w % gc) + c for a in range(k) for c in range(k)] for w in range(gr * gc)]


def ref_sims(patches: torch.Tensor, windows: list[list[int]]) -> list[float]:
    """Mean cosine over the ordered pairs s != s' of each window, in float64."""
    p = patches.double()
    out = []
    for win in windows:
        total, pairs = 0.0, 0
        for s in win:
            for t in win:
                if s != t:
                    total += float(p[s] @ p[t]) / (float(p[s].norm()) * float(p[t].norm()))
                    pairs += 1
        out.append(total / pairs)
    return out


def ref_merge(patches: torch.Tensor, rows: int, cols: int, thr: float, slot: int = 0):
    """§9 spatial_merge for one sample (patches without CLS): (sims, r, representative cell per output token,
    output rows [merged (descending sim), remaining patches ascending], merged windows in output order)."""
    windows = ref_windows(rows, cols)
    sims = ref_sims(patches, windows)
    r = sum(1 for s in sims if s >= thr)
    chosen = ref_topk(sims, r)
    covered = {t for w in chosen for t in windows[w]}
    rest = [t for t in range(patches.shape[0]) if t not in covered]
    p = patches.double()
    merged = []
    for w in chosen:
        acc = torch.zeros_like(p[0])
        for t in windows[w]:
            acc = acc + p[t]
        merged.append(acc / len(windows[w]))
    values = torch.stack(merged + [p[t] for t in rest])
    return sims, r, [windows[w][slot] for w in chosen] + rest, values, chosen


def ref_stats(a: list[list[float]]) -> tuple[list[float], list[float]]:
    """(g_j = sum_t a[t][j], p_j = max_t a[t][j])."""
    n = len(a[0])
    return [sum(row[j] for row in a) for j in range(n)], [max(row[j] for row in a) for j in range(n)]


def ref_dual(a: list[list[float]], key: list[int], gthr: float, ithr: float) -> list[int]:
    """§9 dual_filter: drop j iff g_j < gthr * sum(g) and p_j < ithr; key tokens always kept; ascending."""
    g, p = ref_stats(a)
    total = sum(g)
    return sorted({j for j in range(len(g)) if not (g[j] < gthr * total and p[j] < ithr)} | set(key))


def ref_u(a: list[list[float]], c: float) -> list[float]:
    """§11.2: u_j = max(g_j / sum g, p_j / c)."""
    g, p = ref_stats(a)
    total = sum(g)
    return [max(g[j] / total, p[j] / c) for j in range(len(g))]


def ref_budget(a: list[list[float]], key: list[int], n_keep: int, c: float) -> list[int]:
    """§11.2: the key set plus the top (n_keep - |key|) other tokens by u (ties -> lower index), ascending."""
    u = ref_u(a, c)
    others = [j for j in range(len(u)) if j not in set(key)]
    extra = [others[i] for i in ref_topk([u[j] for j in others], n_keep - len(key))]
    return sorted(set(key) | set(extra))


def lib_merge(x: torch.Tensor, rows: int, cols: int, thr: float = 0.8, representative: str = "first"):
    """The library path of `select_vision` for one row: CLS (if any, row 0 of x) stays first, patches merged."""
    windows = window_index(rows, cols)
    sims = window_similarity(x, windows)
    return sims, *spatial_merge(x, windows, sims, thr, representative=representative)


def attention_block(seed: int, m: int, n: int, prefix: int = 5, dtype=torch.float64) -> torch.Tensor:
    """Text rows x visual columns of a softmaxed attention over [prefix, n visual, m text]: a per-column bias
    shared by all rows (some tokens are ignored by every row) plus per-row noise."""
    g = torch.Generator().manual_seed(seed)
    length = prefix + n + m
    logits = torch.randn(length, generator=g, dtype=torch.float64) * 2.0 + torch.randn(
        m, length, generator=g, dtype=torch.float64
    )
    probs = torch.softmax(logits, -1)
    return probs[:, prefix : prefix + n].to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Pure functions: stage 1 (§12 items 1, 2, 4)


@pytest.mark.parametrize(("rows", "cols"), [(24, 24), (8, 8), (6, 8), (8, 6), (7, 11), (27, 27), (2, 5)])
def test_window_index_equals_the_reference(rows, cols):
    """Non-overlapping 3x3 windows from the top-left, row-major; border rows / columns that do not fill a window
    are left out (Qwen / OneVision grids); a grid smaller than a window has none."""
    got = window_index(rows, cols)
    assert got.tolist() == ref_windows(rows, cols)
    assert got.shape == ((rows // 3) * (cols // 3), 9)


def planted_tokens(seed: int, planted: list[int], c: int = 64, grid: int = 24, dtype=torch.float32):
    """(1 + grid^2, c) tokens, CLS first: random Gaussian patches, except the `planted` windows = one shared vector
    plus window-specific noise growing with the plant's rank (distinct similarities, all above 0.8)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1 + grid * grid, c, generator=g, dtype=torch.float64)
    shared = torch.randn(c, generator=g, dtype=torch.float64)
    windows = ref_windows(grid, grid)
    for rank, w in enumerate(planted):
        noise = 0.1 + 0.3 * rank / max(1, len(planted))
        x[1 + torch.tensor(windows[w])] = shared + noise * torch.randn(9, c, generator=g, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("seed", range(4))
def test_spatial_merge_equals_the_reference_with_five_planted_windows(seed):
    """§12.1: (577, 64) with 5 planted windows -> r = 5, 537 tokens: [CLS, 5 merged in descending similarity,
    531 remaining patches ascending]; merged rows = mean of their 9 tokens (1e-6)."""
    planted = [40, 7, 63, 0, 22]  # plants in non-ascending window order: descending sim != ascending index
    x = planted_tokens(seed, planted)
    sims_ref, r_ref, reps_ref, values_ref, chosen = ref_merge(x[1:], 24, 24, 0.8)
    # the construction: exactly the planted windows are >= 0.8, with distinct similarities
    assert sorted(chosen) == sorted(planted) and len(set(sims_ref)) == 64
    assert chosen != sorted(chosen)
    sims, reps, values, r = lib_merge(x[1:], 24, 24)  # `select_vision` passes the patches without CLS
    torch.testing.assert_close(sims.double(), torch.tensor(sims_ref, dtype=torch.float64), atol=1e-6, rtol=0)
    assert r == r_ref == 5
    out = torch.cat([x[:1], values])
    assert out.shape == (1 + 576 - 8 * 5, 64) == (537, 64)
    assert reps.tolist() == reps_ref
    assert reps[5:].tolist() == sorted(reps[5:].tolist())
    torch.testing.assert_close(out[1:].double(), values_ref, atol=1e-6, rtol=0)
    for i, w in enumerate(chosen):  # each merged row is the plain mean of its window's nine patches
        cells = torch.tensor(ref_windows(24, 24)[w])
        torch.testing.assert_close(values[i].double(), x[1 + cells].double().mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("planted", "rows", "cols", "dtype"),
    [
        ([], 24, 24, torch.float32),
        (list(range(0, 64, 5)), 24, 24, torch.float32),
        (list(range(64)), 24, 24, torch.float32),
        ([3, 1, 2], 24, 24, torch.float64),
    ],
)
def test_spatial_merge_equals_the_reference_for_other_plant_counts(planted, rows, cols, dtype):
    """No window, 13 windows, every window (no remaining patch: 64 tokens) and a float64 input (1e-12)."""
    x = planted_tokens(11, planted, grid=rows, dtype=dtype)
    _, r_ref, reps_ref, values_ref, chosen = ref_merge(x[1:], rows, cols, 0.8)
    assert sorted(chosen) == sorted(planted)
    _, reps, values, r = lib_merge(x[1:], rows, cols)
    assert r == r_ref and reps.tolist() == reps_ref and values.shape[0] == 576 - 8 * r
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(values.double(), values_ref, atol=tol, rtol=0)


@pytest.mark.parametrize(("rows", "cols"), [(6, 8), (8, 6), (7, 11), (14, 14), (2, 5)])
def test_spatial_merge_on_non_square_grids_and_centre_representatives(rows, cols):
    """Qwen / OneVision grids: border cells never merge; `representative="center"` puts a merged token on its
    window's centre cell (slot 4), "first" on slot 0; the merged values are the same either way."""
    g = torch.Generator().manual_seed(rows * 100 + cols)
    n = rows * cols
    x = torch.randn(n, 16, generator=g, dtype=torch.float64)
    windows = ref_windows(rows, cols)
    shared = torch.randn(16, generator=g, dtype=torch.float64)
    for rank, w in enumerate(windows[::2]):  # plant every other window
        x[torch.tensor(w)] = shared + (0.05 + 0.05 * rank) * torch.randn(9, 16, generator=g, dtype=torch.float64)
    for slot, rep in ((0, "first"), (4, "center")):
        _, r_ref, reps_ref, values_ref, _ = ref_merge(x, rows, cols, 0.8, slot=slot)
        _, reps, values, r = lib_merge(x, rows, cols, representative=rep)
        assert r == r_ref == len(windows[::2])
        assert reps.tolist() == reps_ref
        torch.testing.assert_close(values, values_ref, atol=1e-12, rtol=0)
    border = [t for t in range(n) if t // cols >= 3 * (rows // 3) or t % cols >= 3 * (cols // 3)]
    assert set(border) <= set(reps[r:].tolist())


def test_threshold_uses_greater_equal_and_ties_go_to_the_lower_window():
    """§12.2: sims [0.8, 0.7999999, 0.8000001] at 0.8 (float64) -> 2 windows, 0.8000001 first; exact ties in sim
    -> lower window first (also for an explicit count)."""
    windows = window_index(3, 9)  # three windows side by side
    tokens = torch.randn(27, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sims = torch.tensor([0.8, 0.7999999, 0.8000001], dtype=torch.float64)
    reps, values, r = spatial_merge(tokens, windows, sims, 0.8)
    assert r == 2
    assert reps.tolist() == [int(windows[2, 0]), int(windows[0, 0]), *sorted(windows[1].tolist())]
    torch.testing.assert_close(values[0], tokens[windows[2]].mean(0), atol=1e-12, rtol=0)
    assert spatial_merge(tokens, windows, sims, 0.8000001)[2] == 1
    assert spatial_merge(tokens, windows, sims, 0.7999999)[2] == 3
    windows = window_index(6, 6)  # four windows
    tokens = torch.randn(36, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tied = torch.tensor([0.9, 0.95, 0.95, 0.9], dtype=torch.float64)
    reps, _, r = spatial_merge(tokens, windows, tied, 0.8)
    assert r == 4 and reps.tolist() == [int(windows[w, 0]) for w in (1, 2, 0, 3)]
    reps, _, r = spatial_merge(tokens, windows, tied, 0.8, count=1)
    assert r == 1 and int(reps[0]) == int(windows[1, 0])
    assert reps.numel() == 36 - 8


@pytest.mark.parametrize(("n", "size"), [(576, 47), (536, 43), (432, 35), (336, 27), (64, 6), (48, 4), (25, 2)])
def test_key_set_size_and_order(n, size):
    """§12.4: ceil(0.08 * N') key tokens (576 -> 47, 536 -> 43, ...), the top CLS scores in merged-sequence
    coordinates, descending, ties -> lower index."""
    g = torch.Generator().manual_seed(n)
    scores = torch.rand(n, generator=g)
    key = key_set(scores, 0.08)
    assert key.numel() == size
    assert key.tolist() == ref_topk(scores.tolist(), size)
    quantised = (torch.rand(n, generator=g) * 4).floor()
    assert key_set(quantised, 0.08).tolist() == ref_topk(quantised.tolist(), size)
    assert key_set(scores, 0.5).numel() == math.ceil(n / 2)


# --------------------------------------------------------------------------------------------------------------
# Pure functions: stage 2 (§12 items 5, 6)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dual_filter_equals_the_reference_for_every_preset(preset):
    """§12.5: the official test with each official threshold pair; key tokens always kept; output ascending."""
    gthr, ithr = PRESETS[preset]
    dropped_any = protected_any = False
    for seed in range(20):
        m, n = (24, 576) if seed % 2 == 0 else (7, 48)
        a = attention_block(seed, m, n)
        key = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: math.ceil(0.08 * n)]
        rows = a.tolist()
        kept = dual_filter(a, key, gthr, ithr)
        want = ref_dual(rows, key.tolist(), gthr, ithr)
        assert kept.tolist() == want
        assert set(key.tolist()) <= set(kept.tolist())
        without_key = ref_dual(rows, [], gthr, ithr)
        dropped_any |= len(want) < n
        protected_any |= not set(key.tolist()) <= set(without_key)
        assert dual_filter(a.float(), key, gthr, ithr).tolist() == want  # float32 scores, same decisions
    assert dropped_any and protected_any  # the inputs exercise both the drop rule and the key protection


def test_dual_filter_official_cli_default_keeps_everything():
    """(global_thr, individual_thr) = (1.0, 0.0): nothing dropped (p_j < 0 never holds)."""
    a = attention_block(3, 10, 40)
    assert dual_filter(a, torch.zeros(0, dtype=torch.long), 1.0, 0.0).tolist() == list(range(40))


@pytest.mark.parametrize("c_ratio", [1.0, 0.833, 0.909, 0.2])
def test_single_gamma_thresholds_equal_the_budget_filter(c_ratio):
    """§12.6: thresholds (gamma, c * gamma) keep exactly key | {u >= gamma}; `budget_filter` with n_keep = that
    count returns the same set."""
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        m, n = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(5, 300, (1,), generator=g))
        a = attention_block(100 + seed, m, n)
        key = torch.randperm(n, generator=g)[: int(torch.randint(0, n // 4 + 1, (1,), generator=g))]
        u = ref_u(a.tolist(), c_ratio)
        ordered = sorted(u)
        i = int(torch.randint(0, n - 1, (1,), generator=g))
        gamma = (ordered[i] + ordered[i + 1]) / 2  # strictly between two scores: no boundary rounding
        want = sorted(set(key.tolist()) | {j for j in range(n) if u[j] >= gamma})
        assert dual_filter(a, key, gamma, c_ratio * gamma).tolist() == want
        assert budget_filter(a, key, len(want), c_ratio).tolist() == want


def test_budget_filter_equals_the_reference():
    """Key set plus the top (n_keep - |key|) others by u, ties -> lower index (dyadic scores: exact ties);
    n_keep below the key size keeps the key set alone."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        m, n = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(4, 120, (1,), generator=g))
        if seed % 2:
            a = torch.randint(0, 8, (m, n), generator=g).double() / 64
            a[0, 0] = 1 / 64  # never an all-zero block
        else:
            a = attention_block(seed, m, n)
        key = torch.randperm(n, generator=g)[: int(torch.randint(0, n // 3 + 1, (1,), generator=g))]
        c = (1.0, 0.833, 0.2)[seed % 3]
        for n_keep in (0, key.numel(), n // 2, n):
            got = budget_filter(a, key, n_keep, c)
            want = ref_budget(a.tolist(), key.tolist(), n_keep, c)
            assert got.tolist() == want
            assert got.numel() == max(n_keep, key.numel())


# --------------------------------------------------------------------------------------------------------------
# Pure functions: schedule (§12 item 8, §11.7 table)

# (keep, r) -> counts after layers 2 / 6 / 10 / 14, average (true accounting), lambda (None: infeasible)
TRUE_TABLE = {
    (0.111, 0): ([47, 47, 47, 47], 96.6, None),
    (0.111, 18): ([35, 35, 35, 35], 72.2, None),
    (0.111, 30): ([91, 27, 27, 27], 64.0, 0.272),
    (0.222, 0): ([243, 102, 47, 47], 128.0, 0.422),
    (0.222, 18): ([252, 147, 86, 51], 128.2, 0.584),
    (0.222, 30): ([226, 152, 102, 69], 128.2, 0.672),
    (0.333, 0): ([361, 226, 141, 88], 191.8, 0.626),
    (0.333, 18): ([313, 227, 165, 119], 191.8, 0.725),
    (0.333, 30): ([272, 220, 178, 144], 191.8, 0.810),
}
LOG_TABLE = {
    (0.111, 0): ([47, 47, 47, 47], 80.1),
    (0.111, 18): ([68, 35, 35, 35], None),
    (0.111, 30): ([138, 57, 27, 27], None),
    (0.222, 0): ([295, 151, 78, 47], None),
    (0.222, 18): ([266, 163, 101, 62], None),
    (0.222, 30): ([233, 162, 112, 78], None),
    (0.333, 0): ([375, 245, 160, 104], None),
    (0.333, 18): ([320, 237, 176, 130], None),
    (0.333, 30): ([275, 226, 185, 152], None),
}
KEYS = {0: 47, 18: 35, 30: 27}  # ceil(0.08 * (576 - 8 r))


@pytest.mark.parametrize(("keep", "r"), sorted(TRUE_TABLE))
def test_schedule_reproduces_the_true_accounting_table(keep, r):
    """§11.7 worked table (true accounting 3, 4, 4, 4, 17): every count, the infeasible flag, the layer average."""
    counts, avg, lam = TRUE_TABLE[(keep, r)]
    target, n_m, n_key = round(576 * keep), 576 - 8 * r, KEYS[r]
    assert n_key == math.ceil(0.08 * n_m)
    got, infeasible = mustdrop_schedule(target, n_m, n_key, OFFICIAL_LAYERS, 32, "true")
    assert got == counts
    assert infeasible == (lam is None)
    assert round((3 * n_m + 4 * got[0] + 4 * got[1] + 4 * got[2] + 17 * got[3]) / 32, 1) == avg
    if lam is not None:  # the first count is N_m * lambda, rounded
        assert abs(got[0] / n_m - lam) <= 0.5 / n_m + 5e-4


@pytest.mark.parametrize(("keep", "r"), sorted(LOG_TABLE))
def test_schedule_reproduces_the_official_log_table(keep, r):
    """§11.7 `official_log` accounting (2, 4, 4, 4, 18): every count; keep 0.111 at r = 0 is infeasible (80.1)."""
    counts, infeasible_avg = LOG_TABLE[(keep, r)]
    target, n_m = round(576 * keep), 576 - 8 * r
    got, infeasible = mustdrop_schedule(target, n_m, KEYS[r], OFFICIAL_LAYERS, 32, "official_log")
    assert got == counts
    assert infeasible == (infeasible_avg is not None)
    weights = [2, 4, 4, 4, 18]
    logged = (weights[0] * n_m + sum(w * c for w, c in zip(weights[1:], got, strict=True))) / 32
    if infeasible:
        assert round(logged, 1) == infeasible_avg
    else:
        assert abs(logged - target) <= 0.5 * 18 / 32


def test_schedule_without_pruning_and_minimum_averages():
    """N_m <= target needs no LLM pruning (every count = N_m); the minimum true / logged averages without any merge
    are 96.6 / 80.1 tokens (keep ~ 0.168 is the smallest feasible true budget)."""
    assert mustdrop_schedule(500, 432, 35, OFFICIAL_LAYERS, 32) == ([432] * 4, False)
    assert mustdrop_schedule(432, 432, 35, OFFICIAL_LAYERS, 32) == ([432] * 4, False)
    assert round((3 * 576 + 29 * 47) / 32, 1) == 96.6 and round((2 * 576 + 30 * 47) / 32, 1) == 80.1
    assert mustdrop_schedule(96, 576, 47, OFFICIAL_LAYERS, 32)[1]
    assert not mustdrop_schedule(97, 576, 47, OFFICIAL_LAYERS, 32)[1]
    for target in (97, 120, 200, 300, 500):  # counts never grow and never go below the key set
        counts, _ = mustdrop_schedule(target, 576, 47, OFFICIAL_LAYERS, 32)
        assert counts == sorted(counts, reverse=True) and min(counts) >= 47 and max(counts) <= 576


def test_layer_weights_and_default_prune_layers():
    """LLaVA weights 3, 4, 4, 4, 17 (true) and 2, 4, 4, 4, 18 (official_log); round(p L / 32) prune layers."""
    assert layer_weights(OFFICIAL_LAYERS, 32, "true") == [3, 4, 4, 4, 17]
    assert layer_weights(OFFICIAL_LAYERS, 32, "official_log") == [2, 4, 4, 4, 18]
    assert sum(layer_weights((2, 5, 9, 12), 28, "true")) == sum(layer_weights((2, 5, 9, 12), 28, "official_log")) == 28
    assert default_prune_layers(32) == OFFICIAL_LAYERS
    assert default_prune_layers(28) == (2, 5, 9, 12)
    assert default_prune_layers(24) == (2, 4, 8, 10)
    assert default_prune_layers(36) == (2, 7, 11, 16)


# --------------------------------------------------------------------------------------------------------------
# Model level: inputs


def top_constant_image(width: int, height: int, rows_px: int, seed: int) -> Image.Image:
    """A random image whose top `rows_px` pixel rows are one colour: the windows inside that band merge."""
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8)
    arr[:rows_px] = torch.tensor([200, 40, 90], dtype=torch.uint8)
    return Image.fromarray(arr.numpy())


def llava_merging_inputs(vlm, batch: int = 1) -> dict:
    """Sample 0: top three patch rows constant (the upper windows of the 8x8 grid merge); sample 1: random."""
    images = [top_constant_image(112, 112, 42, 3), dummy_image(112, 112, 1)]
    prompts = [vlm.prompt("What is in the image ?"), vlm.prompt("Describe this image")]
    return vlm.inputs(images[:batch], prompts[0] if batch == 1 else prompts[:batch])


def qwen_merging_inputs(vlm, batch: int = 1) -> dict:
    """Sample 0: 224x168 (6x8 LLM grid, 2x2 windows) with a constant upper half; sample 1: a random 112x112."""
    images = [top_constant_image(224, 168, 84, 5), dummy_image(112, 112, 0)]
    prompts = [vlm.prompt("What is in the image ?"), vlm.prompt("Describe this image")]
    return vlm.inputs(images[:batch], prompts[0] if batch == 1 else prompts[:batch])


def llava_reference_merge(vlm, inputs, thr: float = 0.8):
    """The §9 merge on the unpatched CLIP layer-0 output of sample 0: (r, representatives, merged sequence with CLS)."""
    tower = vlm.model.model.vision_tower
    with torch.no_grad():
        layer0 = tower(inputs["pixel_values"][:1], output_hidden_states=True).hidden_states[1][0]
    _, r, reps, values, _ = ref_merge(layer0[1:], 8, 8, thr)
    return r, reps, torch.cat([layer0[:1].double(), values]).float()


def output_cache(out):
    """The KV cache of a forward output (`cache` from transformers 5.24 on, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def capture_output(module, store: list, index: int = 1):
    """Forward hook keeping output[index] (the attention probabilities of an eager attention module)."""
    return module.register_forward_hook(lambda m, a, out: store.append(out[index].detach().clone()))


def capture_input(module, store: list):
    """Forward pre-hook keeping the hidden states a module receives (after earlier pre-hooks rewrote them)."""

    def hook(m, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def median_thresholds(vlm, inputs, layer: int, start: int, n_m: int) -> dict:
    """global_thr / individual_thr at the medians of g_j / sum g and p_j of `layer`'s attention (the tiny model's
    attention is nearly flat, so fixed thresholds would drop all or nothing)."""
    probs: list[torch.Tensor] = []
    with tokenzip.apply(vlm.model, "mustdrop", 0.3, schedule="thresholds", global_thr=1.0, individual_thr=0.0):
        # the official CLI default: merge (uncapped), no LLM pruning
        handle = capture_output(get_adapter(vlm.model).lm_layers[layer].self_attn, probs)
        with torch.no_grad():
            vlm.model(**inputs)
        handle.remove()
    a = probs[0][0].double().mean(0)[start + n_m :, start : start + n_m]
    g = a.sum(0)
    return {"global_thr": float((g / g.sum()).median()), "individual_thr": float(a.max(0).values.median())}


def visual_schedule(counts: list[int], n_m: int, prune: tuple[int, ...], n_layers: int) -> list[int]:
    """Visual tokens each decoder layer processes: layer p still sees the pre-prune set."""
    edges = [-1, *prune, n_layers - 1]
    per_stage = [n_m, *counts]
    return [per_stage[k] for k in range(len(per_stage)) for _ in range(edges[k + 1] - edges[k])]


# --------------------------------------------------------------------------------------------------------------
# Model level: LLaVA (§12 items 9, 10)

LLAVA_CASES = [
    pytest.param(0.3, {}, id="budget-true"),
    pytest.param(0.3, {"budget_count": "official_log"}, id="budget-official_log"),
    pytest.param(0.25, {"c_ratio": 0.2, "prune_layers": (1, 3, 6, 9)}, id="budget-c0.2-layers"),
    pytest.param(48, {}, id="no-llm-pruning"),  # r = 2: 64 - 16 = 48 tokens after the merge, on budget already
    pytest.param(0.3, {"schedule": "thresholds", "global_thr": "median", "individual_thr": "median"}, id="thresholds"),
    pytest.param(0.3, {"preset": "textvqa-64"}, id="preset"),
]


@pytest.mark.parametrize(("keep", "options"), LLAVA_CASES)
def test_llava_stages_equal_the_reference(keep, options):
    """§12.9: the tower's layer 1 receives the §9 merge of layer 0's output; the LLM sees 64 - 8r tokens in the
    official order whose embeddings are the projected merged features; the key set is the top ceil(0.08 N_m) of
    layer 3's CLS row; every pruning layer keeps what the reference filter keeps on that layer's own attention
    (text rows x visual columns, head mean), with counts from the schedule; key tokens always survive; the
    caches of layers p1..p4 are cut to the final set."""
    vlm = get_tiny("llava", "eager")
    inputs = llava_merging_inputs(vlm)
    tower = vlm.model.model.vision_tower
    lm_layers = get_adapter(vlm.model).lm_layers
    n_layers = len(lm_layers)
    prune = tuple(options.get("prune_layers") or default_prune_layers(n_layers))
    r, reps, merged = llava_reference_merge(vlm, inputs)
    assert 0 < r < 4  # the input really merges some, not all, windows
    n_m = 64 - 8 * r
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    length = inputs["input_ids"].shape[1]
    if options.get("global_thr") == "median":  # thresholds at the median share / peak of the first pruning layer
        options = dict(options, **median_thresholds(vlm, inputs, prune[0], start, n_m))

    layer1_in, cls_probs, lm_in, stage_probs = [], [], [], {p: [] for p in prune}
    with tokenzip.apply(vlm.model, "mustdrop", keep, **options) as patch:
        handles = [
            capture_input(tower.encoder.layers[1], layer1_in),
            capture_output(tower.encoder.layers[3].self_attn, cls_probs),
            capture_input(lm_layers[0], lm_in),
            *[capture_output(lm_layers[p].self_attn, stage_probs[p]) for p in prune],
        ]
        out = forward_with_hooks(vlm.model, inputs, handles, use_cache=True)
        record = patch.stats.last
        decisions = patch._runtime.decisions
    sample = record.samples[0]

    # stage 1: merge inside the tower, the LLM input order and values
    torch.testing.assert_close(layer1_in[0][0], merged, atol=1e-6, rtol=0)
    assert sample.items[0].kept == n_m and sample.items[0].kept_indices.tolist() == reps
    assert lm_in[0].shape[1] == length - 8 * r
    with torch.no_grad():
        h = merged[None]
        for i in (1, 2):  # the feature layer is -2: the output of layer 2 of 4
            h = tower.encoder.layers[i](h, None)
            h = h[0] if isinstance(h, tuple) else h
        projected = vlm.model.model.multi_modal_projector(h[:, 1:])[0]
    torch.testing.assert_close(lm_in[0][0, start : start + n_m], projected, atol=1e-5, rtol=1e-5)

    # key set from the eager CLS row of the last CLIP layer (merged sequence)
    cls_row = cls_probs[0][0].double().mean(0)[0, 1:]
    assert cls_row.numel() == n_m
    n_key = math.ceil(0.08 * n_m)
    key = ref_topk(cls_row.tolist(), n_key)

    # stage 2: the reference filter at every pruning layer
    if options.get("schedule") == "thresholds" or "preset" in options:
        gthr, ithr = (
            PRESETS[options["preset"]] if "preset" in options else (options["global_thr"], options["individual_thr"])
        )
        counts = None
    else:
        target = keep if isinstance(keep, int) else round(keep * 64)
        counts, infeasible = mustdrop_schedule(target, n_m, n_key, prune, n_layers, options.get("budget_count", "true"))
        assert not infeasible  # infeasible budgets raise BudgetError (test_infeasible_budget_raises_...)
    alive = list(range(n_m))  # LLM-input visual index of each current visual token
    stage_counts = []
    for k, p in enumerate(prune):
        probs = stage_probs[p][0][0].double().mean(0)  # [L, L] head mean
        n = len(alive)
        assert probs.shape[0] == length - 64 + n
        rows = probs[start + n :, start : start + n].tolist()  # every token after the image x visual tokens
        local_key = [alive.index(j) for j in key]
        if counts is None:
            kept = ref_dual(rows, local_key, gthr, ithr)
        else:
            kept = ref_budget(rows, local_key, min(counts[k], n), options.get("c_ratio", 1.0))
        alive = [alive[j] for j in kept]
        stage_counts.append(len(alive))
        recorded = decisions.llm[p + 1][0][0]
        assert (recorded - start).tolist() == alive, f"layer {p}"
    assert set(key) <= set(alive)
    if counts is not None:
        assert stage_counts == counts
    if keep == 48:
        assert stage_counts == [n_m] * 4  # the target needs no LLM pruning
    elif "global_thr" in options:
        assert stage_counts[-1] < n_m  # the thresholds really drop tokens here

    # per-layer counts in the stats, the layer average, the caches
    want_visual = visual_schedule(stage_counts, n_m, prune, n_layers)
    assert sample.visual_per_layer == want_visual
    text = length - 64
    assert sample.sequence_per_layer == [text + v for v in want_visual]
    if counts is not None and options.get("budget_count", "true") == "true":
        assert abs(sample.visual_mean - target) <= 0.5
    if options.get("budget_count") == "official_log":
        logged = layer_weights(prune, n_layers, "official_log")
        average = (logged[0] * n_m + sum(w * c for w, c in zip(logged[1:], stage_counts, strict=True))) / n_layers
        assert abs(average - round(keep * 64)) <= 0.5 * logged[-1] / n_layers < abs(sample.visual_mean - average)
        assert sample.visual_mean_logged == pytest.approx(average, abs=1e-9)
    caches = [layer.keys.shape[2] for layer in output_cache(out).layers]
    final = text + stage_counts[-1]
    assert caches == [text + n_m] * prune[0] + [final] * (n_layers - prune[0])
    assert sample.cache_per_layer == caches
    trimmed = [i for i in range(prune[0], n_layers) if want_visual[i] != stage_counts[-1]]  # p1..p4, larger sets
    assert set(trimmed) <= set(decisions.decode) <= set(range(prune[0], prune[-1] + 1))
    for layer in decisions.decode:
        assert (decisions.decode[layer][0] - start).tolist() == alive


def record_layer_inputs(layers, indices, call) -> dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]]:
    """Per decoder layer: (position_ids, cos, sequence length) of each call while running `call()`."""
    seen: dict[int, list] = {i: [] for i in indices}

    def make(i):
        def hook(m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cos = kwargs["position_embeddings"][0]
            seen[i].append((kwargs["position_ids"].clone(), cos.clone(), hidden.shape[1]))

        return hook

    handles = [layers[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in indices]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize(
    "setting",
    [{"compat": "official"}, {"compat": "fixed"}, {"positions": "original"}],
    ids=["compact-official", "compact-fixed", "original"],
)
def test_llava_caches_decode_positions_and_cache_free_reference(setting):
    """§12.10: after prefill layers < p1 hold L0 entries, layers >= p1 the final count; decode position of
    generated token t in layer i (§11.6): official = own cache length (L0 + t before p1, L_final + t after),
    fixed = length layer i processed in prefill + t, original = unpruned prompt length + t; the rotary tables
    match those positions; cached greedy equals the cache-free replay."""
    vlm = get_tiny("llava", "sdpa")
    inputs = llava_merging_inputs(vlm)
    layers = get_adapter(vlm.model).lm_layers
    n_layers = len(layers)
    prune = default_prune_layers(n_layers)
    r, reps, _ = llava_reference_merge(vlm, inputs)
    n_m = 64 - 8 * r
    length = inputs["input_ids"].shape[1]
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    keep = 0.3
    counts, _ = mustdrop_schedule(round(keep * 64), n_m, math.ceil(0.08 * n_m), prune, n_layers)
    processed = [length - 64 + v for v in visual_schedule(counts, n_m, prune, n_layers)]
    l0, final = length - 64 + n_m, length - 64 + counts[-1]
    watched = sorted({0, prune[0] - 1, *prune, *(p + 1 for p in prune), n_layers - 1})
    rotary = get_adapter(vlm.model).rotary_emb
    with tokenzip.apply(vlm.model, "mustdrop", keep, **setting) as patch:
        with torch.no_grad():
            cache = output_cache(vlm.model(**inputs, use_cache=True))
        seen = record_layer_inputs(layers, watched, lambda: cached_greedy(vlm.model, inputs, 3))
        record = patch.stats.history[-1]
        tokens, logits = cached_greedy(vlm.model, inputs, 3)
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    assert [layer.keys.shape[2] for layer in cache.layers] == [l0] * prune[0] + [final] * (n_layers - prune[0])
    assert record.samples[0].sequence_per_layer == processed
    kept = record.samples[0].items[0].kept_indices
    assert kept.tolist() == reps
    for i in watched:
        (prefill_pos, prefill_cos, width), *decode = seen[i]
        assert width == processed[i]
        if "positions" in setting:  # original: survivors keep their (first-cell) positions, gaps stay
            full = torch.cat([torch.arange(start), start + kept, torch.arange(start + 64, length)])
            assert set(prefill_pos[0].tolist()) <= set(full.tolist()) and prefill_pos[0, -1] == length - 1
            if i == 0:
                assert torch.equal(prefill_pos[0], full)
            base = length
        else:
            assert torch.equal(prefill_pos[0], torch.arange(width))
            official = l0 if i < prune[0] else final  # own cache length after the trimming
            base = official if setting["compat"] == "official" else processed[i]
        assert [int(p) for p, _, _ in decode] == [base, base + 1], f"layer {i}"
        for t, (_, cos, _) in enumerate(decode):
            want, _ = rotary(cos, torch.tensor([[base + t]]))
            torch.testing.assert_close(cos, want, atol=1e-6, rtol=0)
        want_prefill, _ = rotary(prefill_cos, prefill_pos)
        torch.testing.assert_close(prefill_cos, want_prefill, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy_tokens(vlm.model, reference), tokens)


# --------------------------------------------------------------------------------------------------------------
# Model level: Qwen2.5-VL (§12 item 11)


def test_qwen_merge_keeps_original_mrope_columns():
    """§12.11: the pre-LLM merge on the 6x8 merger grid (centre-cell representatives, merged values = mean of 9);
    survivors keep their original M-RoPE columns at the LLM input and after every pruning layer, merged tokens
    take their window-centre column; rope_deltas and decode positions equal the unpruned model's; cached greedy
    equals the cache-free replay."""
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    inputs = qwen_merging_inputs(vlm)
    layers = get_adapter(vlm.model).lm_layers
    prune = default_prune_layers(len(layers))
    _, h, w = inputs["image_grid_thw"][0].tolist()
    rows, cols = h // 2, w // 2
    n = rows * cols
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        ).pooler_output[0]
    _, r, reps, values, _ = ref_merge(feats, rows, cols, 0.8, slot=4)
    assert 0 < r < len(ref_windows(rows, cols))
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    base_rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 3))
    base_deltas = vlm.model.model.rope_deltas.clone()
    base_cos = record_layer_inputs(layers, [0], lambda: cached_greedy(vlm.model, inputs, 1))[0][0][1]
    later = prune[-1] + 1
    with tokenzip.apply(vlm.model, "mustdrop", 0.3) as patch:
        lm_in: list[torch.Tensor] = []
        handle = capture_input(layers[0], lm_in)
        rope = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, 3))
        handle.remove()
        deltas = vlm.model.model.rope_deltas.clone()
        seen = record_layer_inputs(layers, [0, later], lambda: cached_greedy(vlm.model, inputs, 1))
        item = patch.stats.history[-1].samples[0].items[0]
        survivors = patch._runtime.decisions.llm[later][0][0]
        tokens, logits = cached_greedy(vlm.model, inputs, 3)
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    n_m = n - 8 * r
    assert item.kept_indices.tolist() == reps
    torch.testing.assert_close(lm_in[0][0, start : start + n_m].double(), values, atol=1e-5, rtol=1e-5)
    full, got = base_rows[0][:, 0], rope[0][:, 0]
    original = torch.cat([torch.arange(start), start + item.kept_indices, torch.arange(start + n, full.shape[1])])
    assert torch.equal(got, full[:, original])
    assert torch.equal(deltas, base_deltas)
    for step in (1, 2):
        assert torch.equal(rope[step], base_rows[step])
    # after the last pruning layer: the cos rows of the surviving tokens' original positions
    survivor_orig = start + item.kept_indices[survivors - start]
    assert survivors.numel() < n_m
    positions = torch.cat([torch.arange(start), survivor_orig, torch.arange(start + n, full.shape[1])])
    cos_later = seen[later][0][1]
    assert cos_later.shape[-2] == positions.numel()
    torch.testing.assert_close(cos_later, base_cos.index_select(-2, positions), atol=0, rtol=0)
    torch.testing.assert_close(seen[0][0][1], base_cos.index_select(-2, original), atol=0, rtol=0)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy_tokens(vlm.model, reference), tokens)


# --------------------------------------------------------------------------------------------------------------
# Model level: batches, identity, removal, options (§12 item 12)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_equals_single_runs_with_per_image_merge_counts(family):
    """bs = 2 (one image that merges, one that does not; different sizes on Qwen) gives the tokens, kept indices
    and per-layer counts of two bs = 1 runs; r is per image (the official min over the batch would merge none)."""
    vlm = get_tiny(family, "sdpa")
    make = llava_merging_inputs if family == "llava" else qwen_merging_inputs
    both = make(vlm, 2)
    singles = [make(vlm, 1)]
    images = [dummy_image(112, 112, 1)] if family == "llava" else [dummy_image(112, 112, 0)]
    singles.append(vlm.inputs(images, vlm.prompt("Describe this image")))
    with tokenzip.apply(vlm.model, "mustdrop", 0.3) as patch:
        batch_tokens, _ = cached_greedy(vlm.model, both, 3)
        batch = patch.stats.history[-1].samples
        for index, single in enumerate(singles):
            tokens, _ = cached_greedy(vlm.model, single, 3)
            alone = patch.stats.history[-1].samples[0]
            assert torch.equal(batch_tokens[index], tokens[0])
            assert torch.equal(batch[index].items[0].kept_indices, alone.items[0].kept_indices)
            assert batch[index].visual_per_layer == alone.visual_per_layer
            assert batch[index].cache_per_layer == alone.cache_per_layer
    merged = [s.items[0].content - s.items[0].kept for s in batch]
    assert merged[0] > 0 and merged[1] == 0


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_keep_one_is_identity_and_remove_restores(family):
    """keep = 1.0 reproduces the unpatched logits exactly even on images whose windows merge (no merge, no
    filter, no trimming); a pruning patch changes the logits; `remove()` restores them exactly."""
    vlm = get_tiny(family, "sdpa")
    inputs = (llava_merging_inputs if family == "llava" else qwen_merging_inputs)(vlm, 2)
    assert_identity_and_restore(vlm, inputs, "mustdrop", prune_keep=0.3)  # the vision merge shortens the input


@pytest.mark.parametrize(
    "options",
    [
        {"preset": "textvqa-32"},
        {"schedule": "thresholds"},
        {"schedule": "thresholds", "global_thr": 0.001},
        {"schedule": "single_gamma"},
        {"prune_layers": (4, 2, 8, 10)},
        {"prune_layers": (2, 2, 8, 10)},
        {"prune_layers": ()},
        {"c_ratio": 0},
        {"c_ratio": True},
        {"merge_thr": -1.0},
        {"key_rate": "0.08"},
        {"budget_count": "logged"},
        {"compat": "strict"},
        {"window": 3},
    ],
)
def test_bad_options_raise(options):
    """Unknown presets / options, a thresholds schedule without both thresholds, non-increasing prune layers and
    non-positive numbers raise PolicyOptionError."""
    with pytest.raises(PolicyOptionError):
        tokenzip.apply(get_tiny("llava", "sdpa").model, "mustdrop", 0.3, **options)


def test_prune_layers_must_leave_a_layer_after_the_last():
    """A last pruning layer at the model's final layer is refused when the policy is planned on the model."""
    vlm = get_tiny("llava", "sdpa")
    with pytest.raises(PolicyOptionError):
        tokenzip.apply(vlm.model, "mustdrop", 0.3, prune_layers=(2, 4, 8, 23))
    assert not vlm.model._forward_pre_hooks


def test_preset_sets_the_official_thresholds():
    """A preset selects the thresholds schedule with the official script's pair."""
    policy = tokenzip.policies.get_policy_class("mustdrop")(preset="vizwiz-64")
    assert policy.options["schedule"] == "thresholds"
    assert (policy.options["global_thr"], policy.options["individual_thr"]) == (0.005, 0.001)


# --------------------------------------------------------------------------------------------------------------
# The budget rule (issue 19 §1): the layer-averaged visual tokens meet keep within one token per item, or the
# first forward raises BudgetError naming the smallest reachable keep


@functools.lru_cache(maxsize=8)
def tiny_depth(family: str, layers: int, image_size: int | None = None) -> TinyVLM:
    """A tiny model of `family` with `layers` decoder layers (LLaVA: `image_size` pixels, 14-pixel patches)."""
    extra = {"image_size": image_size} if image_size is not None else {}
    return tiny(family, text_layers=layers, **extra)


def budget_images(family: str, count: int) -> list[Image.Image]:
    """`count` small images (16 content tokens on LLaVA at 56 px and Qwen at 112 px, 32 on OneVision); on LLaVA /
    Qwen every other one has a constant top band, so its 3x3 window merges."""
    if family == "llava_onevision":
        return [dummy_image(56, 56, i) for i in range(count)]
    side = 56 if family == "llava" else 112  # 4 x 4 tokens: one 3 x 3 window, covered by the band
    return [top_constant_image(side, side, 3 * side // 4 if i % 2 == 0 else 0, i) for i in range(count)]


@pytest.mark.parametrize("images", [1, 16])
@pytest.mark.parametrize("layers", [8, 32])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "qwen3_vl"])
def test_layer_average_meets_the_budget(family, layers, images):
    """r11: on 8 and 32 decoder layers, with 1 and 16 images, the measured layer average (stats) equals the sum of
    the items' budgets within one token per item; the pruning layers are distinct and increasing (8 layers used to
    give (0, 2, 2, 4): one stage applied twice, 7-11 % over budget)."""
    vlm = tiny_depth(family, layers, 56 if family == "llava" else None)
    inputs = vlm.inputs(budget_images(family, images), vlm.prompt(images=images))
    keep = 0.4 if images == 1 else 8  # a fraction, and an int (tokens per image)
    with tokenzip.apply(vlm.model, "mustdrop", keep) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        sample = patch.stats.last.samples[0]
        stages = patch.plan.llm_layers
    assert len(sample.items) == images
    budget = sum(item_budget(keep, item.content) for item in sample.items)
    assert abs(sample.visual_mean - budget) <= images, sample.visual_per_layer
    assert list(stages) == sorted(set(stages)) and len(stages) == 4
    assert sample.visual_per_layer[-1] < sample.visual_per_layer[0]  # the LLM stages really prune
    if family != "llava_onevision" and images == 16:  # some images merged their window
        assert any(item.kept < item.content for item in sample.items)


def test_eight_layer_llava_repro_r11():
    """r11 as filed: tiny LLaVA with 8 decoder layers, keep 0.333 of 64 -> 21 tokens on average (was 23.25 with the
    duplicated stage (1, 3, 3, 5))."""
    vlm = tiny_depth("llava", 8)
    inputs = vlm.inputs([dummy_image()], vlm.prompt())
    with tokenzip.apply(vlm.model, "mustdrop", keep=0.333) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        assert patch.plan.llm_layers == (1, 3, 4, 5)
        assert abs(patch.stats.last.samples[0].visual_mean - 21) <= 0.5


@pytest.mark.parametrize(
    ("family", "image_size", "keep"),
    [("llava", 112, 0.111), ("llava", 168, 0.111), ("qwen2_5_vl", None, 0.05), ("llava_onevision", None, 0.1)],
    ids=["llava-64", "synth-llava-shape-144", "qwen", "onevision"],
)
def test_infeasible_budget_raises_and_names_a_reachable_keep(family, image_size, keep):
    """A keep below what the key set allows (layers 0..p1 see every token; the key set survives every prune) raises
    BudgetError at the first forward (was: a silent 13.2 against 7.1 on 64 tokens, 28.5 against 16 on the 8-layer
    144-token synth-llava shape); the keep it names is met within one token, one step (1e-4) below it raises
    again; the model still runs after `remove()`."""
    vlm = tiny_depth(family, 8, image_size)
    image = dummy_image(56, 56) if family == "llava_onevision" else dummy_image(112, 112)
    inputs = vlm.inputs([image], vlm.prompt())
    patch = tokenzip.apply(vlm.model, "mustdrop", keep)
    with pytest.raises(BudgetError, match="smallest reachable keep is") as info, torch.no_grad():
        vlm.model(**inputs)
    patch.remove()
    with torch.no_grad():
        vlm.model(**inputs)  # unpatched model intact
    assert "key set" in str(info.value)
    smallest = float(re.search(r"smallest reachable keep is ([0-9.]+)", str(info.value)).group(1))
    assert smallest > keep
    with tokenzip.apply(vlm.model, "mustdrop", smallest) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        sample = patch.stats.last.samples[0]
    assert abs(sample.visual_mean - item_budget(smallest, sample.items[0].content)) <= 1
    below = tokenzip.apply(vlm.model, "mustdrop", round(smallest - 1e-4, 4))
    with pytest.raises(BudgetError), torch.no_grad():
        vlm.model(**inputs)
    below.remove()


def test_nominal_schedule_raises_on_an_infeasible_budget():
    """Pricing (`nominal`, no merge assumed) refuses the same budgets as a forward."""
    vlm = tiny_depth("llava", 8)
    policy = tokenzip.policies.get_policy_class("mustdrop")()
    info = get_adapter(vlm.model).info()
    shape = ItemShape("image", (GridPart(0, 1, 8, 8),))
    with pytest.raises(BudgetError, match="smallest reachable keep"):
        policy.nominal(info, shape, 0.111)
    tokens = policy.nominal(info, shape, 0.333).tokens
    assert len(tokens) == 8 and abs(sum(tokens) / 8 - 21) <= 0.5


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_merge_never_takes_an_item_below_its_budget(family):
    """A high keep caps the merge at floor((N - budget) / 8) windows, the most similar ones, so the layer average
    meets the budget (without the cap the threshold merge alone left the image under budget, e.g. 48 of 56); the
    thresholds schedule (which ignores keep) merges every window >= merge_thr."""
    vlm = get_tiny(family, "sdpa")
    inputs = (llava_merging_inputs if family == "llava" else qwen_merging_inputs)(vlm)
    with tokenzip.apply(vlm.model, "mustdrop", 1, schedule="thresholds", global_thr=1.0, individual_thr=0.0) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        full = patch.stats.last.samples[0].items[0]
    r = (full.content - full.kept) // 8
    assert r >= 2  # the input merges at least two windows at the threshold
    keep = full.content - 8 * (r - 1)  # room for r - 1 merges only
    with tokenzip.apply(vlm.model, "mustdrop", keep) as patch:
        with torch.no_grad():
            vlm.model(**inputs)
        sample = patch.stats.last.samples[0]
    capped = sample.items[0]
    assert capped.content - capped.kept == 8 * (r - 1)
    assert capped.kept_indices[: r - 1].tolist() == full.kept_indices[: r - 1].tolist()  # most similar first
    assert abs(sample.visual_mean - keep) <= 0.5


# --------------------------------------------------------------------------------------------------------------
# r_scope, single_gamma, option validation (issue 19 §§ 2, 5; r13)


def test_merge_counts_per_image_and_batch_scope():
    """§12.3: a batch of two with 5 and 0 planted windows merges 5 and 0 per image; r_scope="batch" (the official
    minimum over the batch) merges 0 in both; caps apply per image before the minimum."""
    windows = window_index(24, 24)
    sims = [window_similarity(planted_tokens(s, p)[1:], windows) for s, p in ((0, [40, 7, 63, 0, 22]), (1, []))]
    assert merge_counts(sims, 0.8) == [5, 0]
    assert merge_counts(sims, 0.8, "batch") == [0, 0]
    assert merge_counts(sims[:1] * 2, 0.8, "batch", [None, 3]) == [3, 3]
    assert merge_counts(sims[:1], 0.8, "image", [2]) == [2]


def test_r_scope_batch_on_llava_and_refused_elsewhere():
    """On LLaVA-1.5, r_scope="batch" makes the merging image of a batch merge as many windows as the other (none),
    per-image scope merges them; families whose merge runs per item after the projector refuse it at apply."""
    vlm = get_tiny("llava", "sdpa")
    inputs = llava_merging_inputs(vlm, 2)
    merged = {}
    for scope in ("image", "batch"):
        with tokenzip.apply(vlm.model, "mustdrop", 0.3, r_scope=scope) as patch:
            with torch.no_grad():
                vlm.model(**inputs)
            merged[scope] = [s.items[0].content - s.items[0].kept for s in patch.stats.last.samples]
    assert merged["image"][0] > 0 and merged["image"][1] == 0
    assert merged["batch"] == [0, 0]
    with pytest.raises(PolicyOptionError, match="r_scope"):
        tokenzip.apply(get_tiny("qwen2_5_vl", "sdpa").model, "mustdrop", 0.3, r_scope="batch")


def test_single_gamma_is_refused_with_the_reason():
    """schedule="single_gamma" needs prefill re-runs per bisection step, which a hook policy cannot do: refused
    with a message that says so and names the alternatives."""
    with pytest.raises(PolicyOptionError, match="re-run") as info:
        tokenzip.policies.get_policy_class("mustdrop")(schedule="single_gamma")
    assert "schedule='budget'" in str(info.value) and "schedule='thresholds'" in str(info.value)


@pytest.mark.parametrize(
    "options",
    [
        {"c_ratio": float("nan")},  # r13
        {"c_ratio": float("inf")},
        {"merge_thr": float("nan")},
        {"merge_thr": 1.5},
        {"key_rate": float("inf")},
        {"key_rate": 0.0},
        {"schedule": "thresholds", "global_thr": float("nan"), "individual_thr": 0.001},
        {"schedule": "thresholds", "global_thr": 0.001, "individual_thr": -0.1},
        {"prune_layers": (0.5, 2, 3, 4)},
        {"prune_layers": (-1, 2, 3, 4)},
        {"prune_layers": "2,6"},
        {"r_scope": "all"},
        {"schedule": "Budget"},
        {"newlines": "keep"},
        {"global_thr": 0.01},  # thresholds without schedule="thresholds" would be ignored
        {"schedule": "thresholds", "global_thr": 0.01, "individual_thr": 0.01, "c_ratio": 0.5},
        {"preset": "textvqa-64", "c_ratio": 0.5},
        {"preset": "textvqa-64", "global_thr": 0.5},
    ],
)
def test_bad_option_values_raise(options):
    """r13: every option is declared (type, range, choices; NaN / inf refused) and an option that another would
    make ignored is refused, each with PolicyOptionError naming the option."""
    with pytest.raises(PolicyOptionError, match="|".join(options)):
        tokenzip.policies.get_policy_class("mustdrop")(**options)


def test_good_option_values_are_normalised():
    """Lists become tuples, ints floats; a preset with its own thresholds repeated is accepted."""
    cls = tokenzip.policies.get_policy_class("mustdrop")
    policy = cls(prune_layers=[1, 3, 4, 5], c_ratio=2, r_scope="batch")
    assert policy.options["prune_layers"] == (1, 3, 4, 5) and isinstance(policy.options["c_ratio"], float)
    assert cls(preset="textvqa-64", global_thr=0.011).options["individual_thr"] == 0.01


def test_default_prune_layers_are_distinct_and_increasing_at_every_depth():
    """r11: round(p L / 32) collided on shallow LLMs ((0, 2, 2, 4) at L = 8); now every depth gets min(4, L - 1)
    distinct increasing layers with a layer after the last, and the official / spec'd depths keep their values."""
    for n_layers in range(2, 81):
        layers = default_prune_layers(n_layers)
        assert len(layers) == min(4, n_layers - 1)
        assert list(layers) == sorted(set(layers)) and layers[0] >= 0 and layers[-1] <= n_layers - 2
    assert default_prune_layers(8) == (0, 2, 3, 4)
    assert [default_prune_layers(n) for n in (24, 28, 32, 36)] == [
        (2, 4, 8, 10),
        (2, 5, 9, 12),
        (2, 6, 10, 14),
        (2, 7, 11, 16),
    ]
    with pytest.raises(PolicyOptionError):
        default_prune_layers(1)
