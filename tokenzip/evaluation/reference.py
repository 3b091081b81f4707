"""Answers of the unpatched model, shared in-process between the lmms-eval model and a task's metrics.

The model class records, per document, the answer the unpatched model gives to the same prompt; a task's
`process_results` looks it up by the document's `uid` to score "agreement with the unpruned model". Both run
in the same process (lmms-eval computes metrics right after generation), so a module-level dict suffices.
"""

from __future__ import annotations

ANSWERS: dict[str, str] = {}


def record(uid: str, answer: str) -> None:
    ANSWERS[str(uid)] = answer


def lookup(uid: str) -> str | None:
    return ANSWERS.get(str(uid))


def clear() -> None:
    """Forget every recorded answer (a new model instance starts with none)."""
    ANSWERS.clear()
