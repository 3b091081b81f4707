"""Deterministic top-k: ties always resolve to the lower index."""

from __future__ import annotations

import torch


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest entries of a 1-D tensor, in descending score order.

    Ties are broken towards the lower index (a stable sort), unlike `torch.topk` whose tie order is
    unspecified. NaN counts as the smallest value.

    scores: [N]; returns LongTensor [min(k, N)].
    """
    if scores.dim() != 1:
        raise ValueError(f"topk_stable expects a 1-D tensor, got shape {tuple(scores.shape)}")
    k = max(0, min(int(k), scores.shape[0]))
    work = torch.promote_types(scores.dtype, torch.float32)  # bf16/fp16 widened, float64 kept exact
    clean = torch.nan_to_num(scores.to(work), nan=float("-inf"))
    order = torch.sort(clean, descending=True, stable=True).indices
    return order[:k]


def topk_keep_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest entries (ties -> lower index), returned in ascending index order.

    scores: [N]; returns LongTensor [min(k, N)], strictly increasing.
    """
    return torch.sort(topk_stable(scores, k)).values
