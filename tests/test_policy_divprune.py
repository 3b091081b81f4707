"""DivPrune (docs/specs/divprune.md): the selection equals the spec's reference index for index, ties included;
the policy picks from the LLM-input embeddings of each item and keeps exactly its budget, in sequence order.

The reference below follows the spec's pseudo-code literally (recompute the column minimum over every pick at each
step, `topk` / `argmax` as the released code uses them); the library keeps a running minimum instead.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, get_tiny, image_inputs

import tokenzip
from tokenzip.budget import item_budget
from tokenzip.policies.divprune import cosine_distances, divprune_select


def reference(features: torch.Tensor, k: int) -> list[int]:
    """The spec's §3 pseudo-code: d = 1 - cos; pick 0 = argmax of each column's second-smallest distance; pick i =
    argmax over columns of the minimum over the picked rows."""
    unit = features / features.norm(dim=1, keepdim=True)
    d = 1.0 - unit @ unit.t()
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(d, 2, dim=0, largest=False).values[1]
        else:
            scores = d[torch.tensor(picks)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return picks


@pytest.mark.parametrize("seed", range(12))
def test_selection_equals_the_reference_index_for_index(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(3, 160, (1,), generator=g))
    features = torch.randn(n, 24, generator=g)
    for k in sorted({1, 2, max(1, n // 9), max(1, n // 3), n - 1}):
        assert divprune_select(cosine_distances(features), k).tolist() == reference(features, k), (n, k)


def test_ties_go_to_the_lower_index():
    """Four unit vectors at 90 degrees (every pairwise distance 1) and their copies scaled: all first-pick scores tie,
    so the first pick is token 0; the next picks follow the index order among the tied farthest tokens."""
    basis = torch.eye(4)
    features = torch.cat([basis, 2 * basis[:2]])  # tokens 4, 5 point like 0, 1 (distance 0 to them)
    picks = divprune_select(cosine_distances(features), 4).tolist()
    assert picks == reference(features, 4)
    assert picks[0] == 2  # tokens 0, 1 have a twin at distance 0; 2 and 3 tie at 1: the lower index wins
    assert sorted(picks) == [0, 1, 2, 3]  # all distinct directions before any twin


def test_a_token_is_never_picked_twice():
    """The released code can re-pick a token when every remaining candidate duplicates a pick; tokenzip never does."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    picks = divprune_select(cosine_distances(features), 5)
    assert sorted(picks.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_policy_picks_from_each_items_llm_input_embeddings(family):
    vlm = get_tiny(family, "sdpa")
    inputs = image_inputs(vlm, 2)
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].detach().clone())

    hook = vlm.model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:  # registered before apply: it sees the LLM input before tokenzip rebuilds it
        with tokenzip.apply(vlm.model, "divprune", 0.3) as patch, torch.no_grad():
            vlm.model(**inputs)
    finally:
        hook.remove()
    record = patch.stats.last
    for b, sample in enumerate(record.samples):
        assert sample.on_budget
        item = sample.items[0]
        start = int(item_start(vlm, inputs, b))
        embeds = seen["embeds"][b, start : start + item.tokens]
        content = item.shape.content_mask().nonzero().flatten()
        k = item_budget(0.3, item.content)
        want = sorted(content[torch.tensor(reference(embeds[content].float(), k))].tolist())
        got = [i for i in item.kept_indices.tolist() if bool(item.shape.content_mask()[i])]
        assert got == want and item.kept == k


def item_start(vlm, inputs, b: int) -> int:
    """Position of sample b's first image placeholder token."""
    token = vlm.model.config.image_token_id
    return int((inputs["input_ids"][b] == token).nonzero()[0])
