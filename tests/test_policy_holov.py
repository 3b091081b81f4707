"""HoloV: the selection against the spec's reference (§7), the worked examples of §10, the Qwen2.5-VL window
order and off-by-one window, and model-level behaviour on the tiny offline models.

The reference below restates the spec's pseudo-code with plain loops. Its crop scores and crop weights use
float32 torch arithmetic (the spec's `score_dtype="float32"`), so that a weight lying within rounding distance
of an integer quota boundary cannot make the two computations disagree; budgets, quotas, the +1 step, the
redistribution and the within-crop choice are plain Python.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import get_tiny, image_inputs, multi_image_inputs, single_inputs, video_inputs
from test_positions import record_rope_rows

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.adapters.base import ModelInfo
from tokenzip.contexts import PreLLMItem
from tokenzip.errors import PolicyOptionError
from tokenzip.items import GridPart, ItemShape, VisualItem
from tokenzip.policies.holov import (
    HoloVPolicy,
    crop_count,
    crop_quotas,
    crop_score,
    crop_sizes,
    holov_select,
    redistribute,
)
from tokenzip.reference import cached_greedy, greedy_tokens, uncached_logits
from tokenzip.signals import encoder_attention_rows, qwen_vision_attention_received

EPS = 1e-6
BETA = 0.09
STEPS = 3


# ------------------------------------------------------------------------------------------ reference (§7)
def ref_top(values: list[float], k: int) -> list[int]:
    """Positions of the k largest values, largest first, equal values -> lower position first."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def ref_sizes(n: int, c: int) -> list[int]:
    return [n // c + (1 if i < n % c else 0) for i in range(c)]


def ref_crops(n: int, k: int) -> int:
    """The official crop count (float form), capped at n."""
    return min(n, max(1, int((1024 / 576) * n / k)))


def ref_token_terms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_i and v_i of one crop (§2 steps 1-4), the zeroed self-similarity included in both sums."""
    m = z.shape[0]
    z = z.float()
    unit = z / (z.norm(dim=1, keepdim=True) + EPS)
    sim = unit @ unit.T
    sim.fill_diagonal_(0.0)
    mu = sim.sum(1) / (m - 1)
    return mu, ((sim - mu[:, None]) ** 2).sum(1) / (m - 1)


def ref_crop_score(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Mean of H_i = 1000 a_i + beta gamma v_i over the crop (§2 steps 5-7); a 1-token crop scores mean(a)."""
    if z.shape[0] <= 1:
        return a.float().mean()
    _, v = ref_token_terms(z)
    scaled = 1000.0 * a.float()
    gamma = scaled.abs().mean() / (v.abs().mean() + EPS)
    return (scaled + BETA * gamma * v).mean()


def ref_weights(z: torch.Tensor, a: torch.Tensor, c: int) -> tuple[list[int], torch.Tensor]:
    sizes = ref_sizes(a.numel(), c)
    scores, start = [], 0
    for m in sizes:
        scores.append(ref_crop_score(z[start : start + m], a[start : start + m]))
        start += m
    s = torch.stack(scores)
    return sizes, s / (s.sum() + EPS)


def ref_quotas(w: torch.Tensor, k: int) -> list[int]:
    q = [math.floor(x) for x in (w * k).tolist()]
    r = k - sum(q)
    if r > 0:
        for c in ref_top(w.tolist(), min(r, len(q))):
            q[c] += 1
    return q


def ref_redistribute(q: list[int], sizes: list[int], w: torch.Tensor) -> list[int]:
    q, carry = list(q), 0
    while True:
        for c in range(len(q)):
            if q[c] > sizes[c]:
                carry += q[c] - sizes[c]
                q[c] = sizes[c]
        open_crops = [c for c in range(len(q)) if q[c] < sizes[c]]
        if carry == 0 or not open_crops:
            return q
        w_open = w[open_crops]
        total = float(w_open.sum())
        shares = [math.floor(x) for x in (w_open / total * carry).tolist()] if total > 0 else [0] * len(open_crops)
        rest = carry - sum(shares)
        for c, extra in zip(open_crops, shares):
            q[c] += extra
        bumped = ref_top(w_open.tolist(), min(rest, len(open_crops)))
        for j in bumped:
            q[open_crops[j]] += 1
        carry = rest - len(bumped)


def reference_select(z, a, k: int, c: int, shortfall: str = "zeros") -> tuple[list[int], int]:
    """§7 holov_select: kept indices in output order and the number of zero rows."""
    sizes, w = ref_weights(z, a, c)
    q = ref_quotas(w, k)
    if shortfall == "redistribute":
        q = ref_redistribute(q, sizes, w)
    out, start = [], 0
    values = a.float().tolist()
    for crop, m in enumerate(sizes):
        if q[crop] >= m:
            out += list(range(start, start + m))
        elif q[crop] > 0:
            out += [start + i for i in ref_top(values[start : start + m], q[crop])]
        start += m
    return out[:k], max(0, k - len(out))


def trial(seed: int, n: int = 576, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features and attention: seed % 4 = 0 uniform, 1 peaked, 2 a hot run, 3 sparse (ties, empty crops)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    a = torch.rand(n, generator=g)
    kind = seed % 4
    if kind == 1:
        a = a**8
    elif kind == 2:  # a hot run shorter than a crop: its crop's share may exceed the crop (zero padding)
        start = int(torch.randint(0, n - 40, (1,), generator=g))
        a[start : start + int(torch.randint(4, 40, (1,), generator=g))] += 100.0
    elif kind == 3:
        a = torch.where(a > 0.9, a, torch.zeros_like(a))
    return z, a / a.sum()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models and matmuls run fastest (and immune to a busy machine) on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ §10.1 - §10.8
@pytest.mark.parametrize(("k", "c"), [(64, 16), (128, 8), (192, 5)])
def test_select_equals_reference(k, c):
    padded_trials = 0
    for seed in range(200):
        z, a = trial(seed)
        for shortfall in ("zeros", "redistribute"):
            kept, n_pad = holov_select(z, a, k, c, shortfall=shortfall)
            want, want_pad = reference_select(z, a, k, c, shortfall)
            assert kept.tolist() == want, (seed, shortfall)
            assert n_pad == want_pad, (seed, shortfall)
            if shortfall == "redistribute":
                assert n_pad == 0 and len(set(want)) == k
            else:
                padded_trials += n_pad > 0
    assert padded_trials > 0  # the zero-padding branch was exercised


def test_crop_sizes():
    assert crop_sizes(576, 5) == [116, 115, 115, 115, 115]
    assert crop_sizes(576, 16) == [36] * 16
    assert crop_sizes(10, 3) == [4, 3, 3]
    assert crop_sizes(17, 16) == [2] + [1] * 15


def test_crop_count():
    assert {k: crop_count(576, k) for k in (64, 128, 192, 58)} == {64: 16, 128: 8, 192: 5, 58: 17}
    # the integer form floor(16 N / 9 K) equals the official int((1024/576) * N / K) for all 1 <= K <= N < 9000
    ks = np.arange(1, 9000, dtype=np.int64)
    for lo in range(1, 9000, 1000):
        ns = np.arange(lo, min(lo + 1000, 9000), dtype=np.int64)[:, None]
        official = ((1024 / 576) * ns / ks).astype(np.int64)
        assert not np.any(((16 * ns) // (9 * ks) != official) & (ks <= ns))
    for n in [*range(1, 120), 576, 729, 2880, 6272, 8999]:
        for k in range(1, n + 1):
            assert crop_count(n, k) == min(n, max(1, int((1024 / 576) * n / k)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quota_eps_case(dtype):
    s = torch.tensor([0.45, 0.35, 0.20], dtype=dtype)
    w = s / (s.sum() + EPS)
    torch.testing.assert_close(w * 10, torch.tensor([4.4999955, 3.4999965, 1.999998], dtype=dtype), atol=1e-6, rtol=0)
    assert torch.floor(w * 10).long().tolist() == [4, 3, 1]
    assert crop_quotas(w, 10).tolist() == [5, 4, 1]  # exact arithmetic would give [5, 3, 2]
    assert ref_quotas(w, 10) == [5, 4, 1]


def test_quota_eps_case_end_to_end():
    # three crops of two orthogonal tokens: v = 0, so the crop score is exactly mean(1000 a) = [0.45, 0.35, 0.2]
    z = torch.eye(6)
    a = torch.tensor([4.5e-4, 4.5e-4, 3.5e-4, 3.5e-4, 2e-4, 2e-4])
    kept, n_pad = holov_select(z, a, 10, 3)
    assert kept.tolist() == [0, 1, 2, 3, 4] and n_pad == 5  # q = [5, 4, 1]; crop 2 keeps its lower index


def test_variance_term():
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    z = torch.stack([e1, e1, e2])
    mu, v = ref_token_terms(z)
    assert mu.tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-5)
    assert v.tolist() == pytest.approx([0.375, 0.375, 0.0], abs=1e-5)
    # a >= 0 and v >= 0, so s = mean(a') + beta * gamma * mean(v) = mean(a') (1 + beta mean(v) / (mean(v) + eps))
    a = torch.tensor([1e-3, 2e-3, 3e-3])
    want = 2.0 * (1 + BETA * 0.25 / (0.25 + EPS))
    assert float(crop_score(z, a, BETA)) == pytest.approx(want, rel=1e-6)
    # identical tokens: only the zeroed diagonal deviates from mu = 1, v = 1 / (M - 1) = 0.5 (0 if it were skipped)
    same = torch.stack([e1, e1, e1])
    assert float(crop_score(same, a, BETA)) == pytest.approx(2.0 * (1 + BETA * 0.5 / (0.5 + EPS)), rel=1e-6)
    # orthogonal tokens: S = 0, v = 0, the score is the scaled attention alone
    assert float(crop_score(torch.eye(3), a, BETA)) == pytest.approx(2.0, rel=1e-6)
    assert float(crop_score(z, a, 0.5)) == pytest.approx(2.0 * (1 + 0.5 * 0.25 / (0.25 + EPS)), rel=1e-6)


def test_single_token_crops_score_raw_attention():
    assert crop_sizes(17, 16) == [2] + [1] * 15
    assert float(crop_score(torch.randn(1, 8), torch.tensor([0.3]), BETA)) == pytest.approx(0.3, rel=1e-7)
    z = torch.randn(17, 8)
    z[1] = z[0]  # crop 0: two identical tokens, v = 1
    a = torch.full((17,), 0.01)
    # crop 0 scores ~10.9, singletons 0.01 each (unscaled) -> w0 = 0.986, q0 = floor(3.95) + 1 = 4 >= 2
    kept, n_pad = holov_select(z, a, 4, 16)
    assert kept.tolist() == [0, 1] and n_pad == 2
    assert reference_select(z, a, 4, 16) == ([0, 1], 2)
    kept, n_pad = holov_select(z, a, 4, 16, shortfall="redistribute")
    assert kept.tolist() == [0, 1, 2, 3] and n_pad == 0  # surplus 2 -> crops 1, 2 (equal weights, lower first)


def test_more_crops_than_tokens_act_as_single_token_crops():
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    a = torch.tensor([0.1, 0.5, 0.2, 0.4, 0.3])
    # C = 9 > N = 5: the official code skips the empty crops, leaving five 1-token crops scoring a (unscaled);
    # floor(w * 2) = 0 everywhere, +1 to the two largest weights, emitted in crop order
    for crops in (9, 5):
        kept, n_pad = holov_select(z, a, 2, crops)
        assert kept.tolist() == [1, 3] and n_pad == 0


def test_within_crop_choice_follows_raw_attention():
    z = torch.eye(3)[[0, 1, 2, 0]]  # tokens 0 and 3 alike: v = [7/27, 0, 0, 7/27]
    a = torch.tensor([0.300, 0.301, 0.301, 0.100])
    v = ref_token_terms(z)[1].tolist()
    assert v == pytest.approx([7 / 27, 0, 0, 7 / 27], abs=1e-6)
    scaled = [1000 * x for x in a.tolist()]
    gamma = sum(scaled) / len(scaled) / (sum(v) / len(v) + EPS)
    h = [s + BETA * gamma * t for s, t in zip(scaled, v)]
    assert ref_top(h, 2) == [0, 1]  # H would keep token 0 first
    kept, n_pad = holov_select(z, a, 2, 1)
    assert kept.tolist() == [1, 2] and n_pad == 0  # raw a, descending, tie 1 / 2 -> lower index first


def test_zero_padding_official_and_redistributed():
    z = torch.randn(576, 32, generator=torch.Generator().manual_seed(0))
    a = torch.zeros(576)
    a[:36] = 1.0
    kept, n_pad = holov_select(z, a, 64, 16, shortfall="zeros")
    assert kept.tolist() == list(range(36)) and n_pad == 28
    kept, n_pad = holov_select(z, a, 64, 16, shortfall="redistribute")
    want = list(range(36))
    for c in range(1, 16):
        want += [36 * c, 36 * c + 1] if c <= 13 else [36 * c]
    assert kept.tolist() == want and n_pad == 0
    sizes = torch.tensor([36] * 16)
    w = torch.zeros(16)
    w[0] = 1.0
    q = redistribute(torch.tensor([64] + [0] * 15), sizes, w)
    assert q.tolist() == [36] + [2] * 13 + [1, 1]


# ------------------------------------------------------------------------------------------ §10.9 Qwen order
QWEN_INFO = ModelInfo(
    family="qwen2_5_vl",
    n_llm_layers=24,
    n_vision_layers=4,
    vision_feature_layer=3,
    vision_has_cls=False,
    attn_implementation="sdpa",
    supports_compact_positions=False,
    supports_vision_stage=False,
)


def window_index(h: int, w: int, window_size: int = 112) -> torch.Tensor:
    """Raster index of the merged token at each position of the tower's window order (1 frame of h x w patches)."""
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(torch.tensor([[1, h, w]]), 2, window_size, 14)
    return index


def select_item(policy, window: torch.Tensor, raster_scores, embeds, before, keep):
    state = policy.plan(QWEN_INFO, keep).state
    n = window.numel()
    shape = ItemShape("image", (GridPart(0, 1, 1, n),), window_order=window)
    ctx = PreLLMItem(
        VisualItem(shape, 0, 5, 0, 0),
        embeds,
        torch.arange(n),
        keep,
        {"vision.received@3": raster_scores},
        before,
        state=state,
    )
    return policy.select_pre_llm(ctx)


def test_qwen_window_order_vs_raster():
    for (h, w), share in [((16, 24), 0.833), ((8, 8), 0.0)]:
        index = window_index(h, w)
        assert abs(float((index != torch.arange(index.numel())).float().mean()) - share) < 1e-3
    g = torch.Generator().manual_seed(3)
    index = window_index(16, 24)
    n = index.numel()
    tower = torch.rand(n, generator=g)  # per merged token, in the tower's (window) order
    raster = tower[torch.argsort(index)]  # what the adapter hands to the policy (fixed order)
    embeds, before = torch.randn(n, 16, generator=g), torch.randn(16, generator=g)
    official = select_item(HoloVPolicy(compat="official"), index, raster, embeds, before, 0.25)
    k = int(n * 0.25)
    want, pad = reference_select(torch.cat([before[None], embeds[:-1]]), tower, k, ref_crops(n, k))
    assert official.offset == -1 and official.ordered and official.padding == pad
    assert official.keep.tolist() == want + [n - 1] * pad  # zero rows stand at the window's last index
    fixed = select_item(HoloVPolicy(compat="fixed"), index, raster, embeds, before, 0.25)
    k = round(n * 0.25)
    want, _ = reference_select(embeds, raster, k, ref_crops(n, k), "redistribute")
    assert fixed.offset == 0 and fixed.keep.tolist() == want
    assert fixed.keep.tolist() != official.keep.tolist()
    # 8 x 8 patches = one window: the window order is the raster order, both orders select the same tokens
    index = window_index(8, 8)
    assert torch.equal(index, torch.arange(16))
    scores, embeds = torch.rand(16, generator=g), torch.randn(16, 16, generator=g)
    sel = select_item(HoloVPolicy(compat="official"), index, scores, embeds, before, 0.5)
    assert sel.keep.tolist() == reference_select(torch.cat([before[None], embeds[:-1]]), scores, 8, 3)[0]


def test_tiny_qwen_adapter_window_order():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    adapter = get_adapter(vlm.model)
    inputs = image_inputs(vlm, 2)
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    shapes = adapter.item_shapes("image", {"image_grid_thw": inputs["image_grid_thw"]}, None, check=False)
    for grid, shape in zip(grids, shapes, strict=True):
        index = window_index(grid[1], grid[2], vlm.model.config.vision_config.window_size)
        assert torch.equal(shape.window_order, index)
        assert torch.equal(adapter.raster_order(grid), torch.argsort(index))
        assert not torch.equal(index, torch.arange(index.numel()))  # 2x2-unit windows: the orders differ


# ------------------------------------------------------------------------------------------ model level
def capture_lm_input(vlm, call) -> list[dict]:
    """kwargs the decoder stack receives on each call (registered after tokenzip: its rebuilt input)."""
    seen: list[dict] = []
    lm = get_adapter(vlm.model).lm

    def hook(module, args, kwargs):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen


def capture_module(module, call) -> tuple[list, list]:
    """(inputs, outputs) of every call of `module` while running `call()`."""
    ins, outs = [], []
    pre = module.register_forward_pre_hook(lambda m, a, k: ins.append((a, dict(k))), with_kwargs=True)
    post = module.register_forward_hook(lambda m, a, o: outs.append(o))
    try:
        with torch.no_grad():
            call()
    finally:
        pre.remove()
        post.remove()
    return ins, outs


class SteeredHoloV(HoloVPolicy):
    """HoloV with its attention signal replaced by `make(ctx)` (a vector over the item's tokens)."""

    def __init__(self, make, **options):
        super().__init__(**options)
        self.make = make

    def select_pre_llm(self, ctx):
        ctx.signals = {**ctx.signals, ctx.state.signal.key: self.make(ctx)}
        return super().select_pre_llm(ctx)


def llava_reference(vlm, inputs):
    """Per image: the CLS query's head-mean attention over the patches at the feature layer, taken from the
    eager twin's own attention weights (same seed, same weights), and the sdpa model's projector features."""
    adapter = get_adapter(vlm.model)
    layer = adapter.info().vision_feature_layer
    module = adapter.vision_attention(layer)
    ins, _ = capture_module(module, lambda: vlm.model(**inputs))
    _, projected = capture_module(adapter.projector, lambda: vlm.model(**inputs))
    eager = get_tiny("llava", "eager").model
    with torch.no_grad():
        weights = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[layer]
    cls = weights[:, :, 0, 1:].mean(1)
    args, kwargs = ins[0]
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    recomputed = encoder_attention_rows(module, hidden, slice(0, 1), kwargs.get("attention_mask"))[:, 0, 1:]
    torch.testing.assert_close(recomputed, cls, atol=1e-5, rtol=0)  # what tokenzip's signal computes
    return cls, projected[0]


@pytest.mark.parametrize("keep", [0.111, 0.5])
def test_llava_selection_order_and_llm_input(keep):
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 2)
    cls, features = llava_reference(vlm, inputs)
    k = round(64 * keep)
    with tokenzip.apply(vlm.model, "holov", keep) as patch:
        seen = capture_lm_input(vlm, lambda: vlm.model(**inputs))[0]
        record = patch.stats.last
    image_id = vlm.model.config.image_token_id
    for b, sample in enumerate(record.samples):
        want, pad = reference_select(features[b], cls[b], k, ref_crops(64, k))
        item = sample.items[0]
        assert item.kept_indices.tolist() == want and pad == 0
        assert item.kept == k and item.padded == 0
        valid = seen["attention_mask"][b].bool()
        embeds = seen["inputs_embeds"][b][valid]
        start = int((inputs["input_ids"][b][inputs["attention_mask"][b].bool()] == image_id).nonzero()[0])
        torch.testing.assert_close(embeds[start : start + k], features[b][want], atol=0, rtol=0)
        assert valid.sum() == inputs["attention_mask"][b].sum() - 64 + k
        positions = seen["position_ids"][b][valid]
        assert torch.equal(positions - positions[0], torch.arange(positions.numel()))


def crop0_hot(ctx):
    a = torch.zeros(ctx.item.length)
    a[:4] = 1.0  # K = 7 -> C = 16 crops of 4: crop 0 takes everything
    return a


def test_llava_zero_padding_enters_the_llm():
    vlm = get_tiny("llava", "sdpa")
    inputs = image_inputs(vlm, 2)
    _, features = llava_reference(vlm, inputs)
    image_id = vlm.model.config.image_token_id
    for shortfall, real, padded in [("zeros", [0, 1, 2, 3], 3), ("redistribute", [0, 1, 2, 3, 4, 8, 12], 0)]:
        with tokenzip.apply(vlm.model, SteeredHoloV(crop0_hot, shortfall=shortfall), 7) as patch:
            seen = capture_lm_input(vlm, lambda: vlm.model(**inputs))[0]
            record = patch.stats.last
            tokens, logits = cached_greedy(vlm.model, inputs, STEPS)
            with patch.replay():
                reference = uncached_logits(vlm.model, inputs, tokens)
            for b in range(2):  # bs=2 (left padding) equals bs=1
                one_tokens, one_logits = cached_greedy(vlm.model, single_inputs(vlm, b), STEPS)
                assert torch.equal(one_tokens[0], tokens[b])
                torch.testing.assert_close(one_logits[0], logits[b], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
        assert torch.equal(greedy_tokens(vlm.model, reference), tokens)
        for b, sample in enumerate(record.samples):
            item = sample.items[0]
            assert item.kept_indices.tolist() == real and item.kept == len(real) and item.padded == padded
            valid = seen["attention_mask"][b].bool()
            embeds = seen["inputs_embeds"][b][valid]
            assert embeds.shape[0] == inputs["attention_mask"][b].sum() - 64 + 7  # K rows, zeros included
            start = int((inputs["input_ids"][b][inputs["attention_mask"][b].bool()] == image_id).nonzero()[0])
            torch.testing.assert_close(embeds[start : start + len(real)], features[b][real], atol=0, rtol=0)
            assert torch.all(embeds[start + len(real) : start + 7] == 0)
            assert not torch.all(embeds[start + 7] == 0)  # the text after the image is untouched
            positions = seen["position_ids"][b][valid]
            assert torch.equal(positions - positions[0], torch.arange(positions.numel()))


def qwen_reference(vlm, inputs):
    """Unpatched LLM input (embeds, positions) and the last vision block's mean received attention per merged
    token in the tower's window order (single image)."""
    adapter = get_adapter(vlm.model)
    block = adapter.vision_attention(len(adapter.vision_layers) - 1)
    ins, _ = capture_module(block, lambda: vlm.model(**inputs))
    args, kwargs = ins[0]
    hidden = args[0] if args else kwargs["hidden_states"]
    cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
    per_patch = qwen_vision_attention_received(block, hidden, cu, kwargs["position_embeddings"])
    tower = per_patch.view(-1, 4).mean(1)
    base = capture_lm_input(vlm, lambda: vlm.model(**inputs))[0]
    return base["inputs_embeds"][0], base["position_ids"][:, 0], tower


def expected_qwen_input(embeds, positions, start, n, kept, pad, offset):
    """The LLM input of a window [start + offset, start + offset + n) keeping `kept` then `pad` zero rows at
    the window's last position, the run's last |offset| tokens after it."""
    w0 = start + offset
    idx = torch.tensor([w0 + i for i in kept] + [w0 + n - 1] * pad, dtype=torch.long)
    rows = embeds[idx].clone()
    rows[len(kept) :] = 0
    new_embeds = torch.cat([embeds[:w0], rows, embeds[w0 + n :]])
    new_pos = torch.cat([positions[:, :w0], positions[:, idx], positions[:, w0 + n :]], 1)
    return new_embeds, new_pos


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("compat", ["official", "fixed"])
def test_qwen_window_offset_and_positions(compat, index):
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    adapter = get_adapter(vlm.model)
    inputs = single_inputs(vlm, index)
    embeds, positions, tower = qwen_reference(vlm, inputs)
    ids = inputs["input_ids"][0]
    start = int((ids == vlm.model.config.image_token_id).nonzero()[0])
    assert int(ids[start - 1]) == vlm.model.config.vision_start_token_id
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    n = tower.numel()
    dropped_vision_start = False
    for keep in (0.25, 0.5):
        with tokenzip.apply(vlm.model, "holov", keep, compat=compat) as patch:
            seen = capture_lm_input(vlm, lambda: vlm.model(**inputs))[0]
            item = patch.stats.last.samples[0].items[0]
        if compat == "official":
            k = int(n * keep)
            window = torch.cat([embeds[start - 1 : start], embeds[start : start + n - 1]])
            kept, pad = reference_select(window, tower, k, ref_crops(n, k))
            offset = -1
            assert item.kept_indices.tolist() == [i - 1 for i in kept] + [n - 1]  # last image token always kept
            dropped_vision_start |= 0 not in kept
        else:
            k = round(n * keep)
            raster = tower[adapter.raster_order(grid)]
            kept, pad = reference_select(embeds[start : start + n], raster, k, ref_crops(n, k), "redistribute")
            offset = 0
            assert item.kept_indices.tolist() == kept
        want_embeds, want_pos = expected_qwen_input(embeds, positions, start, n, kept, pad, offset)
        assert torch.equal(seen["inputs_embeds"][0], want_embeds)
        assert torch.equal(seen["position_ids"][:, 0], want_pos)
        assert torch.equal(seen["attention_mask"], torch.ones(1, want_embeds.shape[0], dtype=torch.long))
        assert item.padded == pad == 0
    if compat == "official":
        assert dropped_vision_start  # <|vision_start|> is prunable in the released window
    else:  # vision start / end stay around the kept image tokens
        vs = embeds[start - 1]
        assert torch.equal(seen["inputs_embeds"][0][start - 1], vs)
        assert torch.equal(seen["inputs_embeds"][0][start + k], embeds[start + n])


def window_crop0_hot(ctx):
    """Raster-order signal whose window-order image is 1 on window positions 0..5 (crop 0 for N=16, K=8)."""
    window = torch.zeros(ctx.item.length)
    window[:6] = 1.0
    raster = torch.empty_like(window)
    raster[ctx.item.shape.window_order] = window
    return raster


def test_qwen_official_zero_rows_take_the_window_last_position():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    inputs = single_inputs(vlm, 0)  # 4x4 merged tokens; keep 0.5 -> K = 8, C = 3 crops of 6, 5, 5
    embeds, positions, _ = qwen_reference(vlm, inputs)
    start = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero()[0])
    with tokenzip.apply(vlm.model, SteeredHoloV(window_crop0_hot, compat="official"), 0.5) as patch:
        seen = capture_lm_input(vlm, lambda: vlm.model(**inputs))[0]
        item = patch.stats.last.samples[0].items[0]
        tokens, logits = cached_greedy(vlm.model, inputs, STEPS)
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert item.kept_indices.tolist() == [-1, 0, 1, 2, 3, 4, 15] and item.padded == 2
    want_embeds, want_pos = expected_qwen_input(embeds, positions, start, 16, list(range(6)), 2, -1)
    assert torch.equal(seen["inputs_embeds"][0], want_embeds)
    assert torch.equal(seen["position_ids"][:, 0], want_pos)
    assert torch.equal(seen["position_ids"][:, 0, start + 5 : start + 7], positions[:, [start + 14] * 2])


@pytest.mark.parametrize("compat", ["official", "fixed"])
def test_qwen_cached_generation_batch_and_positions(compat):
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    inputs = image_inputs(vlm, 2)
    base_rows = record_rope_rows(vlm, lambda: cached_greedy(vlm.model, inputs, STEPS))
    with tokenzip.apply(vlm.model, "holov", 0.25, compat=compat) as patch:
        out = []
        rows = record_rope_rows(vlm, lambda: out.append(cached_greedy(vlm.model, inputs, STEPS)))
        tokens, logits = out[0]
        record = patch.stats.last
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
        for b in range(2):
            single = single_inputs(vlm, b)
            one_tokens, one_logits = cached_greedy(vlm.model, single, STEPS)
            assert torch.equal(one_tokens[0], tokens[b])
            torch.testing.assert_close(one_logits[0], logits[b], atol=1e-4, rtol=1e-4)
            assert patch.stats.last.samples[0].items[0].kept_indices.tolist() == (
                record.samples[b].items[0].kept_indices.tolist()
            )
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy_tokens(vlm.model, reference), tokens)
    for step in range(1, STEPS):  # decode positions continue from the unpruned sequence
        assert torch.equal(rows[step], base_rows[step])


@pytest.mark.parametrize(
    ("family", "kind", "compat"),
    [
        ("qwen2_5_vl", "video", "official"),
        ("qwen2_5_vl", "multi", "official"),
        ("qwen2_5_vl", "multi", "fixed"),
        ("llava_onevision", "video", None),
        ("llava_onevision", "multi", None),
        ("llava", "multi", None),
    ],
)
def test_video_and_multi_image_generation(family, kind, compat):
    vlm = get_tiny(family, "sdpa")
    inputs = video_inputs(vlm) if kind == "video" else multi_image_inputs(vlm)
    with tokenzip.apply(vlm.model, "holov", 0.25, compat=compat) as patch:
        tokens, logits = cached_greedy(vlm.model, inputs, STEPS)
        record = patch.stats.last
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    for sample in record.samples:
        for item in sample.items:
            budget = round(item.content * 0.25)
            if family == "qwen2_5_vl" and compat == "official":
                # K window slots (vision start included) + the always-kept last token
                vision_start = int((item.kept_indices == -1).sum())
                assert item.kept + vision_start + item.padded == int(item.content * 0.25) + 1
                assert item.kept_indices[-1] == item.tokens - 1
            else:
                assert item.kept == budget and item.padded == 0
            if family == "llava_onevision" and kind == "video":
                assert item.kept_indices[-1] == item.tokens - 1  # the trailing newline stays, last


def first_content_hot(ctx):
    a = torch.zeros(ctx.item.length)
    a[ctx.item.shape.content_mask().nonzero().flatten()[:3]] = 1.0
    return a


def test_onevision_shortfall_and_row_newlines():
    vlm = get_tiny("llava_onevision", "sdpa")
    inputs = image_inputs(vlm, 1)
    cases = [({"compat": "official"}, True), ({"compat": "official", "newlines": "keep_nonempty_rows"}, False)]
    for options, zero_rows in cases:
        with tokenzip.apply(vlm.model, SteeredHoloV(first_content_hot, **options), 0.25) as patch:
            with torch.no_grad():
                vlm.model(**inputs)
            item = patch.stats.last.samples[0].items[0]
        budget = round(item.content * 0.25)
        assert item.kept + item.padded == budget  # the budget is always met, with zero rows or real tokens
        assert (item.padded > 0) == zero_rows
        if not zero_rows:  # raster order, a newline after every row that keeps a token
            assert torch.equal(item.kept_indices, torch.sort(item.kept_indices).values)
    with pytest.raises(PolicyOptionError):
        HoloVPolicy(shortfall="zeros", newlines="keep_nonempty_rows")


def test_options_and_family_defaults():
    for bad in ({"beta": True}, {"beta": "x"}, {"crops": 0}, {"compat": "paper"}, {"shortfall": "drop"}):
        with pytest.raises(PolicyOptionError):
            HoloVPolicy(**bad)
    policy = HoloVPolicy()
    for family, compat in (("llava", "official"), ("qwen2_5_vl", "fixed"), ("llava_onevision", "fixed")):
        info = ModelInfo(family, 24, 4, 2, family == "llava", "sdpa", family != "qwen2_5_vl", False)
        assert policy.rules(info) == compat
        assert policy.plan(info, 0.5).state.official == (compat == "official")
    assert HoloVPolicy(compat="official").options["compat"] == "official"


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "qwen3_vl"])
def test_keep_one_is_bit_identical_and_remove_restores(family):
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 2)
    with torch.no_grad():
        base = vlm.model(**inputs).logits
    for compat in ("official", "fixed"):
        with tokenzip.apply(vlm.model, "holov", 1.0, compat=compat), torch.no_grad():
            same = vlm.model(**inputs).logits
        assert torch.equal(same, base)
    patch = tokenzip.apply(vlm.model, "holov", 0.25)
    with torch.no_grad():
        pruned = vlm.model(**inputs).logits
    patch.remove()
    with torch.no_grad():
        after = vlm.model(**inputs).logits
    assert pruned.shape[1] < base.shape[1]
    assert torch.equal(after, base)
