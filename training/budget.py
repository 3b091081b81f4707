"""Wall-clock step budgets and the learning-rate schedule of the training phases (training only)."""

from __future__ import annotations

import math
import time


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up over `warmup` steps to `peak`, then a cosine decay to `floor * peak` at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class StepBudget:
    """How many steps fit in `seconds`: re-estimated every `every` steps from the recent step time (other load on
    the machine varies), frozen once 80 % of the time is spent so that the cosine schedule can finish. A budget
    spent before the first estimate (fewer than `every` steps fit) ends at the step that spends it."""

    def __init__(self, seconds: float, max_steps: int, every: int = 20) -> None:
        self.seconds, self.every = seconds, every
        self.total = max_steps
        self.max_steps = max_steps
        self.start = time.perf_counter()
        self._mark = (0, 0.0)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def tick(self, step: int) -> None:
        """Call after step `step` (1-based) has finished."""
        elapsed = self.elapsed
        estimated = self._mark[0] > 0
        if not estimated and elapsed >= self.seconds:
            self.total = min(self.total, step)
            return
        if step % self.every or (estimated and elapsed >= 0.8 * self.seconds):
            return
        done, then = self._mark
        per_step = (elapsed - then) / (step - done) if step > done else elapsed / step
        self.total = min(self.max_steps, step + int((self.seconds - elapsed) / per_step))
        self._mark = (step, elapsed)
