"""Document hooks of the `tokenzip_synth_video` lmms-eval task (loaded by lmms-eval through `!function`)."""

from tokenzip.evaluation.media import Video
from tokenzip.evaluation.scoring import process_results  # noqa: F401  (the task's process_results hook)
from tokenzip.synthetic import VIDEO_SIDE, video_sample


def doc_to_visual(doc):
    clip = video_sample(doc["split"], doc["index"], doc.get("seed", 0), frames=(doc["frames"], doc["frames"]))
    return [Video(clip.frames(VIDEO_SIDE))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
