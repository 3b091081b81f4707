"""The lmms-eval task files shipped with the package (no lmms-eval needed to check them)."""

from __future__ import annotations

import json

from tokenzip.evaluation import TASKS_DIR
from tokenzip.synthetic import SPLITS, VIDEO_FRAMES, VIDEO_TEST, sample, video_sample


def test_lmms_eval_task_file_matches_the_generator():
    lines = (TASKS_DIR / "tokenzip_synth" / "test.jsonl").read_text().splitlines()
    assert len(lines) == SPLITS["test"]
    for line in lines[::37]:
        doc = json.loads(line)
        s = sample(doc["split"], doc["index"], doc["seed"])
        assert (doc["question"], doc["answer"], doc["category"]) == (
            s.question.text,
            s.question.answer,
            s.question.category,
        )
        assert doc["uid"] == f"test/{doc['index']}"


def test_video_task_file_matches_the_generator():
    lines = (TASKS_DIR / "tokenzip_synth_video" / "test.jsonl").read_text().splitlines()
    assert len(lines) == VIDEO_TEST
    counts: dict[str, int] = {}
    for line in lines:
        doc = json.loads(line)
        counts[doc["category"]] = counts.get(doc["category"], 0) + 1
        assert doc["frames"] == VIDEO_FRAMES and doc["uid"] == f"video/test/{doc['index']}"
    assert counts == {"video_color": 100, "video_move": 100, "video_appear": 100}
    for line in lines[::29]:
        doc = json.loads(line)
        clip = video_sample(doc["split"], doc["index"], doc["seed"], frames=(doc["frames"], doc["frames"]))
        assert (doc["question"], doc["answer"], doc["category"]) == (
            clip.question.text,
            clip.question.answer,
            clip.question.category,
        )
        assert len(clip.scenes) == VIDEO_FRAMES


def test_bench_accuracy_and_lmms_eval_score_the_same_answers_the_same_way():
    """`tokenzip bench --accuracy` (tokenzip.synthetic.evaluate) and the lmms-eval task of `tokenzip eval`
    (tokenzip.evaluation.scoring.process_results) give every generation the same verdict: full stops, case,
    spaces and other punctuation around the answer word do not matter, a wrong or empty answer is wrong."""
    import torch

    from tokenzip.evaluation.scoring import answer_word, process_results
    from tokenzip.synthetic.evaluate import evaluate

    n = 14
    truth = [sample("test", i).question.answer for i in range(n)]
    variants = [  # (generation, correct?) — built from the true answer, so the verdicts are known by construction
        lambda a: (f"{a}.", True),
        lambda a: (f" {a.upper()} ", True),
        lambda a: (f"{a}, I think", True),
        lambda a: (f"'{a}'!", True),
        lambda a: ("nothing.", False),
        lambda a: (".", False),
        lambda a: (f"x{a}", False),
    ]
    generated, expected = zip(*(variants[i % len(variants)](truth[i]) for i in range(n)))

    class Processor:  # the chat template, tokenizer and decoder of a model that answers `generated`
        tokenizer = type("Tok", (), {"padding_side": "right"})()

        def apply_chat_template(self, messages, add_generation_prompt):
            return "prompt"

        def __call__(self, images, text, padding, return_tensors):
            return {"input_ids": torch.zeros(len(text), 3, dtype=torch.long)}

        def batch_decode(self, ids, skip_special_tokens):
            return [generated[int(i)] for i in ids[:, 0]]

    class Model:
        asked = 0

        def generate(self, input_ids, **kwargs):
            rows = torch.arange(self.asked, self.asked + len(input_ids))[:, None]
            self.asked += len(input_ids)
            return torch.cat([input_ids, rows], dim=1)

    recorded: list[str] = []
    bench = evaluate(Model(), Processor(), "llava", "test", n, batch_size=4, record=recorded)
    lines = (TASKS_DIR / "tokenzip_synth" / "test.jsonl").read_text().splitlines()[:n]
    lmms = [process_results(json.loads(line), [text])["exact_match"] for line, text in zip(lines, generated)]
    assert lmms == [float(c) for c in expected]
    assert [r == t for r, t in zip(recorded, truth)] == list(expected)
    assert recorded == [answer_word(g) for g in generated]
    assert bench["all"] == sum(lmms) / n == sum(expected) / n
