"""Greedy accuracy of a model on a synthetic split, per category (the quick check used while training)."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..evaluation.scoring import answer_word, is_correct
from ..frames import processor_inputs
from .conversations import messages
from .dataset import RENDER_SIDE, VIDEO_FRAMES, VIDEO_TEST, sample, video_sample


@torch.no_grad()
def generate_answers(model, processor, inputs: dict, max_new_tokens: int = 2) -> list[str]:
    """Greedy answers (`tokenzip.evaluation.scoring.answer_word`) of a left-padded batch of model inputs."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer_word(t) for t in texts]


@torch.no_grad()
def answers(model, processor, family: str, images: list, questions: list[str], max_new_tokens: int = 2) -> list[str]:
    """Greedy answers (first word, lower case) to one question per image, as one left-padded batch."""
    prompts = [processor.apply_chat_template(messages_for(q), add_generation_prompt=True) for q in questions]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    return generate_answers(model, processor, inputs, max_new_tokens)


def messages_for(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def evaluate(
    model,
    processor,
    family: str,
    split: str = "val",
    n: int = 300,
    seed: int = 0,
    batch_size: int = 32,
    record: list[str] | None = None,
    version: str = "v1",
) -> dict[str, float]:
    """Exact-match accuracy of the first `n` samples of `split` of dataset `version`: overall and per category.
    The answers, in sample order, are appended to `record` when given."""

    def answer(batch: list) -> list[str]:
        images = [s.image(RENDER_SIDE) for s in batch]
        return answers(model, processor, family, images, [s.question.text for s in batch])

    return _scored(lambda i: sample(split, i, seed, version), answer, n, batch_size, record)


def evaluate_video(
    model,
    processor,
    family: str,
    split: str = "test",
    n: int = VIDEO_TEST,
    seed: int = 0,
    batch_size: int = 16,
    record: list[str] | None = None,
    version: str = "v1",
) -> dict[str, float]:
    """Exact-match accuracy on the first `n` clips of `split` of dataset `version` (`VIDEO_FRAMES` frames each):
    overall and per event category (video_color, video_move, video_appear). The answers, in clip order, are
    appended to `record`."""

    def answer(clips: list) -> list[str]:
        prompts = [
            processor.apply_chat_template(messages([c.question], media="video")[:1], add_generation_prompt=True)
            for c in clips
        ]
        processor.tokenizer.padding_side = "left"
        inputs = processor_inputs(processor, model.config, family, prompts, [], [c.frames() for c in clips])
        return generate_answers(model, processor, inputs)

    return _scored(lambda i: video_sample(split, i, seed, (VIDEO_FRAMES,) * 2, version), answer, n, batch_size, record)


def _scored(item, answer, n: int, batch_size: int, record: list[str] | None) -> dict[str, float]:
    """Exact-match accuracy of `answer(batch)` on `item(0..n-1)` (anything with a `.question`), batch by batch:
    per question category and overall; answers in item order are appended to `record` when given."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, n, batch_size):
        batch = [item(i) for i in range(start, min(n, start + batch_size))]
        got = answer(batch)
        if record is not None:
            record.extend(got)
        for x, a in zip(batch, got):
            hits[x.question.category].append(is_correct(a, x.question.answer))
    report = {cat: sum(v) / len(v) for cat, v in sorted(hits.items())}
    report["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return report


__all__ = ["answers", "evaluate", "evaluate_video", "generate_answers", "messages"]
