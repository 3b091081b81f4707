"""The bundled trained models: offline loading, size, and that they still give the answers their training run
recorded on the test split (so the accuracy in training.json is what users get), and that this accuracy meets the
project's 90 % bar (synth-llava: 95.9 %, synth-qwen2_5_vl: 93.6 %, synth-llava_onevision: 91.7 %)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from tokenzip import assets
from tokenzip.loading import load_vlm
from tokenzip.synthetic import SPLITS, sample
from tokenzip.synthetic.evaluate import evaluate

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
