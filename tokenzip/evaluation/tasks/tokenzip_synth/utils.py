"""Document hooks of the `tokenzip_synth` lmms-eval task (loaded by lmms-eval through `!function`)."""

from tokenzip.evaluation.reference import lookup
from tokenzip.synthetic import sample
from tokenzip.synthetic.architectures import RENDER_SIDE


def doc_to_visual(doc):
    return [sample(doc["split"], doc["index"], doc.get("seed", 0)).image(RENDER_SIDE)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""


def process_results(doc, results):
    """exact_match, the per-category accuracy of the document's category and, when the model recorded the
    unpatched model's answer, agreement (same first word as the unpatched model)."""
    answer = first_word(results[0])
    hit = float(answer == doc["answer"])
    out = {"exact_match": hit, f"acc_{doc['category']}": hit}
    unpatched = lookup(doc["uid"])
    if unpatched is not None:
        out["agreement"] = float(answer == first_word(unpatched))
    return out
