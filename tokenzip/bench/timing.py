"""Clocks, summary statistics and peak-memory probes for `tokenzip bench`.

On CUDA every interval is bracketed by `torch.cuda.synchronize` (the per-stage seconds inside a patched forward
are too), so wall-clock intervals are GPU time, not kernel-launch time. On CPU peak memory is the process
resident set size, sampled every millisecond by a background thread (the allocator has no peak counter there);
on CUDA it is `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of `fn()`, synchronised on CUDA before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


@dataclass
class Summary:
    """Repeated measurements (seconds or any unit): median, nearest-rank p90, quartiles and range."""

    median: float
    p90: float
    n: int
    q1: float = float("nan")  # first quartile (median of the lower half, median excluded)
    q3: float = float("nan")  # third quartile
    min: float = float("nan")
    max: float = float("nan")

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            return cls(float("nan"), float("nan"), 0)
        ordered = sorted(values)
        n = len(ordered)
        # nearest-rank p90: the smallest value with at least 90% of the measurements at or below it
        rank = max(0, -(-9 * n // 10) - 1)
        lower, upper = ordered[: n // 2] or ordered, ordered[(n + 1) // 2 :] or ordered
        return cls(
            statistics.median(ordered),
            ordered[rank],
            n,
            statistics.median(lower),
            statistics.median(upper),
            ordered[0],
            ordered[-1],
        )

    @property
    def spread(self) -> float:
        """The noise of these repeats: the interquartile range from 4 repeats on, the full range for 2 or 3, nan for
        one measurement (no noise can be estimated)."""
        if self.n < 2:
            return float("nan")
        return self.q3 - self.q1 if self.n >= 4 else self.max - self.min


def differs(a: Summary, b: Summary) -> bool | None:
    """Whether the medians of `a` and `b` differ by more than their noise (the larger `spread` of the two); None
    when either has a single measurement (the noise is unknown)."""
    noise = max(a.spread, b.spread)
    if noise != noise:  # nan
        return None
    return abs(a.median - b.median) > noise


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class PeakMemory:
    """Context manager measuring peak memory in bytes during its block.

    `peak` is the absolute peak (CUDA: allocated tensors; CPU: process RSS) and `added` the peak minus the level
    at entry (activations, caches and temporaries of the block, not the weights).
    """

    def __init__(self, device: torch.device, interval: float = 0.001) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self.added = 0
        self._start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        self.added = max(0, self.peak - self._start)
