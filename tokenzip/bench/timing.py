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
    """Median and 90th percentile of repeated measurements (seconds or any unit)."""

    median: float
    p90: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            return cls(float("nan"), float("nan"), 0)
        ordered = sorted(values)
        # nearest-rank p90: the smallest value with at least 90% of the measurements at or below it
        rank = max(0, -(-9 * len(ordered) // 10) - 1)
        return cls(statistics.median(ordered), ordered[rank], len(ordered))


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
