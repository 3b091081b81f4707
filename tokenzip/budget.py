"""`keep`: validation and the per-item token budget.

`keep` is either a float in (0, 1] (fraction of the visual tokens of each image / video) or an int >= 1
(tokens per image, per video for video). It is the *layer-averaged* visual-token budget of the LLM; one-shot
pre-LLM policies simply let that many tokens enter the LLM. Per item with N content tokens:
n = max(1, round(keep * N)) for a float (Python's round, ties to even), keep itself for an int; an int keep larger
than an item's N is a `BudgetError` naming N (it is never silently "keep all"). So keep 0.111 / 0.222 / 0.333 of
576 gives 64 / 128 / 192 and keep 0.11 gives 63.

The budget rule every policy follows: the layer-averaged visual tokens of each sample (`SampleRecord.visual_mean`)
equal the sum of `item_budget` over its items within one token per item, or the policy raises `BudgetError` (at
`apply` or the first forward) naming the smallest keep it can reach (`infeasible_budget`); a policy whose reachable
budgets are discrete (`pool`) names the nearest reachable ones (`unreachable_budget`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

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
    """Tokens to keep out of `n_tokens` content tokens of one image / video (at least 1, at most all).

    An int `keep` larger than `n_tokens` raises `BudgetError` naming the item's token count."""
    if n_tokens <= 0:
        return 0
    if isinstance(keep, int):
        if keep > n_tokens:
            raise BudgetError(
                f"keep={keep} tokens per item, but an image / video here has only {n_tokens} visual tokens; "
                f"pass an int keep <= {n_tokens} or a fraction in (0, 1] (keep=1.0 keeps everything)"
            )
        return keep
    return min(n_tokens, max(1, round(keep * n_tokens)))


def sample_budget(keep: Keep, sizes: Sequence[int]) -> int:
    """The layer-averaged budget of a sample whose items have `sizes` content tokens: the sum of `item_budget`."""
    return sum(item_budget(keep, n) for n in sizes)


def _float_budget(keep: float, sizes: Sequence[int]) -> int:
    return sum(min(n, max(1, round(keep * n))) for n in sizes if n > 0)


def smallest_keep(min_tokens: float, sizes: Sequence[int]) -> tuple[float | None, int | None]:
    """The smallest float keep (on a grid of 1e-4, so that it prints exactly with 4 decimals) and the smallest int
    keep whose budget over items of `sizes` content tokens is at least `min_tokens`; None where no keep reaches
    it (an int keep is limited by the smallest item)."""
    sizes = [n for n in sizes if n > 0]
    if not sizes or _float_budget(1.0, sizes) < min_tokens:
        return None, None
    lo, hi = 1, 10_000  # keep = k / 1e4: the budget is non-decreasing in k
    while lo < hi:
        mid = (lo + hi) // 2
        if _float_budget(mid / 10_000, sizes) >= min_tokens:
            hi = mid
        else:
            lo = mid + 1
    as_int = max(1, math.ceil(min_tokens / len(sizes)))
    return lo / 10_000, (as_int if as_int <= min(sizes) else None)


def keep_hint(fraction: float | None, tokens: int | None) -> str:
    """'0.2617 (keep >= 0.2617, or an int keep >= 17 tokens per item)': how a `BudgetError` names a keep."""
    if fraction is None:
        return "none (no keep reaches it on these items)"
    text = f"{fraction:.4f} (keep >= {fraction:.4f}"
    return text + (f", or an int keep >= {tokens} tokens per item)" if tokens is not None else ")")


def infeasible_budget(
    policy: str, reason: str, keep: Keep | None, budget: float, min_tokens: float, sizes: Sequence[int]
) -> BudgetError:
    """The `BudgetError` of a policy that cannot go below a layer average of `min_tokens` visual tokens on a sample
    whose items have `sizes` content tokens while `keep` asks for `budget`: names the floor and the smallest
    reachable keep."""
    asked = f"keep={keep!r} asks for" if keep is not None else "asked for"
    fraction, tokens = smallest_keep(min_tokens, sizes)
    return BudgetError(
        f"{policy}: {asked} a layer-averaged budget of {budget:g} visual tokens of {sum(sizes)}, which is "
        f"infeasible: below the {min_tokens:.2f} it can reach ({reason}); the smallest reachable keep is "
        f"{keep_hint(fraction, tokens)}"
    )


def unreachable_budget(policy: str, reason: str, keep: Keep, below: Keep | None, above: Keep | None) -> BudgetError:
    """The `BudgetError` of a policy whose reachable budgets are discrete (`pool`): names the nearest reachable
    keeps below and above the asked one."""
    near = [f"{k:.4f}" if isinstance(k, float) else f"{k} tokens per item" for k in (below, above) if k is not None]
    return BudgetError(
        f"{policy}: keep={keep!r} cannot be met within one token per item ({reason}); the nearest reachable keep "
        f"is {' or '.join(near) if near else 'none'}"
    )


def one_stage_llm_count(target: float, n_tokens: int, layer: int, n_layers: int) -> float:
    """Tokens to keep from decoder layer `layer` on so that the layer average equals `target`.

    Layers 0..layer-1 see all `n_tokens`; layers layer..n_layers-1 see R tokens, and
    (layer * n_tokens + (n_layers - layer) * R) / n_layers = target, so
    R = (n_layers * target - layer * n_tokens) / (n_layers - layer). Returned unrounded.
    """
    if not 0 <= layer < n_layers:
        raise BudgetError(f"pruning layer {layer} is outside the LLM's layers 0..{n_layers - 1}")
    return (n_layers * target - layer * n_tokens) / (n_layers - layer)


def one_stage_count(
    policy: str, target: float, n_tokens: int, layer: int, n_layers: int, keep: Keep | None, sizes: Sequence[int]
) -> int:
    """Tokens a one-stage in-LLM policy keeps from decoder layer `layer` on so that the layer average meets
    `target` (`one_stage_llm_count`, rounded, within [1, n_tokens]); 0 for a sample without visual tokens.

    The one `BudgetError` path of such schedules: when even one token from `layer` on overshoots `target` by more
    than half a token, it names the floor the first `layer` layers impose and the smallest reachable keep for items
    of `sizes` content tokens."""
    if n_tokens <= 0:
        return 0
    r = one_stage_llm_count(target, n_tokens, layer, n_layers)
    if r < 0.5:
        floor = (layer * n_tokens + (n_layers - layer)) / n_layers
        reason = f"at layer {layer} of {n_layers} the first {layer} layers see all {n_tokens}; lower the layer"
        raise infeasible_budget(policy, reason, keep, target, floor, list(sizes) or [n_tokens])
    return min(n_tokens, max(1, round(r)))


def geometric_schedule(
    goal: float,
    first: int,
    widths: Sequence[int],
    floor: int = 1,
    solve_floor: float | None = None,
    spread: bool = False,
) -> list[int]:
    """Counts of a multi-stage schedule whose layer-weighted sum is `goal` (= n_layers x the layer-averaged budget):
    `first` tokens for the widths[0] layers before the first stage, then n_i = round(first lambda^i) for widths[i]
    layers each (i = 1..S), lambda in (0, 1) solved by bisection from

        widths[0] first + sum_i widths[i] max(solve_floor, first lambda^i) = goal

    (`solve_floor` defaults to `floor`). Every count is at least `floor`, counts never increase, and the last one
    absorbs the rounding so the average is exact where the bounds allow; with `spread` the rest the bounds stop it
    from absorbing is given to the earlier counts, last to first (within half a layer's worth of `goal`). Returns
    [n_1, ..., n_S]; every n_i = `first` when `first` over all layers fits the goal.

    One solver for the layer-averaged schedules of ATP (floor 1, spread), MustDrop (floor = its key set) and
    VisionDrop (solve_floor 0, first = its stage-1 count); a policy's own feasibility check comes first.
    """
    stages = len(widths) - 1
    if first * sum(widths) <= goal:
        return [first] * stages
    low = floor if solve_floor is None else solve_floor

    def total(lam: float) -> float:
        return widths[0] * first + sum(widths[i] * max(low, first * lam**i) for i in range(1, stages + 1))

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < goal else (lo, mid)
    lam = (lo + hi) / 2
    counts = [max(floor, round(first * lam**i)) for i in range(1, stages)]
    if widths[stages]:
        last = (goal - widths[0] * first - sum(widths[i] * counts[i - 1] for i in range(1, stages))) / widths[stages]
        counts.append(max(floor, round(last)))
    else:  # no layer runs on the last count: it repeats the one before
        counts.append(counts[-1] if counts else first)
    for i in range(1, stages):
        counts[i] = min(counts[i], counts[i - 1])
    counts[0] = min(counts[0], first)
    if spread:
        residual = goal - widths[0] * first - sum(widths[i + 1] * c for i, c in enumerate(counts))
        if abs(residual) > sum(widths) / 2:  # a bound stopped the last count: spread the rest, last stage first
            for i in reversed(range(stages)):
                low_i = counts[i + 1] if i + 1 < stages else floor
                high_i = counts[i - 1] if i > 0 else first
                new = min(high_i, max(low_i, counts[i] + round(residual / widths[i + 1])))
                residual -= widths[i + 1] * (new - counts[i])
                counts[i] = new
    return counts
