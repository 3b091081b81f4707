"""Document hooks of the `tokenzip_synth_v2_video` lmms-eval task (loaded by lmms-eval through `!function`).

Each document carries "version": "v2"; its frames are `tokenzip.synthetic.video_sample(split, index, seed,
frames=(n, n), version=version)` rendered at `VIDEO_SIDE`."""

from tokenzip.evaluation.media import Video
from tokenzip.evaluation.scoring import process_results  # noqa: F401  (the task's process_results hook)
from tokenzip.synthetic import VIDEO_SIDE, video_sample


def doc_to_visual(doc: dict) -> list[Video]:
    frames = (doc["frames"], doc["frames"])
    clip = video_sample(doc["split"], doc["index"], doc.get("seed", 0), frames=frames, version=doc["version"])
    return [Video(clip.frames(VIDEO_SIDE))]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]
