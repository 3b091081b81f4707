"""Hook objects and timing.

Hooks and wrappers are small callable objects holding the runtime (no closures), so `copy.deepcopy` of a patched
model copies them with a runtime of its own that drives the copy (a closure would be copied by reference and keep
driving the original model's runtime).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device) -> Iterator[list[float]]:
    """Time the block on `device` (synchronised at both ends): yields a one-element list that holds the seconds
    once the block has run."""
    elapsed = [0.0]
    sync(device)
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        sync(device)
        elapsed[0] = time.perf_counter() - start


class _Absent:
    """Marks a feature function that had no instance-level attribute before `apply` (one object, also across
    `copy.deepcopy` and pickling)."""

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


class Hook:
    """A hook built by a runtime factory method (`getattr(runtime, factory)(arg)` returns the hook function), kept as
    (runtime, factory name, argument) rather than as a closure, so that a deep copy drives the copy's runtime."""

    def __init__(self, runtime: Any, factory: str, arg: Any) -> None:
        self.runtime, self.factory, self.arg = runtime, factory, arg
        self._fn = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fn is None:
            self._fn = getattr(self.runtime, self.factory)(self.arg)
        return self._fn(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {"runtime": self.runtime, "factory": self.factory, "arg": self.arg, "_fn": None}


class FeatureWrapper:
    """tokenzip's instance-level wrapper of `get_image_features` / `get_video_features`.

    After `Runtime.remove()` (`runtime` is None) it is a pass-through to `original`: that matters only where another
    tool wrapped it after `apply`, whose wrapper then stays in place.
    """

    def __init__(self, runtime: Any, modality: str, original: Any) -> None:
        functools.update_wrapper(self, original)  # __name__, __doc__, __wrapped__ = original
        self.runtime = runtime
        self.modality = modality
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.runtime is None:
            return self.original(*args, **kwargs)
        return self.runtime.feature_call(self.modality, self.original, args, kwargs)
