"""Helpers shared by policies: structural tokens, per-item randomness, budget splits."""

from __future__ import annotations

import torch

from ..items import ItemShape

NEWLINE_MODES = ("keep_nonempty_rows", "drop", "keep")


def structural_to_keep(shape: ItemShape, kept: torch.Tensor, newlines: str) -> torch.Tensor:
    """Item-local indices of structural tokens to keep alongside the kept content tokens `kept`.

    Leading / trailing structural tokens (a 'full' strategy's CLS, OneVision's trailing newline) are always
    kept. Per-row newline tokens (OneVision's packed high-res grid) follow `newlines`: 'keep' all, 'drop' all,
    or 'keep_nonempty_rows' (a row's newline stays iff the row keeps at least one token).
    """
    rows = shape.row_index()
    newline = shape.newline_mask()
    edge = (rows < 0) & ~shape.content_mask()
    keep = edge.clone()
    if newlines == "keep":
        keep |= newline
    elif newlines == "keep_nonempty_rows" and kept.numel():
        kept_rows = torch.zeros(int(rows.max()) + 2, dtype=torch.bool)
        kept_rows[rows[kept.cpu()] + 1] = True
        keep |= newline & kept_rows[rows + 1]
    return keep.nonzero().flatten()


def generator(seed: int, key: int) -> torch.Generator:
    """A CPU generator seeded from the policy seed and a per-image / per-sample key."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(key)) % (2**63 - 1))


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Split `total` tokens over units of `sizes` proportionally (largest remainders, ties -> earlier unit),
    giving every unit at least one token when the total allows and never more than its size."""
    n_units = len(sizes)
    if n_units == 0:
        return []
    grand = sum(sizes)
    if total >= grand:
        return list(sizes)
    floor_min = 1 if total >= n_units else 0
    shares = [max(floor_min, (total * s) // grand) for s in sizes]
    rest = total - sum(shares)
    if rest > 0:
        remainders = sorted(range(n_units), key=lambda i: (-((total * sizes[i]) % grand), i))
        for i in remainders:
            if rest == 0:
                break
            if shares[i] < sizes[i]:
                shares[i] += 1
                rest -= 1
    while rest < 0:  # floor_min pushed us over: take back from the largest shares
        i = max(range(n_units), key=lambda j: (shares[j], -j))
        shares[i] -= 1
        rest += 1
    return shares
