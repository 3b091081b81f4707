"""DART (docs/specs/dart.md): the selection equals the spec's reference (§3) on fixed tensors, ties and the pivot
order included; counts equal the budget; bad options are refused; inside the tiny models the kept set equals the
reference applied to what the policy saw (layer K-1's post-RoPE keys, the hidden states entering layer K through
the LLM's final norm), on all three families.

The reference is plain Python (lists, sorted, a set for the pivot order) with float64 cosines; the library is
vectorised in float32. On the models, keys and hidden states are captured by hooks of the test's own (the rotary
function of the decoder, a pre-hook of layer K registered before tokenzip's), never from tokenzip's signals.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import FAMILIES, forward_with_hooks, get_tiny, image_inputs, multi_image_inputs

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.budget import item_budget, one_stage_count
from tokenzip.errors import BudgetError, PolicyOptionError, TokenzipError
from tokenzip.policies.dart import DARTPolicy, dart_select, pivot_order


def ref_top(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, descending, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[: max(0, k)]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / max(na * nb, 1e-8)


def reference(img_norms, txt_norms, img_states, txt_states, img_pos, txt_pos, count, p=4, t=4) -> list[int]:
    """The spec's §3, one element at a time."""
    img_norms, txt_norms = [float(x) for x in img_norms], [float(x) for x in txt_norms]
    img_states = [[float(x) for x in row] for row in img_states]
    txt_states = [[float(x) for x in row] for row in txt_states]
    img_pos, txt_pos = [int(x) for x in img_pos], [int(x) for x in txt_pos]
    n = len(img_norms)
    if count >= n:
        return list(range(n))
    ip = ref_top(img_norms, min(p, count))
    tp = ref_top(txt_norms, min(t, len(txt_norms)))
    vectors = [img_states[j] for j in ip] + [txt_states[j] for j in tp]
    positions = [img_pos[j] for j in ip] + [txt_pos[j] for j in tp]
    order = [positions.index(x) for x in set(positions)]  # §3: CPython's iteration order of the position set
    share, extra = divmod(count - len(ip), len(vectors))
    kept = list(ip)
    candidates = [j for j in range(n) if j not in ip]  # ascending
    for rank, q in enumerate(order):
        want = share + (1 if rank < extra else 0)
        sims = {c: cosine(vectors[q], img_states[c]) for c in candidates}
        picked = sorted(candidates, key=lambda c: (sims[c], c))[:want]  # least similar first, ties to lower index
        kept += picked
        candidates = [c for c in candidates if c not in picked]
    return sorted(kept)


def random_case(seed: int, n: int, n_text: int, dim: int = 12, duplicates: bool = False):
    g = torch.Generator().manual_seed(seed)
    norms = torch.rand(n + n_text, generator=g) * 10
    states = torch.randn(n + n_text, dim, generator=g)
    if duplicates:  # a few directions shared by many tokens, as redundant patches
        protos = torch.randn(5, dim, generator=g)
        states[:n] = protos[torch.randint(0, 5, (n,), generator=g)] * (torch.rand(n, 1, generator=g) + 0.5)
        states[:n] += 0.01 * torch.randn(n, dim, generator=g)
    start = int(torch.randint(0, 80, (1,), generator=g))
    positions = torch.arange(start, start + n + n_text + 5)
    gap = int(torch.randint(0, 5, (1,), generator=g))  # text after the image need not follow it directly
    pos = torch.cat([positions[:n], positions[n + gap : n + gap + n_text]])
    return norms[:n], norms[n:], states[:n], states[n:], pos[:n], pos[n:]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("duplicates", [False, True])
def test_selection_equals_the_reference(seed, duplicates):
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(2, 150, (1,), generator=g))
    n_text = int(torch.randint(0, 12, (1,), generator=g))
    case = random_case(seed, n, n_text, duplicates=duplicates)
    for count in sorted({1, 3, 4, 5, max(1, n // 9), max(1, n // 4), 4 + 8 * max(0, (n - 4) // 16), n - 1, n}):
        for p, t in ((4, 4), (1, 0), (2, 7)):
            got = dart_select(*case, count, p, t).tolist()
            assert got == reference(*case, count, p, t), (n, n_text, count, p, t)
            assert len(got) == min(count, n) and len(set(got)) == len(got)


def test_image_pivots_are_kept_and_text_pivots_are_not():
    norms, txt_norms, states, txt_states, pos, txt_pos = random_case(3, 40, 6)
    kept = dart_select(norms, txt_norms, states, txt_states, pos, txt_pos, 12).tolist()
    assert set(torch.topk(norms, 4).indices.tolist()) <= set(kept)
    assert all(0 <= k < 40 for k in kept)


def test_ties_go_to_the_lower_index():
    """Equal key norms: the lower indices are the pivots; equal cosines: the lower candidates are claimed."""
    norms = torch.ones(8)
    states = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 6)  # pivots 0, 1 (tie on norm); 2..7 all orthogonal
    kept = dart_select(norms, torch.zeros(0), states, torch.zeros(0, 2), torch.arange(8), torch.zeros(0), 5, 2, 0)
    assert kept.tolist() == [0, 1, 2, 3, 4]  # cos = 0 for every candidate: 2, 3, 4 in index order
    assert kept.tolist() == reference(norms, [], states, [], range(8), [], 5, 2, 0)
    # duplicates: a candidate equal to another ties with it; the lower one goes first
    states = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    norms = torch.tensor([5.0, 1.0, 1.0, 1.0])
    kept = dart_select(norms, torch.zeros(0), states, torch.zeros(0, 2), torch.arange(4), torch.zeros(0), 2, 1, 0)
    assert kept.tolist() == [0, 1]


def test_the_pivot_order_is_the_official_set_order():
    """Positions 9 and 2: a CPython set of them iterates 9 then 2 (9 mod 8 = 1 < 2), so the pivot at 9 claims
    first even though it comes later in the prompt and has the smaller key norm; 10 and 2 collide (10 mod 8 = 2)
    and iterate in insertion order."""
    assert list({2, 9}) == [9, 2]  # the interpreter rule the official code (and this policy) inherits
    assert pivot_order([2], [9]) == [1, 0]
    assert pivot_order([9, 2], []) == [0, 1]
    # Two image pivots, B (token 3, position 2, larger key norm) and A (token 5, position 9 or 10), both least
    # similar to X (token 0); next come Y (token 1) for B and Z (token 2) for A. Whoever claims first gets X.
    states = torch.tensor([[-1.0, 0.0], [-0.2, -1.0], [-1.0, 1.0], [1.0, 0.5], [0.9, 0.1], [1.0, 0.0]])
    norms = torch.tensor([0.0, 0.0, 0.0, 9.0, 0.0, 8.0])
    none, flat = torch.zeros(0), torch.zeros(0, 2)
    for pos_a, want in ((9, [0, 1, 3, 5]), (10, [0, 2, 3, 5])):  # {2, 9} iterates 9 first; {2, 10} iterates 2 first
        pos = torch.tensor([3, 4, 5, 2, 6, pos_a])
        kept = dart_select(norms, none, states, flat, pos, none, 4, 2, 0).tolist()
        assert kept == want == reference(norms, [], states, [], pos, [], 4, 2, 0)
        assert dart_select(norms, none, states, flat, pos, none, 5, 2, 0).tolist() == reference(
            norms, [], states, [], pos, [], 5, 2, 0
        )


def test_remainder_goes_to_the_first_pivots_in_order():
    norms, txt_norms, states, txt_states, pos, txt_pos = random_case(5, 60, 5)
    for count in (4 + 8 * 3, 4 + 8 * 3 + 5, 4 + 8 * 4 - 1):  # divisible, remainder 5, remainder 7
        got = dart_select(norms, txt_norms, states, txt_states, pos, txt_pos, count).tolist()
        assert got == reference(norms, txt_norms, states, txt_states, pos, txt_pos, count)
        assert len(got) == count


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"image_pivots": 0}, "image_pivots"),
        ({"text_pivots": -1}, "text_pivots"),
        ({"layer": 0}, "layer"),
        ({"layer": 1.5}, "layer"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(PolicyOptionError, match=match):
        DARTPolicy(**options)


def test_a_layer_outside_the_llm_is_refused():
    vlm = get_tiny("llava", "sdpa")
    n = get_adapter(vlm.model).info().n_llm_layers
    with pytest.raises(PolicyOptionError, match=f"layer={n}"):
        tokenzip.apply(vlm.model, "dart", 0.3, layer=n)


def test_an_unreachable_budget_names_the_smallest_keep():
    vlm = get_tiny("llava", "sdpa")
    with pytest.raises(BudgetError, match="keep"), tokenzip.apply(vlm.model, "dart", 1):
        forward_with_hooks(vlm.model, image_inputs(vlm, 1), [])


def test_pivot_positions_must_differ():
    with pytest.raises(TokenzipError, match="distinct"):
        pivot_order([3], [3])


# --------------------------------------------------------------------------------------------------------------
# Inside the tiny models: the kept set equals the reference on what the policy saw


def capture(vlm, inputs, keep: float, layer: int = 2, **options):
    """Run `dart` and capture, with the test's own hooks, the post-RoPE keys of layer K-1 (from the decoder's rotary
    function) and the hidden states entering layer K (a pre-hook registered before tokenzip's)."""
    lm = vlm.model.model.language_model
    module = importlib.import_module(type(lm.layers[0].self_attn).__module__)
    original = module.apply_rotary_pos_emb
    keys: list[torch.Tensor] = []

    def recording(q, k, cos, sin, *args, **kwargs):
        out = original(q, k, cos, sin, *args, **kwargs)
        keys.append(out[1].detach().clone())
        return out

    seen = {}

    def layer_input(module, args, kwargs):
        seen.setdefault("hidden", (args[0] if args else kwargs["hidden_states"]).detach().clone())

    hook = lm.layers[layer].register_forward_pre_hook(layer_input, with_kwargs=True)
    module.apply_rotary_pos_emb = recording
    try:
        with tokenzip.apply(vlm.model, "dart", keep, layer=layer, **options) as patch:
            forward_with_hooks(vlm.model, inputs, [hook])
            kept = [rec[0] for rec in patch._runtime.decisions.llm[layer]]
            record = patch.stats.last
    finally:
        module.apply_rotary_pos_emb = original
    return keys[layer - 1], lm.norm(seen["hidden"]).detach(), kept, record


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["batch", "multi_image"])
def test_the_kept_set_equals_the_reference_on_what_the_policy_saw(family, kind):
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 2) if kind == "batch" else multi_image_inputs(vlm)
    keep, layer = 0.3, 2
    keys, states, kept, record = capture(vlm, inputs, keep, layer)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image = ids == vlm.model.config.image_token_id
    n_layers = get_adapter(vlm.model).info().n_llm_layers
    for b, sample in enumerate(record.samples):
        slots = image[b].nonzero().flatten()  # the placeholder runs (OneVision: content and row newlines)
        content = torch.cat(
            [
                run[it.shape.content_mask()]
                for run, it in zip(
                    split_runs(slots, [it.shape.length for it in sample.items]), sample.items, strict=True
                )
            ]
        )
        text = (mask[b] & ~image[b]).nonzero().flatten()
        text = text[text > slots[-1]]
        orig = mask[b].long().cumsum(0) - 1  # position in the unpadded prompt
        norms = keys[b].float().abs().sum(dim=(0, 2))  # [L]: L1 over all KV heads
        sizes = [it.content for it in sample.items]
        count = one_stage_count(
            "dart", sum(item_budget(keep, s) for s in sizes), sum(sizes), layer, n_layers, keep, sizes
        )
        want = reference(
            norms[content], norms[text], states[b, content], states[b, text], orig[content], orig[text], count
        )
        assert sorted(kept[b].tolist()) == content[want].tolist()
        assert sample.on_budget and len(want) == count


def split_runs(slots: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    out, at = [], 0
    for n in lengths:
        out.append(slots[at : at + n])
        at += n
    return out
