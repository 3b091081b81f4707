"""Sequence layouts: which token sits in which slot of a left-padded batch, and how to shrink one.

A `Layout` describes the batch at one point of the LLM (its input after the pre-LLM stage, or the input of
the layers after an in-LLM stage). Every stage produces a new layout from the previous one by keeping, per
sample, an ordered list of slots; samples may keep different numbers of tokens, so the result is re-padded
on the left (what generation expects) and carries a validity mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.gather import gather_rows, gather_seq


@dataclass
class Layout:
    """A left-padded arrangement of the batch.

    src:       LongTensor [B, L]  slot -> index in the previous layout (0 on padding).
    lm_src:    LongTensor [B, L]  slot -> slot of the same token in the LLM-input layout (`layout0`, after the
               pre-LLM stage), where it is the slot index itself; stable for a token through every later stage.
    orig:      LongTensor [B, L]  slot -> position in the original prompt (representative for merges).
    valid:     BoolTensor [B, L]  real token (False on padding).
    visual:    BoolTensor [B, L]  visual content token that in-LLM stages may prune.
    item:      LongTensor [B, L]  index of the sample's visual item the token belongs to, -1 for text.
    positions: LongTensor [R, B, L]  position ids used in prefill (R = 1 for 1-D RoPE, 3 or 4 for M-RoPE).
    annotation: optional float [B, L] per-token value a policy attached at the pre-LLM stage (NaN elsewhere),
               carried through later stages (e.g. MustDrop's key score of a merged window).
    """

    src: torch.Tensor
    lm_src: torch.Tensor
    orig: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    item: torch.Tensor
    positions: torch.Tensor
    annotation: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def visual_slots(self, b: int) -> torch.Tensor:
        """LongTensor [n]: the slots of sample b's real visual content tokens (what in-LLM stages select from), in
        sequence order."""
        return (self.valid[b] & self.visual[b]).nonzero().flatten()

    def visual_counts(self) -> torch.Tensor:
        """LongTensor [B]: visual content tokens per sample."""
        return (self.visual & self.valid).sum(1)


def take(
    layout: Layout, keep: list[torch.Tensor], positions: torch.Tensor | None = None
) -> tuple[Layout, torch.Tensor]:
    """Keep, per sample, the slots `keep[b]` (in that order) of `layout`; re-pad on the left.

    keep: one LongTensor [n_b] of slot indices per sample (valid slots only).
    positions: optional LongTensor [R, B, L'] to use instead of the gathered positions (compact mode).
    Returns the new layout and the gather index [B, L'] into `layout`'s slots (0 on padding).
    """
    device = layout.valid.device
    counts = torch.tensor([int(k.numel()) for k in keep], device=device)
    width = int(counts.max()) if len(keep) else 0
    index = torch.zeros(layout.batch, width, dtype=torch.long, device=device)
    valid = torch.zeros(layout.batch, width, dtype=torch.bool, device=device)
    for b, k in enumerate(keep):
        n = int(k.numel())
        if n:
            index[b, width - n :] = k.to(device)
            valid[b, width - n :] = True
    new_positions = gather_rows(layout.positions, index) if positions is None else positions
    new = Layout(
        src=index,
        lm_src=gather_seq(layout.lm_src, index),
        orig=gather_seq(layout.orig, index),
        valid=valid,
        visual=gather_seq(layout.visual, index) & valid,
        item=torch.where(valid, gather_seq(layout.item, index), -1),
        positions=new_positions,
        annotation=None if layout.annotation is None else gather_seq(layout.annotation, index),
    )
    return new, index


def first_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row-0 position id of each sample's first real slot. positions: [R, B, L]; valid: [B, L]. Returns [B]."""
    return positions[0].gather(1, valid.long().argmax(1, keepdim=True))[:, 0]


def compact_positions(layout: Layout, first: torch.Tensor) -> torch.Tensor:
    """Contiguous position ids: sample b's real tokens get first[b], first[b] + 1, ...; padding gets 1.

    first: LongTensor [B]. Returns LongTensor [1, B, L].
    """
    rank = layout.valid.long().cumsum(1) - 1
    pos = torch.where(layout.valid, rank + first[:, None].to(rank.device), torch.ones_like(rank))
    return pos.unsqueeze(0)


def gather_hidden(hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, D] gathered into a new layout (padding slots zeroed). Returns [B, L', D]."""
    out = gather_seq(hidden, index, dim=1)
    return out * valid.unsqueeze(-1).to(out.dtype)
