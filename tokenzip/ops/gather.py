"""Batched gathers along the sequence dimension."""

from __future__ import annotations

import torch


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`x` gathered along `dim` with a per-sample index.

    x: [B or 1, ..., L, ...] (a batch of 1 is broadcast); index: LongTensor [B, n] with values in [0, L).
    Returns x with dimension `dim` of size n: out[b, ..., j, ...] = x[b, ..., index[b, j], ...].
    """
    batch = index.shape[0]
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, *x.shape[1:])
    view = [1] * x.dim()
    view[0], view[dim] = batch, index.shape[1]
    expand = list(x.shape)
    expand[dim] = index.shape[1]
    return torch.gather(x, dim, index.to(x.device).view(view).expand(expand))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a [..., B, L] tensor gathered on its last dimension with a [B, n] index (e.g. position ids [R, B, L])."""
    lead = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:])
    out = torch.stack([gather_seq(row, index, dim=1) for row in flat], 0)
    return out.reshape(*lead, index.shape[0], index.shape[1])
