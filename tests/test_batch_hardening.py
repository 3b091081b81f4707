"""Batches the engine must handle like single samples: right padding (r04) and samples without images (r07).

Each test compares a batch with one bs=1 run per sample on an 8-layer tiny model (keep 0.5 is reachable by every
policy there): the same kept tokens per item and stage, the same visual tokens per decoder layer, and the
last real token's logits within float noise.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import oracle_truth

import tokenzip
from tokenzip.tiny import TinyVLM, dummy_image, tiny

FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl")
POLICIES = tuple(tokenzip.list_policies())
KEEP = 0.5
ATOL = 1e-4


@functools.cache
def _vlm(family: str) -> TinyVLM:
    return tiny(family, text_layers=8)


def _right_padded(vlm: TinyVLM, images: list, texts: list[str]) -> dict:
    tokenizer = vlm.processor.tokenizer
    tokenizer.padding_side = "right"
    try:
        return dict(vlm.processor(images=images, text=texts, padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = "left"


def _kept(record, b: int) -> list:
    """Per item of sample b: the kept indices and every stage's (name, indices) as lists."""
    return [
        (it.kept_indices.tolist(), it.padded, [(name, idx.tolist()) for name, idx in it.stages])
        for it in record.samples[b].items
    ]


def _run(model, inputs: dict, patch) -> tuple[torch.Tensor, object]:
    with torch.no_grad(), oracle_truth(patch.policy.name, [1] * inputs["input_ids"].shape[0]):  # one image each
        logits = model(**inputs).logits
    return logits, patch.stats.last


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_matches_single_samples(family: str, policy: str) -> None:
    """r04: a right-padded bs=2 batch selects, per sample, the tokens of a bs=1 run (FastV ranked by a pad
    token's attention before), and the output is right-padded like the unpatched model's: sample b's last real
    token sits at slot `sequence_per_layer[-1] - 1` with the bs=1 logits."""
    vlm = _vlm(family)
    images = [dummy_image(seed=0), dummy_image(seed=1)]
    texts = [vlm.prompt("What is in the image ?"), vlm.prompt("Describe the image in one two three four ?")]
    batch = _right_padded(vlm, images, texts)
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1, -1] == 1  # sample 0 is padded
    singles = [vlm.inputs([images[b]], texts[b]) for b in range(2)]
    patch = tokenzip.apply(vlm.model, policy, KEEP)
    try:
        logits, record = _run(vlm.model, batch, patch)
        for b in range(2):
            single_logits, single = _run(vlm.model, singles[b], patch)
            assert _kept(record, b) == _kept(single, 0), f"sample {b} kept other tokens than at bs=1"
            assert record.samples[b].visual_per_layer == single.samples[0].visual_per_layer
            last = record.samples[b].sequence_per_layer[-1] - 1
            assert record.samples[b].sequence_per_layer[-1] == single.samples[0].sequence_per_layer[-1]
            torch.testing.assert_close(logits[b, last], single_logits[0, -1], atol=ATOL, rtol=0)
        if policy != "none":  # something was really pruned, and the padding stayed at the end of sample 0
            assert logits.shape[1] < batch["input_ids"].shape[1]
            assert record.samples[0].sequence_per_layer[-1] < logits.shape[1]
    finally:
        patch.remove()


def test_right_padding_output_matches_unpatched_layout() -> None:
    """keep=1.0 / `none` under right padding: bit-identical to the unpatched model (nothing is re-laid)."""
    vlm = _vlm("llava")
    images = [dummy_image(seed=0), dummy_image(seed=1)]
    texts = [vlm.prompt("What ?"), vlm.prompt("Describe the image in one two three four ?")]
    batch = _right_padded(vlm, images, texts)
    with torch.no_grad():
        before = vlm.model(**batch).logits
        with tokenzip.apply(vlm.model, "none"):
            same = vlm.model(**batch).logits
        with tokenzip.apply(vlm.model, "fastv", 1.0):
            full = vlm.model(**batch).logits
    assert torch.equal(same, before) and torch.equal(full, before)


# ------------------------------------------------------------------------------------------ samples without images
IN_LLM = {
    "fastv": {},
    "random-llm": {"stage": "llm"},
    "atp": {},
    "mustdrop": {},
    "visiondrop": {},
    "holitom": {},
    "pdrop": {},
}


@pytest.mark.parametrize("case", list(IN_LLM))
@pytest.mark.parametrize("family", FAMILIES)
def test_sample_without_image_passes_through(family: str, case: str) -> None:
    """r07: in a batch [image, text only, image] the text-only sample passes through untouched (no visual tokens
    in any layer, the logits of its unpatched bs=1 run) and the others are pruned exactly as at bs=1 (FastV raised
    BudgetError before)."""
    vlm = _vlm(family)
    images = [dummy_image(seed=0), dummy_image(seed=1)]
    texts = [
        vlm.prompt("What is in the image ?"),
        vlm.prompt("What is a cat ?", images=0),
        vlm.prompt("Describe the image in one two ?"),
    ]
    batch = vlm.inputs(images, texts)
    singles = [vlm.inputs([images[0]], texts[0]), vlm.inputs(None, texts[1]), vlm.inputs([images[1]], texts[2])]
    with torch.no_grad():
        text_only = vlm.model(**singles[1]).logits[0, -1]
    patch = tokenzip.apply(vlm.model, case.split("-")[0], KEEP, **IN_LLM[case])
    try:
        logits, record = _run(vlm.model, batch, patch)
        assert record.samples[1].items == [] and set(record.samples[1].visual_per_layer) == {0}
        torch.testing.assert_close(logits[1, -1], text_only, atol=ATOL, rtol=0)
        for b in (0, 2):
            single_logits, single = _run(vlm.model, singles[b], patch)
            assert _kept(record, b) == _kept(single, 0)
            assert record.samples[b].visual_per_layer == single.samples[0].visual_per_layer
            assert min(single.samples[0].visual_per_layer) < single.samples[0].visual_in  # really pruned
            torch.testing.assert_close(logits[b, -1], single_logits[0, -1], atol=ATOL, rtol=0)
    finally:
        patch.remove()
