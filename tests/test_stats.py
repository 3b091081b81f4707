"""`patch.stats.last` answers "what did I save": per sample visual tokens in / into the LLM / layer mean vs budget,
prefill FLOPs as run and unpruned, and the policy's selection time, under the same keys for every policy."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, oracle_truth

import tokenzip
from tokenzip.budget import item_budget
from tokenzip.engine.state import ForwardRecord, ItemRecord, PatchStats, SampleRecord
from tokenzip.engine.summary import SELECTION_STAGES, SampleSummary, format_flops, selection_stages
from tokenzip.flops import DecoderDims, VisionDims, breakdown_of_record, projector_flops
from tokenzip.tiny import dummy_image, tiny_llava

POLICIES = sorted(tokenzip.list_policies())
KEEP = 0.5
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def llava8():
    """tiny LLaVA-1.5 with 8 decoder layers and one single-image prompt."""
    vlm = tiny_llava(text_layers=8)
    return vlm, vlm.inputs([dummy_image()], vlm.prompt("What is in the image ?"))


def _record(vlm, inputs, policy, keep) -> ForwardRecord:
    with tokenzip.apply(vlm.model, policy, keep) as patch, torch.no_grad(), oracle_truth(policy, [1]):
        vlm.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return patch.stats.last


@pytest.fixture(scope="module")
def records(llava8):
    """policy -> (record at KEEP, record at keep 1.0) on the 8-layer model."""
    vlm, inputs = llava8
    return {p: (_record(vlm, inputs, p, KEEP), _record(vlm, inputs, p, 1.0)) for p in POLICIES}


def _independent_prefill(config, record: ForwardRecord, b: int) -> float:
    """Prefill FLOPs of sample b from the record's per-layer counts and vision workload, via tokenzip.flops."""
    vdims = VisionDims.from_config(config)
    dims = DecoderDims.from_config(config.get_text_config())
    vision = sum(
        vdims.vit_tower(c["vision_rows"], c["vision_widths"]) + projector_flops(config, c["projector_tokens"])
        for c in record.vision
    )
    llm = sum(dims.layer_prefill(n) for n in record.samples[b].sequence_per_layer)
    return vision / len(record.samples) + llm + dims.lm_head(1)


def test_every_policy_reports_the_same_keys(records):
    names = [f.name for f in dataclasses.fields(SampleSummary)]
    for policy, (pruned, full) in records.items():
        for record in (pruned, full):
            (row,) = record.summary()
            assert list(row.as_dict()) == names, policy
            assert list(row.selection_stages_s) == list(SELECTION_STAGES), policy
            assert list(record.selection_stages_s) == list(SELECTION_STAGES), policy
            assert all(v is not None for v in row.as_dict().values()), policy


@pytest.mark.parametrize("policy", POLICIES)
def test_stats_of_every_policy(policy, records, llava8):
    vlm, _ = llava8
    config = vlm.model.config
    pruned, full = records[policy]
    reference = records["none"][0].summary()[0]
    for record, keep in ((pruned, KEEP), (full, 1.0)):
        (row,) = record.summary()
        sample = record.samples[0]
        # budget: the item_budget sum (policy none keeps everything whatever keep says)
        asked = 1.0 if policy == "none" else keep
        assert row.budget == sum(item_budget(asked, it.content) for it in sample.items) == sample.budget
        assert row.visual_in == sum(it.content for it in sample.items) == 64
        assert row.visual_llm_input == sum(it.kept + it.padded for it in sample.items)
        assert row.visual_layer_mean == sum(sample.visual_per_layer) / 8
        assert row.on_budget == (abs(row.visual_layer_mean - row.budget) <= len(sample.items)) == sample.on_budget
        # FLOPs as run: an independent computation from the per-layer counts (and the batch breakdown at bs 1)
        assert row.prefill_flops == _independent_prefill(config, record, 0)
        assert row.prefill_flops == breakdown_of_record(config, record).prefill
        # unpruned: what the unpatched model (policy none) was measured to cost on this prompt
        assert row.prefill_flops_unpruned == reference.prefill_flops
        assert row.flops_ratio == row.prefill_flops / row.prefill_flops_unpruned
        # selection time: all policy work, per stage, the vision encoder's own time apart
        work = sum(v for k, v in record.seconds.items() if k != "vision_encoder")
        assert row.selection_s == pytest.approx(work) == pytest.approx(sum(row.selection_stages_s.values()))
        assert row.selection_s == record.selection_s
        assert row.vision_encoder_s == record.seconds["vision_encoder"]
        assert row.selection_stages_s == record.selection_stages_s
    assert full.summary()[0].flops_ratio == 1.0 and full.summary()[0].on_budget
    (row,) = pruned.summary()
    if policy == "none":
        assert row.flops_ratio == 1.0 and row.budget == row.visual_in
    else:
        assert row.flops_ratio < 1.0 and row.budget == 32
        assert row.visual_layer_mean < row.visual_in


@pytest.mark.parametrize("policy", ["hiprune", "fastv", "mustdrop", "none"])
def test_repr_shows_the_numbers(policy, records):
    record = records[policy][0]
    text = repr(record)
    (row,) = record.summary()
    assert text.startswith(f"ForwardRecord(policy={policy!r}, keep={KEEP!r})")
    assert f"selection {row.selection_s * 1e3:.2f} ms" in text
    assert f"vision encoder {row.vision_encoder_s * 1e3:.2f} ms" in text
    line = text.splitlines()[2].split()
    expected = [
        "0",
        "1",
        str(row.visual_in),
        str(row.visual_llm_input),
        f"{row.visual_layer_mean:.1f}",
        str(row.budget),
        *(["yes"] if row.on_budget else ["no", f"({row.budget_gap:+.1f})"]),
        *format_flops(row.prefill_flops).split(),
        *format_flops(row.prefill_flops_unpruned).split(),
        f"{row.flops_ratio:.3f}",
    ]
    assert line == expected
    for stage, seconds in row.selection_stages_s.items():
        assert (f"{stage} {seconds * 1e3:.2f}" in text) == (seconds > 0)
    stats = PatchStats()
    stats.history.append(record)
    assert text in repr(stats)


def test_batch_budgets_and_flops_per_sample():
    """Two left-padded samples, one image and two images: per-sample budgets sum over items; per-sample unpruned
    FLOPs equal those measured with policy none on the same batch."""
    vlm = tiny_llava(text_layers=8)
    images = [dummy_image(seed=0), dummy_image(seed=1), dummy_image(seed=2)]
    prompts = [vlm.prompt("What is it ?"), vlm.prompt("Which of the two pictures is brighter ?", images=2)]
    inputs = vlm.inputs(images, prompts)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]
    none = _record(vlm, inputs, "none", 1.0).summary()
    record = _record(vlm, inputs, "pool", 0.25)
    rows = record.summary()
    for b, (row, ref) in enumerate(zip(rows, none, strict=True)):
        sample = record.samples[b]
        assert sample.prompt_tokens == lengths[b]
        assert row.items == b + 1
        assert row.budget == sum(item_budget(0.25, it.content) for it in sample.items) == 16 * (b + 1)
        assert row.prefill_flops_unpruned == ref.prefill_flops
        assert row.prefill_flops == _independent_prefill(vlm.model.config, record, b)
        assert row.flops_ratio < 1.0 and row.on_budget
    assert len(repr(record).splitlines()) == 4


def test_record_without_config_has_no_flops():
    item = ItemRecord("image", 4, 4, 2, torch.tensor([0, 3]))
    sample = SampleRecord([item], [2, 2], [6, 6], [6, 6], budget=2, prompt_tokens=8)
    record = ForwardRecord("pool", 0.5, [sample], {"vision_encoder": 0.5, "pre_llm": 0.25, "llm@3": 0.125})
    (row,) = record.summary()
    assert row.prefill_flops is None and row.flops_ratio is None and row.on_budget
    assert row.selection_stages_s == {"vision": 0.0, "pre_llm": 0.25, "llm": 0.125, "decode": 0.0, "other": 0.0}
    assert row.selection_s == 0.375 and row.vision_encoder_s == 0.5
    assert re.search(r"yes\s+-\s+-\s+-$", repr(record).splitlines()[2])


def test_selection_stages_and_flops_format():
    raw = {"vision_encoder": 1.0, "vision_stage": 0.5, "llm_signals": 0.25, "llm@2": 0.125, "decode": 2.0, "x": 4.0}
    assert selection_stages(raw) == {"vision": 0.5, "pre_llm": 0.0, "llm": 0.375, "decode": 2.0, "other": 4.0}
    assert format_flops(1.234e9) == "1.23 G"
    assert format_flops(2.5e7) == "25.0 M"
    assert format_flops(954e6) == "954 M"
    assert format_flops(12) == "12.0"
    assert format_flops(None) == "-"


def _readme_block(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {re.escape(marker)} -->\n```\w+\n(.*?)```", text, re.S)
    assert match, f"README.md has no block marked {marker!r}"
    return match.group(1)


def test_readme_30_second_example_runs_as_written():
    """The README's 30-second example runs on the bundled model and prints what its output block shows (times
    aside): the decoded answer and the per-sample stats table."""
    code = _readme_block("30-second example")
    shown = _readme_block("30-second output").splitlines()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    printed = out.getvalue().splitlines()
    assert printed[0] == shown[0]  # question -> answer
    assert printed[1].startswith("ForwardRecord(policy='hiprune', keep=0.25): 1 sample; selection ")
    assert printed[2:] == shown[2:]  # the table: tokens, budget, FLOPs, ratio


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_other_families_price_the_unpruned_prompt_as_none_runs_it(family):
    """Qwen2.5-VL (windowed tower, merger) and OneVision (anyres tiles, newlines): the unpruned FLOPs of a pruned
    run are those measured with policy none, and the budget counts grid tokens only."""
    from tokenzip.tiny import tiny

    vlm = tiny(family, text_layers=8)
    inputs = vlm.inputs([dummy_image()], vlm.prompt())
    (none,) = _record(vlm, inputs, "none", 1.0).summary()
    record = _record(vlm, inputs, "pool", 0.25)
    (row,) = record.summary()
    assert none.flops_ratio == 1.0 and none.budget == none.visual_in
    assert row.prefill_flops_unpruned == none.prefill_flops
    assert row.prefill_flops == breakdown_of_record(vlm.model.config, record).prefill
    assert row.budget == item_budget(0.25, record.samples[0].items[0].content) and row.on_budget
    assert row.flops_ratio < 1.0
