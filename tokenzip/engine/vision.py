"""Vision-tower stage helpers (CLIP-style towers that process one row per image).

Tokens dropped inside the tower make the feature count differ from the processor's placeholders. The engine
therefore (1) right-pads rows that keep different counts and masks the padding in every later encoder layer,
and (2) after the projector, scatters each image's surviving features back onto its full grid (zeros in the
dropped cells) so the model's own placeholder check and scatter work; the dropped placeholders are then
removed at the LLM input, so the LLM never sees them.
"""

from __future__ import annotations

import torch

from ..items import ItemShape


def pad_rows(
    hidden: torch.Tensor, kept: list[torch.Tensor], values: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay each row's kept tokens (in the given order) out left-aligned and right-pad to the longest row.

    hidden: [R, T, D]; kept: per row LongTensor [n_r] of token indices (CLS = 0 where present); values: per row
    [n_r, D] replacement values (merged tokens), else the rows' own hidden states. Returns (hidden' [R, W, D],
    slots [R, W] = token index each output token stands at, valid [R, W]); padding slots point at token 0 and
    are zeroed.
    """
    rows = hidden.shape[0]
    width = max(int(k.numel()) for k in kept)
    slots = torch.zeros(rows, width, dtype=torch.long, device=hidden.device)
    valid = torch.zeros(rows, width, dtype=torch.bool, device=hidden.device)
    out = hidden.new_zeros(rows, width, hidden.shape[-1])
    for r, k in enumerate(kept):
        n = int(k.numel())
        slots[r, :n] = k.to(hidden.device)
        valid[r, :n] = True
        out[r, :n] = hidden[r, k.to(hidden.device)] if values is None else values[r]
    return out, slots, valid


def encoder_padding_mask(valid: torch.Tensor, impl: str, dtype: torch.dtype):
    """Bidirectional encoder mask hiding padding keys; padding queries see themselves. None if no padding.

    eager / sdpa: additive float [R, 1, W, W]; FlashAttention: 2-D [R, W].
    """
    if bool(valid.all()):
        return None
    if "flash" in impl:
        return valid.long()
    width = valid.shape[1]
    keep = valid[:, None, :].expand(-1, width, -1) | torch.eye(width, dtype=torch.bool, device=valid.device)[None]
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(keep, zero, torch.finfo(dtype).min).unsqueeze(1)


def expand_features(
    features: list[torch.Tensor],
    slots: torch.Tensor,
    valid: torch.Tensor,
    shapes: list[ItemShape],
    dropped_leading: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scatter each image's surviving projected features back onto its full token run.

    features: per image [W - dropped_leading, D] (the tower's right-padded rows after feature selection);
    slots / valid: [R, W] from `pad_rows` (token indices of the tower row, CLS = 0); dropped_leading: tokens the
    feature selection removed from the front of every row (1 for LLaVA's 'default' strategy).
    Returns (full features per image [shape.length, D], item-local indices that survived per image, in the
    order the tower emitted them: the order they enter the LLM).
    """
    full, available = [], []
    for shape, feat in zip(shapes, features):
        r = shape.vision_rows[0]
        row_slots = slots[r, dropped_leading:] - dropped_leading
        row_valid = valid[r, dropped_leading:]
        local = row_slots[row_valid]
        out = feat.new_zeros(shape.length, feat.shape[-1])
        out[local] = feat[row_valid.to(feat.device)]
        full.append(out)
        available.append(local.cpu())
    return full, available


def scatter_signal(scores: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, full_length: int) -> torch.Tensor:
    """Scores [R, W, *C] of pruned tower rows placed back at their original token index; NaN elsewhere:
    [R, T, *C]."""
    shape = (scores.shape[0], full_length, *scores.shape[2:])
    out = torch.full(shape, float("nan"), dtype=torch.float32, device=scores.device)
    rows, cols = valid.nonzero(as_tuple=True)
    out[rows, slots[rows, cols]] = scores[rows, cols].float()
    return out
