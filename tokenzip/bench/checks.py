"""Is a measured row on budget? The one budget check of `tokenzip bench` and `tokenzip eval`.

Budget: `keep` is the layer-averaged visual-token budget of the LLM. For one sample it is the sum over its items of
`tokenzip.budget.item_budget(keep, n_content)`; the sample is **off budget** when its measured layer average
(`SampleRecord.visual_mean`) is more than one token per item away from that sum.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import Keep, item_budget

TOLERANCE_PER_ITEM = 1.0  # tokens per item a layer average may miss its budget by


@dataclass(frozen=True)
class BudgetCheck:
    """One sample's layer-averaged visual tokens against its budget."""

    budget: float  # sum over items of item_budget(keep, n_content)
    layer_mean: float  # measured visual tokens averaged over the decoder layers
    items: int  # images / videos of the sample (the tolerance is one token per item)

    @property
    def off(self) -> bool:
        return abs(self.layer_mean - self.budget) > TOLERANCE_PER_ITEM * max(1, self.items)


def sample_budget(keep: Keep, contents: list[int]) -> int:
    """The layer-averaged budget of a sample whose items hold `contents` content tokens each."""
    return sum(item_budget(keep, n) for n in contents)


def check_sample(keep: Keep, sample) -> BudgetCheck:
    """`BudgetCheck` of a `SampleRecord` (from `patch.stats.last.samples`) recorded under `keep`: the budget the
    record carries (`SampleRecord.budget`), else the one `sample_budget` computes from its items."""
    contents = [int(item.content) for item in sample.items]
    budget = getattr(sample, "budget", None)
    if budget is None:
        budget = sample_budget(keep, contents)
    return BudgetCheck(float(budget), float(sample.visual_mean), len(contents))


def check_record(record) -> list[BudgetCheck]:
    """`BudgetCheck` of every sample of a `ForwardRecord` (samples without visual tokens are left out)."""
    return [check_sample(record.keep, s) for s in record.samples if s.items]


def budget_note(checks: list[BudgetCheck]) -> str:
    """'' when every sample is on budget, else a short flag naming the worst sample's layer average and budget."""
    off = [c for c in checks if c.off]
    if not off:
        return ""
    worst = max(off, key=lambda c: abs(c.layer_mean - c.budget))
    share = f"{len(off)} of {len(checks)} samples" if len(checks) > 1 else "layer avg"
    return f"off budget ({share}: {worst.layer_mean:.1f} vs budget {worst.budget:g})"
