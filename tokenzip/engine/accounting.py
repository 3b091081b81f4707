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


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one fused attention call from the shapes of query [B, H, Sq, D], key and value [B, Hkv, Sk, D].

    With grouped-query attention (`enable_gqa=True`, which transformers passes when there is no mask: Qwen2,
    Qwen2.5-VL, OneVision LLMs) key and value have fewer heads than the query; they count as if repeated to the
    query's heads, which is what the kernel computes and what the masked path (`repeat_kv`) counts. torch's own
    formula asserts equal head counts."""
    heads = q[1]
    return sdpa_flop_count(q, (k[0], heads, *k[2:]), (v[0], heads, *v[2:]))


def _sdpa_mapping() -> dict:
    """Formulas for every fused sdpa kernel: the CUDA ones (GQA-aware) and the CPU flash kernel, which
    FlopCounterMode has no formula for."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(aten, name): _sdpa_flops for name in names if hasattr(aten, name)}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts every sdpa kernel, grouped-query attention included."""
    return FlopCounterMode(display=False, custom_mapping=_sdpa_mapping())


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
