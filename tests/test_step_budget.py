"""`StepBudget`: the step count of a training phase follows the wall clock."""

from __future__ import annotations

from training.budget import StepBudget


class Clock:
    """A fake `time.perf_counter` that advances only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(budget: StepBudget, clock: Clock, step_seconds: float) -> int:
    step = 0
    while step < budget.total:
        step += 1
        clock.now += step_seconds
        budget.tick(step)
    return step


def test_steps_fit_the_budget(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("training.budget.time.perf_counter", clock)
    steps = run(StepBudget(100.0, 10_000, every=20), clock, 0.5)
    assert steps == 200


def test_budget_spent_before_the_first_estimate_still_ends(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("training.budget.time.perf_counter", clock)
    steps = run(StepBudget(10.0, 10_000, every=20), clock, 3.0)
    assert steps == 4  # 4 steps x 3 s is the first time past 10 s; before the fix it ran all 10,000
