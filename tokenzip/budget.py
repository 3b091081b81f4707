"""`keep`: validation and the per-item token budget.

`keep` is either a float in (0, 1] (fraction of the visual tokens of each image / video) or an int >= 1
(tokens per image, per video for video). It is the *layer-averaged* visual-token budget of the LLM; one-shot
pre-LLM policies simply let that many tokens enter the LLM. Per item with N content tokens:
n = max(1, round(keep * N)) for a float (Python's round, ties to even), min(keep, N) for an int.
So keep 0.111 / 0.222 / 0.333 of 576 gives 64 / 128 / 192 and keep 0.11 gives 63.
"""

from __future__ import annotations

import math
import numbers

from .errors import BudgetError

Keep = float | int


def validate_keep(keep: object) -> Keep:
    """Return `keep` as a float in (0, 1] or an int >= 1; raise `BudgetError` otherwise."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise BudgetError(
            f"keep must be a float in (0, 1] (fraction of visual tokens) or an int >= 1 (tokens per image), "
            f"got {keep!r} of type {type(keep).__name__}"
        )
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise BudgetError(f"an integer keep counts tokens per image and must be >= 1, got {keep}")
        return int(keep)
    value = float(keep)
    if math.isnan(value) or value <= 0.0 or value > 1.0:
        raise BudgetError(
            f"a float keep is a fraction of the visual tokens and must lie in (0, 1], got {keep!r}; "
            "pass an int to ask for a number of tokens per image"
        )
    return value


def is_passthrough(keep: Keep) -> bool:
    """True for keep == 1.0 (a float): every policy leaves the model untouched."""
    return isinstance(keep, float) and keep == 1.0


def item_budget(keep: Keep, n_tokens: int) -> int:
    """Tokens to keep out of `n_tokens` content tokens of one image / video (at least 1, at most all)."""
    if n_tokens <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, n_tokens)
    return min(n_tokens, max(1, round(keep * n_tokens)))


def one_stage_llm_count(target: float, n_tokens: int, layer: int, n_layers: int) -> float:
    """Tokens to keep from decoder layer `layer` on so that the layer average equals `target`.

    Layers 0..layer-1 see all `n_tokens`; layers layer..n_layers-1 see R tokens, and
    (layer * n_tokens + (n_layers - layer) * R) / n_layers = target, so
    R = (n_layers * target - layer * n_tokens) / (n_layers - layer). Returned unrounded.
    """
    if not 0 <= layer < n_layers:
        raise BudgetError(f"pruning layer {layer} is outside the LLM's layers 0..{n_layers - 1}")
    return (n_layers * target - layer * n_tokens) / (n_layers - layer)
