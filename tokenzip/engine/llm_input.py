"""The pre-LLM stage: rebuilding the LLM input of a prefill (embeddings, 2-D mask, positions) from the policy's
per-item selections, and the layout that every later stage starts from."""

from __future__ import annotations

import torch

from ..contexts import PreLLMItem, Selection
from ..errors import UnsupportedInputError
from ..ops.gather import gather_seq
from ..signals.checks import require_finite
from .accounting import policy_work
from .compose import compose_prompt
from .config import PatchConfig
from .hooks import stopwatch
from .layout import Layout, compact_positions, first_positions, gather_hidden, take
from .prompt_items import collect_items, flat_calls, item_signals, per_item
from .state import Decisions, ForwardState, VisionCall


def kept_record(
    sel: Selection, item, available: torch.Tensor | None = None, vision_groups: torch.Tensor | None = None
) -> tuple:
    """What `patch.stats` records of one item (`ForwardState.item_kept`): (item-local indices of the real tokens
    a pre-LLM selection keeps, in sequence order; zero rows added; merges [2, m] item-local of the vision stage
    and this selection, or None; the tokens a vision stage left, or None).

    With a window offset the index -1 is the token before the run; the run's uncovered tail is always kept.
    """
    keep = sel.keep.cpu().long()
    if not sel.ordered:
        keep = torch.sort(keep).values
    real = keep[: keep.numel() - sel.padding] + sel.offset
    tail = torch.arange(item.length + sel.offset, item.length)
    merges = [
        g
        for g in (vision_groups, None if sel.groups is None else sel.groups.cpu().long() + sel.offset)
        if g is not None
    ]
    groups = torch.cat(merges, dim=1) if merges else None
    return torch.cat([real, tail]), sel.padding, groups, available


def refuse_labels(cfg: PatchConfig, st: ForwardState, before: Layout, after: Layout, where: str) -> None:
    """A forward with `labels` must not shorten its sequence: the model's loss aligns the labels [B, L] with the
    logits position by position, and the logits would cover fewer positions."""
    if not st.labels:
        return
    if after.length == before.length and torch.equal(after.valid.sum(1), before.valid.sum(1)):
        return
    raise UnsupportedInputError(
        f"labels= was passed, but policy {cfg.policy.name!r} (keep={cfg.keep!r}) removes tokens {where}, so "
        "the logits no longer line up with labels, which follow the unpruned sequence; call the model without "
        "labels and compute the loss from the logits yourself (e.g. for the text positions after the image), "
        "or use keep=1.0"
    )


def prefill_llm_input(
    cfg: PatchConfig, st: ForwardState, calls: dict[str, list[VisionCall]], kwargs: dict, replaying: Decisions | None
) -> tuple[dict | None, Decisions | None]:
    """Pre-hook of the decoder stack in prefill: locate the prompt's items, run the pre-LLM stage (or apply what a
    vision / projector-input stage left) and rebuild the LLM input on the new layout `st.layout0`.

    calls: the feature calls of this forward per modality. Returns (the decoder's new kwargs, or None when the
    input is unchanged; the new `Decisions` record, or None when nothing was recorded: no item, or a replay).
    """
    embeds = kwargs["inputs_embeds"]  # [B, L, D]
    batch, length, _ = embeds.shape
    st.calls = [c for cs in calls.values() for c in cs]
    flat = flat_calls(cfg.adapter, calls, st.input_ids) if st.input_ids is not None else {}
    st.items = collect_items(cfg.adapter, st.input_ids, flat)
    inside = sum(c.seconds for c in st.calls)
    st.seconds["vision_encoder"] = sum(c.call_seconds for c in st.calls) - inside
    st.seconds["vision_stage"] = inside
    if not st.items:
        return None, None
    st.active = True
    device = embeds.device
    mask2d = kwargs.get("attention_mask")
    if mask2d is not None and (not isinstance(mask2d, torch.Tensor) or mask2d.dim() != 2):
        raise UnsupportedInputError("tokenzip needs a 2-D attention_mask (or None) at the LLM input")
    valid = mask2d.bool() if mask2d is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
    st.right_padded = bool((~valid[:, -1]).any())
    pos = kwargs.get("position_ids")
    if pos is None:
        pos_rows = torch.arange(length, device=device)[None, None].expand(1, batch, length)
    else:
        pos_rows = pos.unsqueeze(0) if pos.dim() == 2 else pos
    visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
    item_id = torch.full((batch, length), -1, dtype=torch.long, device=device)
    for it in st.items.all:
        visual[it.sample, it.span] = it.shape.content_mask().to(device)
        item_id[it.sample, it.span] = it.index_in_sample
    arange = torch.arange(length, device=device).expand(batch, -1)
    orig = Layout(arange, arange, arange, valid.to(device), visual, item_id, pos_rows)
    st.orig_len = length
    st.orig_last_pos = pos_rows[0, :, -1].clone()
    if replaying is not None and (replaying.batch != batch or length < replaying.prompt_len):
        raise UnsupportedInputError(
            f"replay: the recorded prefill had batch {replaying.batch} and prompt length {replaying.prompt_len}; "
            f"this one has batch {batch} and length {length} (replay needs the same prompts, possibly extended)"
        )
    decisions = None if replaying is not None else _new_decisions(batch, length, calls)
    signals = item_signals(cfg.adapter, flat) if cfg.plan.vision_signals else {}
    st.item_signals = {
        (b, j): signals.get((it.modality, it.index_in_modality), {})
        for b, items in enumerate(st.items.per_sample)
        for j, it in enumerate(items)
    }
    available = per_item(flat, "available")
    vision_groups = per_item(flat, "vision_groups")
    overrides = per_item(flat, "overrides")
    if not (cfg.plan.pre_llm or any(a is not None for a in available.values()) or overrides):
        st.layout0 = orig
        st.item_kept = [[(torch.arange(it.length), 0, None, None) for it in items] for items in st.items.per_sample]
        start_layers(cfg, st)
        return None, decisions

    with stopwatch(device) as seconds:
        keep_lists, writes, item_kept, annotations = [], [], [], []
        for b, items in enumerate(st.items.per_sample):
            selections, vision_left = [], []
            for j, it in enumerate(items):
                key = (it.modality, it.index_in_modality)
                vision_left.append((available.get(key), vision_groups.get(key)))
                if replaying is not None:
                    sel = replaying.pre_llm[b][j]
                elif key in overrides:
                    sel = overrides[key]
                elif cfg.plan.pre_llm:
                    sel = _select(cfg, st, embeds, b, it, available.get(key), signals.get(key, {}))
                else:  # the tokens a vision stage left, in the order it emitted them
                    left = available.get(key)
                    sel = Selection(torch.arange(it.length) if left is None else left, ordered=True)
                selections.append(sel)
            if decisions is not None:
                decisions.pre_llm = (decisions.pre_llm or []) + [selections]
            kept, over, annotation = compose_prompt(valid[b], items, selections)
            keep_lists.append(kept)
            writes.append(over)
            annotations.append(annotation)
            item_kept.append([kept_record(s, it, *v) for s, it, v in zip(selections, items, vision_left, strict=True)])
        layout0, index = take(orig, keep_lists)
        refuse_labels(cfg, st, orig, layout0, "at the LLM input")
        layout0.lm_src = torch.arange(layout0.length, device=device).expand(batch, -1)  # it *is* the LLM input
        if cfg.compact:
            layout0.positions = compact_positions(layout0, first_positions(pos_rows, valid))
        if any(a is not None for a in annotations):
            layout0.annotation = torch.full(layout0.valid.shape, float("nan"), device=device)
            for b, values in enumerate(annotations):
                if values is not None:
                    layout0.annotation[b, layout0.length - values.numel() :] = values.to(device)
        new_embeds = gather_hidden(embeds, index, layout0.valid)
        for b, over in enumerate(writes):
            pad = layout0.length - int(keep_lists[b].numel())
            for offset, count, values in over:
                new_embeds[b, pad + offset : pad + offset + count] = values.to(new_embeds.dtype)
    st.seconds["pre_llm"] = seconds[0]
    st.layout0, st.rebuilt, st.item_kept = layout0, True, item_kept
    kwargs["inputs_embeds"] = new_embeds
    kwargs["attention_mask"] = layout0.valid.long()
    kwargs["position_ids"] = layout0.positions[0] if (pos is None or pos.dim() == 2) else layout0.positions
    start_layers(cfg, st)
    return kwargs, decisions


def start_layers(cfg: PatchConfig, st: ForwardState) -> None:
    """Every decoder layer starts on the LLM-input layout (in-LLM stages replace it from their layer on)."""
    st.current = st.layout0
    st.layer_layouts = [st.layout0] * cfg.info.n_llm_layers


def _select(cfg: PatchConfig, st: ForwardState, embeds, b: int, it, available, signals) -> Selection:
    """The policy's pre-LLM selection for sample b's item `it` (`available`: what a vision stage left, or None)."""
    ctx = PreLLMItem(
        it,
        embeds[b, it.span],
        torch.arange(it.length) if available is None else available,
        cfg.keep,
        signals,
        embeds[b, it.start - 1] if it.start > 0 else None,
        batch=st.items,
        info=cfg.info,
        state=cfg.plan.state,
    )
    what = f"features of sample {b}'s {it.modality} {it.index_in_sample}"
    require_finite(ctx.embeds, cfg.policy.name, "the pre_llm stage", what)
    with policy_work():
        return cfg.policy.select_pre_llm(ctx)


def _new_decisions(batch: int, length: int, calls: dict[str, list[VisionCall]]) -> Decisions:
    """A fresh record of this prefill's selections, starting with the vision-side ones of its feature calls."""
    vision = {m: [c.kept_rows for c in cs if c.kept_rows is not None] for m, cs in calls.items()}
    projector = {m: [c.projector_rows for c in cs if c.projector_rows is not None] for m, cs in calls.items()}
    return Decisions(batch=batch, prompt_len=length, vision=vision, projector=projector)


def right_padded_output(layout: Layout, output):
    """Prefill of a right-padded batch: lay the LLM's output out right-padded too (each sample's real tokens
    first, in order), as the unpatched model returns it; tokenzip's shortened layouts are left-padded inside.
    Sample b's last real token is then at slot `stats.last.samples[b].sequence_per_layer[-1] - 1`. None when the
    output needs no change."""
    order = torch.sort((~layout.valid).long(), dim=1, stable=True).indices  # [B, L'] real slots first
    if bool((order == torch.arange(layout.length, device=order.device)).all()):
        return None
    relaid = gather_seq(output[0], order.to(output[0].device), dim=1)
    if isinstance(output, tuple):
        return (relaid, *output[1:])
    output.last_hidden_state = relaid
    return output
