"""The lmms-eval task files shipped with the package (no lmms-eval needed to check them)."""

from __future__ import annotations

import json

from tokenzip.evaluation import TASKS_DIR
from tokenzip.synthetic import SPLITS, sample


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
