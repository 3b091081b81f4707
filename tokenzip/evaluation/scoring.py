"""The one answer scorer of tokenzip: `tokenzip bench --accuracy`, `tokenzip.synthetic.evaluate` (training's
accuracy) and the synthetic lmms-eval tasks of `tokenzip eval` (`tokenzip_synth`, `tokenzip_synth_video`) all score
a generation with `answer_word` + `is_correct`, so one answer gets one verdict whichever path scored it."""

from __future__ import annotations

from .reference import lookup

PUNCTUATION = ".,;:!?\"'`()[]{}"  # separators around an answer word (a full stop after it is the usual case)
_SEPARATE = str.maketrans(dict.fromkeys(PUNCTUATION, " "))


def answer_word(text: str) -> str:
    """The answer word of a generation: its first word, lower case, punctuation (`PUNCTUATION`) treated as a word
    separator. `"Red."`, `" red"`, `"RED, I think"` -> `"red"`; an empty or punctuation-only text -> `""`."""
    words = text.lower().translate(_SEPARATE).split()
    return words[0] if words else ""


def is_correct(text: str, answer: str) -> bool:
    """Exact match of a generation's answer word with the expected one-word `answer`."""
    return answer_word(text) == answer_word(answer)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match, the accuracy of the document's category (`acc_<category>`) and, when the model recorded the
    unpatched model's answer, agreement (same answer word as the unpatched model)."""
    hit = float(is_correct(results[0], doc["answer"]))
    out = {"exact_match": hit, f"acc_{doc['category']}": hit}
    unpatched = lookup(doc["uid"])
    if unpatched is not None:
        out["agreement"] = float(answer_word(results[0]) == answer_word(unpatched))
    return out
