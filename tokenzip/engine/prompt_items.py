"""Matching a prefill's feature calls to the visual items of its prompt.

A forward's feature calls produce item shapes in the order the model scatters features into the placeholder runs;
these helpers pair each (call, item-in-call) with the item of the prompt it fills, and map the calls' vision
signals onto each item's tokens.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..adapters.base import Adapter
from ..errors import UnsupportedInputError
from ..items import ItemsOfBatch, locate_items
from .state import VisionCall

Flat = dict[str, list[tuple[VisionCall, int]]]  # modality -> (call, index of the item in the call), in scatter order


def flat_calls(adapter: Adapter, calls: dict[str, list[VisionCall]], input_ids: torch.Tensor) -> Flat:
    """Per modality, (call, item) references in the order the model scatters features.

    `generate` with num_beams / num_return_sequences > 1 repeats every sample k times after the features were
    computed (and recorded); the references are repeated to match.
    """
    flat = {m: [(c, j) for c in cs for j in range(len(c.shapes))] for m, cs in calls.items()}
    for modality, entries in flat.items():
        token = adapter.token_ids[modality]
        n_placeholders = int((input_ids == token).sum())
        total = sum(c.shapes[j].length for c, j in entries)
        if not entries or n_placeholders == total or n_placeholders % total:
            continue
        k = n_placeholders // total
        batch = input_ids.shape[0]
        if batch % k or not all(torch.equal(input_ids[b], input_ids[b - b % k]) for b in range(batch)):
            continue  # not generate's expansion: locate_items reports the mismatch
        expanded, cursor = [], 0
        for b in range(0, batch, k):
            need, group = int((input_ids[b] == token).sum()), []
            while need > 0 and cursor < len(entries):
                group.append(entries[cursor])
                need -= entries[cursor][0].shapes[entries[cursor][1]].length
                cursor += 1
            expanded += group * k
        flat[modality] = expanded
    return flat


def collect_items(adapter: Adapter, input_ids: torch.Tensor | None, flat: Flat) -> ItemsOfBatch:
    """The visual items of the prompt `input_ids` [B, L], located from the recorded shapes (none without ids)."""
    shapes = {m: [c.shapes[j] for c, j in entries] for m, entries in flat.items()}
    if input_ids is None:
        if any(shapes.values()):
            warnings.warn(
                "tokenzip: the model was called with inputs_embeds and no input_ids, so image tokens cannot "
                "be located; this forward runs uncompressed",
                stacklevel=4,
            )
        return ItemsOfBatch()
    present = {m: bool((input_ids == t).any()) for m, t in adapter.token_ids.items()}
    for modality, has in present.items():
        if has and not shapes[modality]:
            raise UnsupportedInputError(
                f"the prompt has {modality} tokens but tokenzip saw no {modality} features being computed "
                "(pre-computed mm_encoder_outputs are not supported); pass pixel values to the model"
            )
    used = {m: s for m, s in shapes.items() if present[m]}
    return locate_items(input_ids, adapter.token_ids, used)


def per_item(flat: Flat, field: str) -> dict[tuple[str, int], Any]:
    """(modality, index in modality) -> the item's entry of the per-item list `VisionCall.<field>` (`available`,
    `vision_groups` or `overrides`); items of calls whose list is None are left out."""
    return {
        (m, k): getattr(call, field)[j]
        for m, entries in flat.items()
        for k, (call, j) in enumerate(entries)
        if getattr(call, field) is not None
    }


def item_signals(adapter: Adapter, flat: Flat) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """(modality, index in modality) -> signal key -> float [item length] (the calls' raw signals mapped onto
    the item's tokens, NaN at structural tokens)."""
    mapped: dict[int, dict[str, list[torch.Tensor]]] = {}
    out: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for modality, entries in flat.items():
        for k, (call, j) in enumerate(entries):
            if id(call) not in mapped:
                mapped[id(call)] = {
                    key: adapter.vision_scores_to_items(modality, raw, call.shapes, call.arguments)
                    for key, raw in call.signals.items()
                }
            out[(modality, k)] = {key: vals[j] for key, vals in mapped[id(call)].items()}
    return out
