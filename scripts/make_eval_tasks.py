"""Write the test.jsonl files of tokenzip's synthetic lmms-eval tasks (tokenzip/evaluation/tasks/) from the generator.

    python scripts/make_eval_tasks.py            # rewrite all four task files
    python scripts/make_eval_tasks.py --check    # exit 1 when a file differs from what the generator gives

Every document names the sample it asks about (split, index, seed, and for clips the frame count); a task's
`doc_to_visual` renders it from these fields, so the files hold no pixels and rebuild byte for byte. v1 documents
carry no "version" field (their files predate dataset versions and stay as shipped); v2 documents carry
"version": "v2" and their uids start with "v2/", so answers of a v1 and a v2 task never share a uid.
"""

from __future__ import annotations

import argparse
import json
import sys

from tokenzip.evaluation import TASKS_DIR
from tokenzip.synthetic import SPLITS, VIDEO_FRAMES, VIDEO_TEST, sample, video_sample

# task name -> (kind, dataset version)
TASKS = {
    "tokenzip_synth": ("image", "v1"),
    "tokenzip_synth_video": ("video", "v1"),
    "tokenzip_synth_v2": ("image", "v2"),
    "tokenzip_synth_v2_video": ("video", "v2"),
}


def image_docs(version: str, n: int = SPLITS["test"], seed: int = 0) -> list[dict]:
    """The documents of the image task of dataset `version`: the first `n` test samples (categories cycle, so
    1,200 = 200 per category)."""
    prefix = "" if version == "v1" else f"{version}/"
    docs = []
    for index in range(n):
        q = sample("test", index, seed, version).question
        doc = {"uid": f"{prefix}test/{index}", "split": "test", "index": index, "seed": seed}
        if version != "v1":
            doc["version"] = version
        docs.append(doc | {"category": q.category, "question": q.text, "answer": q.answer})
    return docs


def video_docs(version: str, n: int = VIDEO_TEST, seed: int = 0, frames: int = VIDEO_FRAMES) -> list[dict]:
    """The documents of the video task of dataset `version`: the first `n` test clips of `frames` frames (events
    cycle, so 300 = 100 per event)."""
    prefix = "" if version == "v1" else f"{version}/"
    docs = []
    for index in range(n):
        q = video_sample("test", index, seed, frames=(frames, frames), version=version).question
        doc = {"uid": f"{prefix}video/test/{index}", "split": "test", "index": index, "seed": seed, "frames": frames}
        if version != "v1":
            doc["version"] = version
        docs.append(doc | {"category": q.category, "question": q.text, "answer": q.answer})
    return docs


def task_text(task: str) -> str:
    """The test.jsonl text of `task` (one JSON document per line)."""
    kind, version = TASKS[task]
    docs = image_docs(version) if kind == "image" else video_docs(version)
    return "".join(json.dumps(d) + "\n" for d in docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("tasks", nargs="*", default=list(TASKS), help=f"tasks (default: all of {list(TASKS)})")
    args = parser.parse_args(argv)
    differ = []
    for task in args.tasks:
        where = TASKS_DIR / task / "test.jsonl"
        text = task_text(task)
        if args.check:
            if not where.is_file() or where.read_text() != text:
                differ.append(str(where))
        else:
            where.write_text(text)
            print(f"wrote {where} ({text.count(chr(10))} documents)")
    if differ:
        print("differ from the generator: " + ", ".join(differ), file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
