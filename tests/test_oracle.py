"""The `oracle` reference selection: its rule, its budget on every family, its ground truth and its wiring."""

from __future__ import annotations

import functools

import pytest
import torch

import tokenzip
from tokenzip.budget import item_budget
from tokenzip.contexts import PreLLMItem
from tokenzip.errors import UnsupportedInputError
from tokenzip.items import GridPart, ItemShape, VisualItem
from tokenzip.policies.oracle import OraclePolicy, ground_truth, item_coverage, oracle_choice
from tokenzip.synthetic import sample, video_sample
from tokenzip.synthetic.truth import RASTER, coverage, doc_truth, needed_raster
from tokenzip.tiny import dummy_image, ov_video_inputs, qwen_video_inputs, tiny

FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision", "qwen3_vl")


@functools.cache
def _vlm(family: str):
    return tiny(family, text_layers=2)


def reference(cov: dict[int, float], available: list[int], budget: int) -> list[int]:
    """The oracle's rule written plainly: informative (cov > 0) by coverage descending, ties by lower index, up to
    the budget; the rest from the non-informative candidates at positions (k * m) // r in index order."""
    candidates = sorted(available)
    informative = sorted((i for i in candidates if cov[i] > 0), key=lambda i: (-cov[i], i))[:budget]
    rest = [i for i in candidates if cov[i] == 0]
    r = min(budget - len(informative), len(rest))
    return informative + [rest[(k * len(rest)) // r] for k in range(r)]


def _box(frames: int = 1, boxes=((0.1, 0.3, 0.2, 0.6),)) -> torch.Tensor:
    """float [frames, RASTER, RASTER] with the given (y0, y1, x0, x1) boxes (fractions of the side) set to 1."""
    out = torch.zeros(frames, RASTER, RASTER)
    for y0, y1, x0, x1 in boxes:
        out[:, int(y0 * RASTER) : int(y1 * RASTER), int(x0 * RASTER) : int(x1 * RASTER)] = 1
    return out


def _informative(shape: ItemShape, raster: torch.Tensor) -> set[int]:
    """Item-local indices of the content tokens whose cell overlaps `raster`."""
    content = shape.content_mask().nonzero().flatten()
    return set(content[item_coverage(shape, raster) > 0].tolist())


def _content_kept(item) -> list[int]:
    mask = item.shape.content_mask()
    return [i for i in item.kept_indices.tolist() if mask[i]]


# ------------------------------------------------------------------------------------------ (1) the rule


@pytest.mark.parametrize(
    ("cov", "available", "budget"),
    [
        ([0, 0.5, 0, 0.5, 1.0, 0, 0.25, 0, 0, 0], list(range(10)), 5),  # ties (1, 3) and a fill of 1
        ([0, 0.5, 0, 0.5, 1.0, 0, 0.25, 0, 0, 0], list(range(10)), 2),  # informative beyond the budget
        ([0, 0.5, 0, 0.5, 1.0, 0, 0.25, 0, 0, 0], list(range(10)), 9),  # fill of 5 over 6 candidates
        ([0.3, 0, 0, 0.3, 0, 0, 0, 0, 0.3, 0, 0, 0], [11, 8, 0, 5, 3, 2, 9, 7], 6),  # unordered, partly available
        ([0.0] * 7, list(range(7)), 3),  # nothing informative: evenly spaced
        ([1.0] * 4, list(range(4)), 4),  # everything informative
    ],
)
def test_choice_matches_plain_reference(cov: list[float], available: list[int], budget: int) -> None:
    got = oracle_choice(torch.tensor(available), torch.tensor([cov[i] for i in available]), budget)
    assert got.tolist() == reference(dict(enumerate(cov)), available, budget)


def test_item_selection_matches_reference_on_a_packed_grid() -> None:
    """A OneVision-like item (2x2 base grid, 3x4 packed grid with per-row newlines, trailing token): coverage is
    pooled part by part in content order; the pick follows the plain rule on the available content tokens, and
    newlines of rows that keep a token (plus the trailing token) come along."""
    shape = ItemShape("image", (GridPart(0, 1, 2, 2), GridPart(4, 1, 3, 4, newline_per_row=True)), trailing=1)
    raster = _box(boxes=((0.0, 0.3, 0.0, 0.4), (0.7, 1.0, 0.8, 1.0)))
    content = shape.content_mask().nonzero().flatten().tolist()
    cov_parts = [coverage(raster, p.frames, p.rows, p.cols) for p in shape.parts]
    cov = dict(zip(content, torch.cat(cov_parts).tolist(), strict=True))
    available = [i for i in range(shape.length) if i not in (5, 9)]  # two content tokens were pruned earlier
    item = VisualItem(shape, 0, 0, 0, 0)
    ctx = PreLLMItem(item, torch.zeros(shape.length, 4), torch.tensor(available), 0.5)
    with ground_truth([[raster]]):
        sel = OraclePolicy().select_pre_llm(ctx)
    kept = sel.keep.tolist()
    picked = [i for i in kept if shape.content_mask()[i]]
    assert picked == reference(cov, [i for i in available if i in cov], ctx.budget)
    rows = shape.row_index()
    expected_structural = {shape.length - 1} | {
        i for i in shape.newline_mask().nonzero().flatten().tolist() if any(rows[k] == rows[i] for k in picked)
    }
    assert set(kept) - set(picked) == expected_structural


# ------------------------------------------------------------------------------------------ (2) budgets, families


def _family_inputs(family: str, video: bool) -> tuple[dict, torch.Tensor]:
    vlm = _vlm(family)
    if video:
        inputs = qwen_video_inputs(vlm, frames=4) if family == "qwen2_5_vl" else ov_video_inputs(vlm, frames=4)
        return inputs, _box(4, ((0.0, 0.25, 0.0, 0.25),))
    image = dummy_image(112, 112, 0) if family == "llava" else dummy_image(200, 100, 0)  # OneVision: anyres tiles
    return vlm.inputs([image], vlm.prompt()), _box()


CASES = [(f, False) for f in FAMILIES] + [("qwen2_5_vl", True), ("llava_onevision", True)]


@pytest.mark.parametrize(("family", "video"), CASES)
@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_budget_and_informative_tokens_on_every_family(family: str, video: bool, keep: float) -> None:
    """Exactly `item_budget` content tokens enter the LLM; when the informative ones fit they are all kept, else
    only informative ones are."""
    vlm = _vlm(family)
    inputs, raster = _family_inputs(family, video)
    with tokenzip.apply(vlm.model, "oracle", keep) as patch, ground_truth([[raster]]), torch.no_grad():
        vlm.model(**inputs)
        item = patch.stats.last.samples[0].items[0]
    if family == "llava_onevision" and not video:
        assert len(item.shape.parts) == 2 and item.shape.parts[1].newline_per_row  # base grid + packed tiles
    budget = item_budget(keep, item.content)
    informative = _informative(item.shape, raster)
    kept = set(_content_kept(item))
    assert item.kept == len(kept) == budget
    assert 0 < len(informative) < item.content
    if budget >= len(informative):
        assert informative <= kept
    else:
        assert kept <= informative


# ------------------------------------------------------------------------------------------ (3) real v2 data


@pytest.mark.parametrize("family", FAMILIES)
def test_every_informative_token_of_a_v2_sample_is_kept(family: str) -> None:
    """A rendered v2 sample on each family: at a keep whose budget exceeds the informative count, every token the
    question needs is kept (and the budget is met exactly)."""
    vlm = _vlm(family)
    for index in range(3):
        item_sample = sample("test", index, version="v2")
        raster = needed_raster(item_sample)
        inputs = vlm.inputs([item_sample.image(224)], vlm.prompt(item_sample.question.text))
        with tokenzip.apply(vlm.model, "oracle", 0.5) as patch, ground_truth([[raster]]), torch.no_grad():
            vlm.model(**inputs)
            item = patch.stats.last.samples[0].items[0]
        informative = _informative(item.shape, raster)
        assert 0 < len(informative) < item_budget(0.5, item.content), "keep 0.5 must leave room on this sample"
        assert informative <= set(_content_kept(item))
        assert item.kept == item_budget(0.5, item.content)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_every_informative_token_of_a_v2_clip_is_kept(family: str) -> None:
    """A v2 clip's ground truth (4 frames) on video inputs of the same frame count: all informative tokens kept."""
    vlm = _vlm(family)
    clip = video_sample("test", 1, frames=(4, 4), version="v2")
    raster = needed_raster(clip)
    inputs = qwen_video_inputs(vlm, frames=4) if family == "qwen2_5_vl" else ov_video_inputs(vlm, frames=4)
    with tokenzip.apply(vlm.model, "oracle", 0.5) as patch, ground_truth([[raster]]), torch.no_grad():
        vlm.model(**inputs)
        item = patch.stats.last.samples[0].items[0]
    informative = _informative(item.shape, raster)
    assert 0 < len(informative) <= item_budget(0.5, item.content)
    assert informative <= set(_content_kept(item))


# ------------------------------------------------------------------------------------------ (4) batches


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_equals_two_single_runs(family: str) -> None:
    vlm = _vlm(family)
    images = [dummy_image(112, 112, 0), dummy_image(112, 112, 1)]
    prompts = [vlm.prompt("What is in the image ?"), vlm.prompt("Describe this image")]
    truths = [[_box()], [_box(boxes=((0.5, 0.9, 0.5, 0.7),))]]
    patch = tokenzip.apply(vlm.model, "oracle", 0.25)
    try:
        with ground_truth(truths), torch.no_grad():
            vlm.model(**vlm.inputs(images, prompts))
        batch = patch.stats.last
        for b in range(2):
            with ground_truth([truths[b]]), torch.no_grad():
                vlm.model(**vlm.inputs(images[b : b + 1], prompts[b]))
            single = patch.stats.last.samples[0].items[0]
            assert batch.samples[b].items[0].kept_indices.tolist() == single.kept_indices.tolist()
        first, second = (set(batch.samples[b].items[0].kept_indices.tolist()) for b in range(2))
        assert first != second  # each sample read its own truth
    finally:
        patch.remove()


# ------------------------------------------------------------------------------------------ (5) bad truth


@pytest.mark.parametrize(
    ("truth", "match"),
    [
        (None, "needs the generator's ground truth"),
        ([[_box()]], r"gives \[1\] rasters per sample, the batch holds \[1, 1\]"),
        ([[_box()], [_box(), _box()]], r"gives \[1, 2\] rasters per sample"),
        ([[_box()], []], r"gives \[1, 0\] rasters per sample"),
    ],
)
def test_missing_or_mismatched_truth_raises(truth, match: str) -> None:
    vlm = _vlm("llava")
    inputs = vlm.inputs([dummy_image(seed=0), dummy_image(seed=1)], [vlm.prompt(), vlm.prompt("Describe")])
    with tokenzip.apply(vlm.model, "oracle", 0.25), torch.no_grad(), pytest.raises(UnsupportedInputError, match=match):
        if truth is None:
            vlm.model(**inputs)
        else:
            with ground_truth(truth):
                vlm.model(**inputs)


def test_truth_of_the_wrong_form_or_frame_count_raises() -> None:
    for bad in (_box(), [_box()], [[torch.zeros(RASTER, RASTER)]], [["raster"]]):
        with pytest.raises(UnsupportedInputError, match=r"ground_truth\(truth\)"), ground_truth(bad):
            pass
    vlm = _vlm("qwen2_5_vl")  # 4 source frames = 2 token frames; a 1-frame raster cannot cover them
    message = "has 1 frames, which cannot cover the item's 2 token frames"
    with tokenzip.apply(vlm.model, "oracle", 0.25), ground_truth([[_box(1)]]), torch.no_grad():  # noqa: SIM117
        with pytest.raises(UnsupportedInputError, match=message):
            vlm.model(**qwen_video_inputs(vlm, frames=4))
    assert tokenzip.policies.oracle.current_truth() is None  # the context variable is reset on exit


def test_bench_refuses_the_oracle() -> None:
    from tokenzip.bench import BenchSettings

    with pytest.raises(ValueError, match="ground truth"):
        BenchSettings(policies=["pool", "oracle"], keeps=[0.25])


def test_description_says_not_deployable() -> None:
    text = tokenzip.list_policies()["oracle"]
    assert "NOT deployable" in text and "ground truth" in text and "upper bound" in text
    assert "NOT deployable" in tokenzip.policies.oracle.__doc__


# ------------------------------------------------------------------------------------------ (6) lmms-eval docs


def test_doc_truth_of_image_and_video_docs() -> None:
    image_doc = {"uid": "v2/test/4", "split": "test", "index": 4, "seed": 0, "version": "v2", "question": "?"}
    truth = doc_truth(image_doc)
    assert len(truth) == 1 and truth[0].shape == (1, RASTER, RASTER)
    assert torch.equal(truth[0], needed_raster(sample("test", 4, version="v2")))
    assert not torch.equal(truth[0], doc_truth({**image_doc, "version": "v1"})[0])  # the version is honoured
    video_doc = {"uid": "video/test/2", "split": "test", "index": 2, "seed": 0, "frames": 8}
    truth = doc_truth(video_doc)
    assert len(truth) == 1 and truth[0].shape == (8, RASTER, RASTER)
    assert torch.equal(truth[0], needed_raster(video_sample("test", 2, 0, frames=(8, 8))))
    with pytest.raises(UnsupportedInputError, match="only tokenzip's synthetic tasks"):
        doc_truth({"question": "What is this?", "image": None})


def test_lmms_plugin_runs_the_oracle_on_synthetic_docs() -> None:
    """The plug-in's generation step wraps `generate` in the documents' ground truth (and refuses other docs)."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (bash scripts/install-lmms-eval-cpu.sh)")
    from tokenzip.evaluation.lmms_model import TokenzipLMMS

    vlm = _vlm("llava")
    doc = {"split": "test", "index": 3, "seed": 0, "version": "v2"}
    item_sample = sample("test", 3, version="v2")
    inputs = vlm.inputs([item_sample.image(112)], vlm.prompt(item_sample.question.text))
    plugin = TokenzipLMMS.__new__(TokenzipLMMS)  # only what `_run` uses: the model and its processor
    plugin.model, plugin.processor = vlm.model, vlm.processor
    lengths = inputs["attention_mask"].sum(-1).tolist()
    _, record, _ = plugin._run("oracle", 0.5, {}, inputs, {"max_new_tokens": 1}, [], lengths, [doc])
    item = record.samples[0].items[0]
    assert _informative(item.shape, doc_truth(doc)[0]) <= set(_content_kept(item))
    with pytest.raises(UnsupportedInputError, match="only tokenzip's synthetic tasks"):
        plugin._run("oracle", 0.5, {}, inputs, {"max_new_tokens": 1}, [], lengths, [{"question": "?"}])
