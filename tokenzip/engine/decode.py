"""After prefill: the decode-stage KV-cache edits, the mask / positions of every decode step on the compressed
cache, and their replay as masks in a cache-free recomputation (`Patch.replay`)."""

from __future__ import annotations

from typing import Any

import torch

from ..contexts import DecodeContext
from ..errors import UnsupportedInputError
from .accounting import policy_work
from .cache import appended_tokens, gather_cache_layer
from .compose import compose_slots
from .config import PatchConfig
from .hooks import stopwatch
from .layout import Layout, compact_positions, first_positions, take
from .masks import decode_mask
from .state import Decisions, ForwardState


def edit_kv_cache(cfg: PatchConfig, st: ForwardState, cache: Any, decisions: Decisions | None) -> None:
    """The decode stage, once prefill is done: the policy's per-layer selections (`Selection` per sample over slots
    of that layer's layout) of visual KV entries are applied to `cache` (keys / values [B, H_kv, L, d] gathered to
    [B, H_kv, L', d]; each edited layer gets a layout of its own in `st.layer_layouts`). Without a cache
    (`use_cache=False`) they are only recorded in `decisions` (as LLM-input slots), for a replay to apply as
    masks."""
    with stopwatch(torch.device("cpu")) as seconds:
        ctx = DecodeContext(
            cfg.info,
            list(st.layer_layouts),
            st.items,
            cfg.keep,
            st.sample_keys(),
            cfg.plan.llm_layers,
            cfg.plan.state,
        )
        with policy_work():
            edits = cfg.policy.select_decode(ctx)
        for layer, selections in edits.items():
            prev = st.layer_layouts[layer]
            if decisions is not None:
                decisions.decode[layer] = [
                    prev.lm_src[b][sel.keep.to(prev.lm_src.device)].cpu() for b, sel in enumerate(selections)
                ]
            if cache is None:
                continue
            keep_lists = [
                compose_slots(prev.valid[b], prev.visual[b], prev.item[b], sel)[0] for b, sel in enumerate(selections)
            ]
            layout, index = take(prev, keep_lists)
            if cfg.renumbers_decode:  # decode positions continue from this layer's own cache length
                layout.positions = compact_positions(layout, first_positions(prev.positions, prev.valid))
            gather_cache_layer(cache, layer, index, layout.valid)
            st.layer_layouts[layer] = layout
    st.seconds["decode"] = seconds[0]


def decode_step_inputs(cfg: PatchConfig, st: ForwardState, kwargs: dict) -> dict | None:
    """Pre-hook of the decoder stack in a decode step (`inputs_embeds` [B, q, D]): the 2-D mask [B, L0 + t + q]
    of the new tokens on the compressed prompt (its prompt part is the LLM-input layout's validity) and their
    position ids [B, q] (or [R, B, q] for M-RoPE), continuing the original frame, shifted where compact. None
    when the step's own arguments are right."""
    embeds = kwargs["inputs_embeds"]
    batch, q = embeds.shape[0], embeds.shape[1]
    t = appended_tokens(st, kwargs)
    st.decoded = t + q
    st.step_cache = {}
    mask = kwargs.get("attention_mask")
    if mask is None:
        tail = torch.ones(batch, t + q, dtype=torch.bool, device=embeds.device)
        new_mask = None if bool(st.layout0.valid.all()) else torch.cat([st.layout0.valid.long(), tail.long()], 1)
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if mask.shape[1] != st.orig_len + t + q:
            raise UnsupportedInputError(
                f"decode attention_mask has {mask.shape[1]} columns; expected prompt length {st.orig_len} + "
                f"{t + q} new tokens (extend the prompt's 2-D mask by one column per generated token)"
            )
        tail = mask[:, st.orig_len :].bool()
        new_mask = torch.cat([st.layout0.valid.long(), mask[:, st.orig_len :].long()], 1)
    else:
        raise UnsupportedInputError("tokenzip needs a 2-D attention_mask (or None) during decoding")
    st.tail = tail
    pos = kwargs.get("position_ids")
    rows = st.layout0.positions.shape[0]
    steps = torch.arange(t, t + q, device=embeds.device)
    if not st.user_positions or pos is None:
        if rows == 1:  # [1, B, q] original frame
            lm_pos = (st.orig_last_pos.to(embeds.device)[:, None] + 1 + steps[None]).unsqueeze(0)
        else:  # M-RoPE rows: continue each row from the last prompt token
            lm_pos = st.layout0.positions[..., -1][..., None] + 1 + steps[None, None]
    else:
        lm_pos = pos.unsqueeze(0) if pos.dim() == 2 else pos
    st.lm_positions = lm_pos
    shift = st.shift(st.layout0).to(embeds.device)
    new_pos = lm_pos - shift[None, :, None] if rows == 1 else lm_pos
    if not (st.rebuilt or cfg.plan.decode):
        return None  # the LLM input is the original sequence: its own mask and positions are right
    if st.rebuilt:
        kwargs["attention_mask"] = new_mask
    kwargs["position_ids"] = new_pos[0] if rows == 1 else new_pos
    return kwargs


def decode_layer_kwargs(cfg: PatchConfig, st: ForwardState, layout: Layout, hidden: torch.Tensor) -> dict:
    """Mask (and compact positions) of a decode step in a decoder layer whose cache holds `layout` (cached per
    layout for the step)."""
    key = id(layout)
    if key in st.step_cache:
        return st.step_cache[key]
    q = hidden.shape[1]
    impl = cfg.info.attn_implementation
    out: dict[str, Any] = {
        "attention_mask": decode_mask(layout.valid, st.tail.to(layout.valid.device), q, impl, hidden.dtype)
    }
    if cfg.compact:
        pos = st.lm_positions[0] - st.shift(layout).to(hidden.device)[:, None]
        out["position_embeddings"] = cfg.adapter.rotary_emb(hidden, pos)
        out["position_ids"] = pos
    st.step_cache[key] = out
    return out


def eviction_mask(cfg: PatchConfig, replaying: Decisions, layout: Layout, index: int, dtype: torch.dtype):
    """Replay of a decode-stage KV edit in a cache-free prefill: tokens after the recorded prompt (the generated
    ones) cannot see the visual tokens that the edit evicted from layer `index`'s cache. [B, 1, L, L] (cached)."""
    key = ("evict", index)
    if key in layout.cache:
        return layout.cache[key]
    evicted = layout.valid & layout.visual
    for b, kept in enumerate(replaying.decode[index]):
        evicted[b] &= ~torch.isin(layout.lm_src[b], kept.to(layout.lm_src.device))
    late = layout.orig >= replaying.prompt_len  # [B, L] queries generated after the recorded prompt
    n = layout.length
    keep = torch.ones(n, n, dtype=torch.bool, device=layout.valid.device).tril()[None] & layout.valid[:, None, :]
    keep &= ~(late[:, :, None] & evicted[:, None, :])
    keep |= torch.eye(n, dtype=torch.bool, device=keep.device)[None] & ~layout.valid[:, :, None]
    layout.cache[key] = _four_d(keep, cfg.info.attn_implementation, dtype, "replaying a decode-stage edit")
    return layout.cache[key]


def bidirectional_mask(cfg: PatchConfig, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """Prefill mask without causality (padding keys hidden) for a layer that attends both ways."""
    n = layout.length
    keep = layout.valid[:, None, :].expand(-1, n, -1)
    keep = keep | torch.eye(n, dtype=torch.bool, device=keep.device)[None]
    return _four_d(keep, cfg.info.attn_implementation, dtype, "a bidirectional layer")


def _four_d(keep: torch.Tensor, impl: str, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A boolean [B, L, L] keep-mask as the 4-D mask of `impl` (bool for sdpa, additive for eager)."""
    if impl.startswith("flash"):
        raise UnsupportedInputError(f"{what} needs a 4-D mask: use sdpa or eager")
    mask = keep.unsqueeze(1)
    if impl == "eager":
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
    return mask


def eviction_positions(
    cfg: PatchConfig, replaying: Decisions, layout: Layout, index: int, hidden: torch.Tensor
) -> dict:
    """Replay of the 'own cache length' decode positions: generated tokens in an edited layer continue from the
    number of prompt tokens the edit kept (cached)."""
    key = ("evict-pos", index)
    if key not in layout.cache:
        late = layout.orig >= replaying.prompt_len
        kept = layout.valid & ~late
        visual = kept & layout.visual
        for b, slots in enumerate(replaying.decode[index]):
            kept[b] &= ~visual[b] | torch.isin(layout.lm_src[b], slots.to(layout.lm_src.device))
        start = first_positions(layout.positions, layout.valid)
        late_rank = late.long().cumsum(1) - 1
        pos = torch.where(late, start[:, None] + kept.sum(1, keepdim=True) + late_rank, layout.positions[0])
        layout.cache[key] = {"position_embeddings": cfg.adapter.rotary_emb(hidden, pos), "position_ids": pos}
    return layout.cache[key]
