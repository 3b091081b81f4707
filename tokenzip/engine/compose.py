"""Composing a sample's new token order from per-item / per-slot selections."""

from __future__ import annotations

import torch

from ..contexts import Selection
from ..items import VisualItem


def compose_prompt(
    valid: torch.Tensor,
    items: list[VisualItem],
    selections: list[Selection],
) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]], torch.Tensor | None]:
    """The prompt positions one sample keeps at the LLM input, in sequence order.

    valid: BoolTensor [L] real tokens of the sample; items: the sample's items (sequence order);
    selections: one per item, item-local indices (in output order when `ordered`, else sorted here).
    Returns the kept prompt positions [n]; for every selection with `values`, a tuple (offset in the output,
    count, values) to write over the gathered embeddings; and the per-output annotation [n] (NaN where none)
    if any selection carries `annotations`, else None.
    """
    device = valid.device
    pieces: list[torch.Tensor] = []
    overrides: list[tuple[int, int, torch.Tensor]] = []
    notes: list[tuple[int, torch.Tensor]] = []
    cursor, out_len = 0, 0
    for item, sel in zip(items, selections):
        window = item.start + sel.offset
        text = valid[cursor:window].nonzero().flatten() + cursor
        pieces.append(text)
        out_len += text.numel()
        local = sel.keep.to(device).long()
        order = torch.arange(local.numel(), device=device)
        if not sel.ordered:
            local, order = torch.sort(local)
        pieces.append(local + window)
        if sel.values is not None:
            overrides.append((out_len, local.numel(), sel.values[order.to(sel.values.device)]))
        if sel.annotations is not None:
            notes.append((out_len, sel.annotations[order.to(sel.annotations.device)]))
        out_len += local.numel()
        tail = torch.arange(window + item.length, item.start + item.length, device=device)
        pieces.append(tail)
        out_len += tail.numel()
        cursor = item.start + item.length
    pieces.append(valid[cursor:].nonzero().flatten() + cursor)
    kept = torch.cat(pieces)
    annotation = None
    if notes:
        annotation = torch.full((kept.numel(),), float("nan"), device=device)
        for offset, values in notes:
            annotation[offset : offset + values.numel()] = values.float().to(device)
    return kept, overrides, annotation


def compose_slots(
    valid: torch.Tensor,
    visual: torch.Tensor,
    item: torch.Tensor,
    selection: Selection,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The slots one sample keeps at an in-LLM stage (or in a KV cache edit).

    `visual` marks the prunable slots: all other real slots are kept in place; the selected prunable slots
    are kept in sequence order, or, with `ordered`, each item's selected slots in the given order starting
    where the item's first prunable slot was. valid / visual / item: [L]. Returns (kept slots [n], values
    [n, D] aligned to them or None, positions of the valued slots in the output [m]).
    """
    device = valid.device
    chosen = selection.keep.to(device).long()
    if not bool((valid[chosen] & visual[chosen]).all()):
        raise ValueError("a policy selected slots that are not real prunable tokens of the current layout")
    keep_mask = valid & ~visual
    slots = torch.cat([keep_mask.nonzero().flatten(), chosen])
    rank = torch.cat(
        [torch.zeros(int(keep_mask.sum()), device=device), torch.arange(1, chosen.numel() + 1, device=device)]
    )
    if selection.ordered:
        first_slot = torch.full((int(item.max().item()) + 2,), -1, dtype=torch.long, device=device)
        vis_idx = (valid & visual).nonzero().flatten()
        # first visual slot of each item: scatter_reduce with amin over the item's slots
        first_slot = first_slot.scatter_reduce(0, item[vis_idx] + 1, vis_idx, reduce="amin", include_self=False)
        anchor = torch.where(rank > 0, first_slot[item[slots] + 1], slots)
        key = anchor.double() * (chosen.numel() + 2) + rank.double()
    else:
        key = slots.double()
    order = torch.argsort(key)
    kept = slots[order]
    if selection.values is None:
        return kept, None, torch.zeros(0, dtype=torch.long, device=device)
    is_val = order >= int(keep_mask.sum())  # entries that came from `chosen`
    out_pos = is_val.nonzero().flatten()
    values = selection.values[(order[is_val] - int(keep_mask.sum())).to(selection.values.device)]
    return kept, values, out_pos
