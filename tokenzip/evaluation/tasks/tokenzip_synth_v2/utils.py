"""Document hooks of the `tokenzip_synth_v2` lmms-eval task (loaded by lmms-eval through `!function`).

Each document carries "version": "v2"; its image is `tokenzip.synthetic.sample(split, index, seed, version)`."""

from PIL import Image

from tokenzip.evaluation.scoring import process_results  # noqa: F401  (the task's process_results hook)
from tokenzip.synthetic import sample
from tokenzip.synthetic.dataset import RENDER_SIDE


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [sample(doc["split"], doc["index"], doc.get("seed", 0), version=doc["version"]).image(RENDER_SIDE)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]
