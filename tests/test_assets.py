"""The bundled trained models: offline loading, size, and that they still give the answers their training run
recorded on the test split (so the accuracy in training.json is what users get), and that this accuracy meets the
project's 90 % bar (dataset v2: synth-llava 91.2 %, synth-qwen2_5_vl 96.6 %, synth-llava_onevision 97.6 %); the
OneVision bundle also trained on video clips and records its video answers."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from tokenzip import assets
from tokenzip.loading import load_vlm
from tokenzip.synthetic import SPLITS, VIDEO_FRAMES, sample, video_sample
from tokenzip.synthetic.evaluate import evaluate, evaluate_video

CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
BUNDLED = assets.names()


def _report(name: str) -> dict:
    return json.loads((assets.path(name) / "training.json").read_text())


def _version(report: dict) -> str:
    """The dataset version a bundle was trained and measured on (training.json; v1 before the key existed)."""
    return report["config"].get("data_version", "v1")


FASTV_LAYER = 2  # FastV's default: layers 0 and 1 see every visual token, later ones the kept ones
V2_BUNDLES = [n for n in BUNDLED if _version(_report(n)) == "v2"]


def test_all_three_families_are_bundled_and_small():
    assert set(BUNDLED) == set(assets.FAMILY_OF)
    total = sum(f.stat().st_size for name in BUNDLED for f in assets.path(name).iterdir())
    assert total <= 30e6, f"bundled models take {total / 1e6:.1f} MB (limit 30 MB)"


@pytest.mark.parametrize("name", BUNDLED)
def test_training_report_is_what_the_recorded_answers_score(name):
    report = _report(name)
    family = assets.FAMILY_OF[name]
    assert report["config"]["family"] == family
    assert report["train_minutes"] <= 45
    answers = report["test_answers"]
    assert len(answers) == SPLITS["test"]
    version = _version(report)
    hits: dict[str, list[bool]] = defaultdict(list)
    for i, answer in enumerate(answers):  # the reported accuracy is what the recorded answers score
        s = sample("test", i, version=version)
        hits[s.question.category].append(answer == s.question.answer)
    for category, got in hits.items():
        assert report["test_accuracy"][category] == pytest.approx(sum(got) / len(got))
    overall = sum(sum(v) for v in hits.values()) / len(answers)
    assert report["test_accuracy"]["all"] == pytest.approx(overall)
    assert overall >= 0.90, f"{name}: {overall:.1%} unpruned on the test split, below the 90 % bar"


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_reproduces_its_recorded_answers(name):
    family = assets.FAMILY_OF[name]
    model, processor = load_vlm(name)
    assert type(model).__name__ == CLASSES[family]
    assert model.dtype == torch.float32
    got: list[str] = []
    report = _report(name)
    evaluate(model, processor, family, "test", 64, record=got, version=_version(report))
    assert got == report["test_answers"][:64]


def test_every_bundle_is_v2():
    """Every bundle answers dataset v2 (photograph-like scenes with ground truth for the oracle)."""
    assert V2_BUNDLES == BUNDLED


@pytest.mark.parametrize("name", V2_BUNDLES)
def test_v2_bundles_have_an_llm_deep_enough_for_every_schedule(name):
    """A v2 bundle's LLM is deep enough that FastV at its default layer reaches keep 0.111 under the
    layer-averaged budget: the first FASTV_LAYER layers see all n tokens, so with at least one token kept later
    the average (FASTV_LAYER * n + depth - FASTV_LAYER) / depth fits 0.111 * n only from 20 layers on, at n = 100
    as at n = 144."""
    config = json.loads((assets.path(name) / "config.json").read_text())
    depth = config["text_config"]["num_hidden_layers"]
    n = 100  # the fewest visual tokens per image of the three families (Qwen2.5-VL: 10x10 merge units)
    assert FASTV_LAYER * n + (depth - FASTV_LAYER) * 1 <= 0.111 * n * depth, f"{name}: {depth} decoder layers"


VIDEO_BUNDLES = [n for n in BUNDLED if _report(n)["config"].get("video_share")]


def test_the_onevision_bundle_was_trained_on_video():
    assert "synth-llava_onevision" in VIDEO_BUNDLES


@pytest.mark.parametrize("name", VIDEO_BUNDLES)
def test_video_report_is_what_the_recorded_video_answers_score(name):
    report = _report(name)
    answers = report["video_test_answers"]
    clips = [video_sample("test", i, frames=(VIDEO_FRAMES,) * 2, version=_version(report)) for i in range(len(answers))]
    hits: dict[str, list[bool]] = defaultdict(list)
    for clip, answer in zip(clips, answers):
        hits[clip.question.category].append(answer == clip.question.answer)
    for category, got in hits.items():
        assert report["video_test_accuracy"][category] == pytest.approx(sum(got) / len(got))
    assert report["video_steps"] > 0


@pytest.mark.parametrize("name", VIDEO_BUNDLES)
def test_video_bundle_reproduces_its_recorded_video_answers(name):
    model, processor = load_vlm(name)
    report = _report(name)
    got: list[str] = []
    evaluate_video(model, processor, assets.FAMILY_OF[name], "test", 16, record=got, version=_version(report))
    assert got == report["video_test_answers"][:16]
