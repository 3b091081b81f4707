"""Document hooks of the `tokenzip_synth` lmms-eval task (loaded by lmms-eval through `!function`)."""

from tokenzip.evaluation.scoring import process_results  # noqa: F401  (the task's process_results hook)
from tokenzip.synthetic import sample
from tokenzip.synthetic.dataset import RENDER_SIDE


def doc_to_visual(doc):
    return [sample(doc["split"], doc["index"], doc.get("seed", 0)).image(RENDER_SIDE)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
