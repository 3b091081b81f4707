"""Counting the FLOPs of tokenzip's own work apart from the model's.

`measure_flops(fn)` runs `fn` under `torch.utils.flop_counter.FlopCounterMode`; while it does, every piece of
tokenzip work inside hooks (attention recomputations, scoring, merges) runs with that counter suspended and
is counted by a counter of its own. The result separates model FLOPs from the policy's overhead, so the
model part can be compared one-to-one with the analytic formula (`tokenzip.flops`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_ACTIVE: contextvars.ContextVar[_Overhead | None] = contextvars.ContextVar("tokenzip_overhead", default=None)


def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode has no formula for the CPU flash-attention kernel sdpa dispatches to; add one."""
    aten = torch.ops.aten
    mapping = {}
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    return mapping


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU sdpa."""
    return FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())


@dataclass
class _Overhead:
    flops: int = 0


@contextlib.contextmanager
def policy_work() -> Iterator[None]:
    """Wrap tokenzip's own computations: no autograd; counted apart while `measure_flops` is running."""
    acc = _ACTIVE.get()
    if acc is None:
        with torch.no_grad():
            yield
        return
    from torch.utils._python_dispatch import _disable_current_modes

    counter = flop_counter()
    with _disable_current_modes(), torch.no_grad(), counter:
        yield
    acc.flops += counter.get_total_flops()


@dataclass
class MeasuredFlops:
    model: int  # everything the model computed (vision, projector, LLM, lm_head)
    overhead: int  # tokenzip's recomputations and scoring

    @property
    def total(self) -> int:
        return self.model + self.overhead


def measure_flops(fn: Callable[[], object]) -> MeasuredFlops:
    """Run `fn()` and count the model's FLOPs and tokenzip's overhead FLOPs separately."""
    acc = _Overhead()
    token = _ACTIVE.set(acc)
    try:
        counter = flop_counter()
        with counter, torch.no_grad():
            fn()
    finally:
        _ACTIVE.reset(token)
    return MeasuredFlops(counter.get_total_flops(), acc.flops)
