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
