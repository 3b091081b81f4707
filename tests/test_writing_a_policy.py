"""The policy author's API, as docs/writing-a-policy.md presents it.

* The guide's example policy (its first python block, run as written) works on all three families: budgets met
  per item, keep=1.0 bit-identical, cached generation = cache-free recomputation, bs=2 = 2 x bs=1, video.
* A policy from another package's `tokenzip.policies` entry point is found without editing tokenzip; a broken
  entry point is skipped with a warning.
* `LLMScorerPolicy` meets the layer-averaged budget and refuses an unreachable one.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, VIDEO_FAMILIES, get_tiny, image_inputs, single_inputs, video_inputs

import tokenzip
from tokenzip.budget import item_budget
from tokenzip.contexts import LLMStageContext
from tokenzip.errors import BudgetError, PolicyOptionError, TokenzipWarning
from tokenzip.policies import Int, LLMScorerPolicy, registry
from tokenzip.reference import cached_greedy, uncached_logits

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-policy.md"
STEPS = 3


@pytest.fixture
def private_registry(monkeypatch):
    """Policies registered by a test disappear after it (the registry is process-wide)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)


def guide_example() -> str:
    return re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)


@pytest.fixture
def saliency(private_registry, monkeypatch):
    """The guide's example, executed as a module of its own (as a user's file would be)."""
    module = types.ModuleType("guide_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(guide_example(), str(GUIDE), "exec"), module.__dict__)
    return module.SaliencyPolicy


def test_the_example_is_about_thirty_lines_and_documented():
    code = [line for line in guide_example().splitlines() if line.strip()]
    assert len(code) <= 32


def test_the_example_is_a_checked_frozen_policy(saliency):
    assert tokenzip.list_policies()["saliency"].startswith("vision attention")
    assert "novelty" in saliency.__doc__
    assert repr(saliency(novelty=0.5)) == "SaliencyPolicy(newlines='keep_nonempty_rows', novelty=0.5)"
    with pytest.raises(PolicyOptionError, match="novelty=-1"):
        saliency(novelty=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        saliency().novelty = 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_example_runs_on_every_family_with_batches_and_the_cache(saliency, family):
    vlm = get_tiny(family, "sdpa")
    policy = saliency(novelty=0.5)
    inputs = image_inputs(vlm, 2)
    base_tokens, _ = cached_greedy(vlm.model, inputs, STEPS)
    with tokenzip.apply(vlm.model, policy, 1.0):
        assert torch.equal(cached_greedy(vlm.model, inputs, STEPS)[0], base_tokens)
    with tokenzip.apply(vlm.model, policy, 0.3) as patch:
        tokens, logits = cached_greedy(vlm.model, inputs, STEPS)
        record = patch.stats.history[0]
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
        for index in range(2):
            single, single_logits = cached_greedy(vlm.model, single_inputs(vlm, index), STEPS)
            assert torch.equal(single[0], tokens[index])
            torch.testing.assert_close(single_logits[0], logits[index], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    for sample in record.samples:
        for item in sample.items:
            assert item.kept == item_budget(0.3, item.content)
        assert sample.on_budget


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_the_example_runs_on_video(saliency, family):
    vlm = get_tiny(family, "sdpa")
    inputs = video_inputs(vlm)
    with tokenzip.apply(vlm.model, saliency(), 0.25) as patch:
        tokens, logits = cached_greedy(vlm.model, inputs, STEPS)
        items = patch.stats.history[0].samples[0].items  # one video; Qwen3-VL: one item per temporal patch
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    assert len(items) == (2 if family == "qwen3_vl" else 1)
    assert all(it.modality == "video" and it.kept == item_budget(0.25, it.content) for it in items)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_one_instance_drives_two_families_at_once(saliency):
    policy = saliency()
    llava, qwen = get_tiny("llava", "sdpa"), get_tiny("qwen2_5_vl", "sdpa")
    with tokenzip.apply(llava.model, policy, 0.25) as a, tokenzip.apply(qwen.model, policy, 0.25) as b:
        with torch.no_grad():
            llava.model(**image_inputs(llava, 1))
            qwen.model(**image_inputs(qwen, 1))
        assert a.policy is policy is b.policy
        assert a.stats.last.samples[0].on_budget and b.stats.last.samples[0].on_budget


# ------------------------------------------------------------------------------------------ plug-ins
PLUGIN = '''
from dataclasses import dataclass

import torch

from tokenzip.policies import ScorerPolicy


@dataclass(frozen=True)
class Centre(ScorerPolicy):
    """Keep the tokens nearest the centre of the placeholder run."""

    name = "plugin_centre"
    description = "test plug-in: tokens nearest the middle of the item"

    def score(self, ctx):
        n = ctx.item.length
        return -(torch.arange(n, dtype=torch.float32) - (n - 1) / 2).abs()
'''


def install_plugin(root: Path, entry: str) -> None:
    """A distribution on sys.path (a module and a dist-info with one `tokenzip.policies` entry point)."""
    (root / "tz_plugin_demo.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "tz_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tz-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[tokenzip.policies]\n{entry}\n")


def test_a_policy_from_an_entry_point_is_found_without_editing_tokenzip(private_registry, tmp_path, monkeypatch):
    install_plugin(tmp_path, "centre = tz_plugin_demo:Centre")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin_centre" in tokenzip.list_policies()
    vlm = get_tiny("llava", "sdpa")
    with tokenzip.apply(vlm.model, "plugin_centre", 0.25) as patch, torch.no_grad():
        vlm.model(**image_inputs(vlm, 1))
    item = patch.stats.last.samples[0].items[0]
    n = item.content
    middle = torch.arange(n)[(torch.arange(n) - (n - 1) / 2).abs().argsort(stable=True)[: item_budget(0.25, n)]]
    assert item.kept_indices.tolist() == sorted(middle.tolist())
    monkeypatch.delitem(sys.modules, "tz_plugin_demo")


def test_a_broken_entry_point_is_skipped_with_a_warning(private_registry, tmp_path, monkeypatch):
    install_plugin(tmp_path, "broken = tz_plugin_demo:DoesNotExist")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(TokenzipWarning, match="skipped the policy entry point 'broken'"):
        names = tokenzip.list_policies()
    assert "random" in names and "plugin_centre" not in names
    monkeypatch.delitem(sys.modules, "tz_plugin_demo", raising=False)


# ------------------------------------------------------------------------------------------ LLMScorerPolicy
@dataclasses.dataclass(frozen=True)
class Latest(LLMScorerPolicy):
    """Test scorer: keeps the visual tokens latest in the sequence."""

    name = "latest"
    description = "test only"
    layer: int = Int(3, ge=1, doc="decoder layer")

    def score(self, ctx: LLMStageContext) -> torch.Tensor:
        return ctx.layout.orig.float()


def test_llm_scorer_meets_the_layer_averaged_budget_and_keeps_the_latest_tokens():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    with tokenzip.apply(vlm.model, Latest(), 0.5) as patch, torch.no_grad():
        vlm.model(**image_inputs(vlm, 2))
    for sample in patch.stats.last.samples:
        assert sample.on_budget
        (item,) = sample.items
        kept = sample.visual_per_layer[-1]
        assert sample.visual_per_layer[:3] == [item.content] * 3  # all before layer 3
        last = item.stages[-1][1]  # item-local tokens present after layer 3's stage
        assert last.tolist() == list(range(item.content - kept, item.content))
    patch = tokenzip.apply(vlm.model, Latest(), 0.05)
    with pytest.raises(BudgetError, match="smallest reachable keep"), torch.no_grad():
        vlm.model(**image_inputs(vlm, 1))
    patch.remove()
