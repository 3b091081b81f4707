"""Scoring of the synthetic lmms-eval tasks (`tokenzip_synth`, `tokenzip_synth_video`): first-word exact match."""

from __future__ import annotations

from .reference import lookup


def first_word(text: str) -> str:
    """The answer word of a generation: its first word, lower case, without full stops."""
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match, the accuracy of the document's category (`acc_<category>`) and, when the model recorded the
    unpatched model's answer, agreement (same first word as the unpatched model)."""
    answer = first_word(results[0])
    hit = float(answer == doc["answer"])
    out = {"exact_match": hit, f"acc_{doc['category']}": hit}
    unpatched = lookup(doc["uid"])
    if unpatched is not None:
        out["agreement"] = float(answer == first_word(unpatched))
    return out
