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


def pad_rows(hidden: torch.Tensor, kept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather each row's kept token indices and right-pad to the longest row.

    hidden: [R, T, D]; kept: per row LongTensor [n_r] (sorted). Returns (hidden' [R, W, D], slots [R, W],
    valid [R, W]); padding slots point at token 0 and are zeroed.
    """
    rows = hidden.shape[0]
    width = max(int(k.numel()) for k in kept)
    slots = torch.zeros(rows, width, dtype=torch.long, device=hidden.device)
    valid = torch.zeros(rows, width, dtype=torch.bool, device=hidden.device)
    for r, k in enumerate(kept):
        slots[r, : k.numel()] = k.to(hidden.device)
        valid[r, : k.numel()] = True
    out = torch.gather(hidden, 1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
    return out * valid[..., None].to(out.dtype), slots, valid


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
    Returns (full features per image [shape.length, D], item-local indices that survived per image).
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
        available.append(torch.sort(local).values.cpu())
    return full, available


def scatter_signal(scores: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, full_length: int) -> torch.Tensor:
    """Scores [R, W, *C] of pruned tower rows placed back at their original token index; NaN elsewhere:
    [R, T, *C]."""
    shape = (scores.shape[0], full_length, *scores.shape[2:])
    out = torch.full(shape, float("nan"), dtype=torch.float32, device=scores.device)
    rows, cols = valid.nonzero(as_tuple=True)
    out[rows, slots[rows, cols]] = scores[rows, cols].float()
    return out
