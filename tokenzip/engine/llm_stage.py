"""In-LLM stages during prefill: LLM signals captured at decoder layers, the selection before a decoder layer,
and the per-layer arguments (RoPE tables, position ids, mask) of layers that run on a shortened layout."""

from __future__ import annotations

import torch

from ..contexts import LLMSignal, LLMStageContext, Selection
from ..errors import TokenzipError, UnsupportedInputError
from ..ops.gather import gather_seq
from ..signals.attention import (
    decoder_attention_received,
    decoder_attention_rows,
    decoder_head_mean_keys,
    decoder_key_l1,
)
from ..signals.checks import require_finite
from . import decode
from .accounting import policy_work
from .compose import compose_slots
from .config import PatchConfig
from .hooks import stopwatch
from .layout import Layout, compact_positions, first_positions, gather_hidden, take
from .llm_input import refuse_labels
from .masks import prefill_mask
from .state import Decisions, ForwardState


def stage_kwargs(cfg: PatchConfig, layout: Layout, kwargs: dict, hidden: torch.Tensor) -> dict:
    """position_embeddings / position_ids / mask of decoder layers running on `layout` in prefill (cached on it):
    compact positions are renumbered, original ones gathered from the LLM input's."""
    if "prefill" in layout.cache:
        return layout.cache["prefill"]
    cos, sin = kwargs["position_embeddings"]
    if cfg.compact:
        pos = layout.positions[0]
        cos, sin = cfg.adapter.rotary_emb(hidden, pos)
        pos_ids = pos if kwargs.get("position_ids") is not None else None
    else:
        cos, sin = gather_seq(cos, layout.lm_src), gather_seq(sin, layout.lm_src)
        pid = kwargs.get("position_ids")
        pos_ids = gather_seq(pid, layout.lm_src) if pid is not None else None
    out = {
        "position_embeddings": (cos, sin),
        "position_ids": pos_ids,
        "attention_mask": prefill_mask(layout.valid, cfg.info.attn_implementation, hidden.dtype),
    }
    layout.cache["prefill"] = out
    return out


def llm_stage(
    cfg: PatchConfig,
    st: ForwardState,
    index: int,
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    kwargs: dict,
    replaying: Decisions | None,
    decisions: Decisions | None,
) -> torch.Tensor:
    """The stage before decoder layer `index`: the policy keeps visual slots of the current layout per sample
    (or the recorded ones are replayed); returns the shortened hidden states [B, L', D], `st.current` becomes
    their layout. The selection is recorded in `decisions` (LLM-input slots) unless replaying."""
    prev = st.current
    with stopwatch(hidden.device) as seconds:
        stage_kw = kwargs if prev is st.layout0 else stage_kwargs(cfg, prev, kwargs, hidden)
        prunable = prev.visual | (prev.item >= 0) if cfg.plan.llm_structural else prev.visual
        if replaying is not None:
            selections = [replayed_selection(prev, prunable, b, *rec) for b, rec in enumerate(replaying.llm[index])]
        else:
            selections = _select(cfg, st, index, layer, hidden, prev, stage_kw)
            if decisions is not None:
                decisions.llm[index] = [
                    (prev.lm_src[b][sel.keep.to(prev.lm_src.device)].cpu(), sel.values, sel.ordered)
                    for b, sel in enumerate(selections)
                ]
        keep_lists, value_lists = [], []
        for b, sel in enumerate(selections):
            kept, values, out_pos = compose_slots(prev.valid[b], prunable[b], prev.item[b], sel)
            keep_lists.append(kept)
            value_lists.append((values, out_pos))
        layout, gather_index = take(prev, keep_lists)
        refuse_labels(cfg, st, prev, layout, f"at LLM layer {index}")
        if cfg.compact and not cfg.plan.llm_keep_positions:
            layout.positions = compact_positions(layout, first_positions(prev.positions, prev.valid))
        new_hidden = gather_hidden(hidden, gather_index, layout.valid)
        for b, (values, out_pos) in enumerate(value_lists):
            if values is not None:
                pad = layout.length - int(keep_lists[b].numel())
                new_hidden[b, pad + out_pos.to(hidden.device)] = values.to(new_hidden.dtype)
        st.current = layout
    st.seconds[f"llm@{index}"] = seconds[0]
    return new_hidden


def _select(cfg, st, index, layer, hidden, prev: Layout, stage_kw: dict) -> list[Selection]:
    """The policy's per-sample selections before decoder layer `index` (attention recomputed on demand)."""
    normed: dict[str, torch.Tensor] = {}

    def layer_input() -> torch.Tensor:
        if "x" not in normed:
            normed["x"] = layer.input_layernorm(hidden)
        return normed["x"]

    def attention_received(query_mask: torch.Tensor, score_dtype: str = "float32") -> torch.Tensor:
        return decoder_attention_received(
            layer.self_attn,
            layer_input(),
            stage_kw["position_embeddings"],
            query_mask,
            stage_kw["attention_mask"],
            score_dtype=score_dtype,
        )

    def head_mean_keys() -> torch.Tensor:
        return decoder_head_mean_keys(layer.self_attn, layer_input(), stage_kw["position_embeddings"])

    real = hidden[prev.valid.to(hidden.device)]  # [n, D] the real tokens (padding slots are never scored)
    require_finite(real, cfg.policy.name, f"the LLM stage at decoder layer {index}", "hidden states")
    ctx = LLMStageContext(
        index,
        cfg.info,
        hidden,
        prev,
        st.items,
        cfg.keep,
        st.signals,
        attention_received,
        st.sample_keys(),
        head_mean_keys,
        st.item_signals,
        st.layout0,
        st.notes.append,
        cfg.plan.state,
        cfg.adapter.lm.norm,
    )
    with policy_work():
        return cfg.policy.select_llm(ctx)


def replayed_selection(
    layout: Layout, prunable: torch.Tensor, b: int, recorded: torch.Tensor, values, ordered: bool
) -> Selection:
    """The slots of `layout` (sample b) holding the recorded LLM-input slots, in recorded order."""
    slots = (layout.valid[b] & prunable[b]).nonzero().flatten()
    if recorded.numel() == 0:  # the sample kept no prunable token (e.g. it has no image)
        return Selection(slots[:0], values, ordered)
    match = layout.lm_src[b][slots][None, :] == recorded.to(slots.device)[:, None]  # [n_rec, n_slots]
    if not bool(match.any(1).all()):
        raise UnsupportedInputError("replay: a recorded token is missing from this prefill")
    return Selection(slots[match.float().argmax(1)], values, ordered)


def register_signal_hook(adapter, sig: LLMSignal, hook):
    """Install `hook` for LLM signal `sig`: a pre-hook of the decoder layer for 'hidden' (its input, before its
    input norm), else a forward hook of the layer's attention module. Returns the handle."""
    layer = adapter.lm_layers[sig.layer]
    if sig.kind == "hidden":
        return layer.register_forward_pre_hook(hook, with_kwargs=True)
    return layer.self_attn.register_forward_hook(hook, with_kwargs=True)


def capture_llm_signal(cfg: PatchConfig, st: ForwardState, sig: LLMSignal, module, kwargs: dict, args=()) -> None:
    """Forward hook of decoder attention `module` in prefill: LLM signal `sig` from its own q/k into `st.signals`
    (kind 'hidden': pre-hook of the decoder layer `module`, its input kept as is)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if sig.kind == "hidden":
        st.signals[sig.key] = hidden.detach()
        return
    where, what = f"decoder layer {sig.layer}", f"LLM signal {sig.kind!r}"
    with stopwatch(hidden.device) as seconds:
        real = hidden[st.current.valid.to(hidden.device)]  # [n, D] the real tokens
        require_finite(real, cfg.policy.name, where, f"input (hidden states) of the {what}")
        with policy_work():
            mask = kwargs.get("attention_mask")
            if sig.kind == "last_row":  # each sample's last real token (right padding: not the last slot)
                valid = st.current.valid.to(hidden.device)
                last = valid.shape[1] - 1 - valid.flip(1).long().argmax(1)  # [B]
                rows, which = torch.unique(last, return_inverse=True)
                part = decoder_attention_rows(
                    module, hidden, kwargs["position_embeddings"], rows, mask, score_dtype=sig.score_dtype
                )
                scores = part[torch.arange(hidden.shape[0], device=hidden.device), which]
            elif sig.kind == "rows_from_visual":
                layout = st.current
                first = int((layout.visual & layout.valid).float().argmax(1).min())
                rows = torch.arange(first, hidden.shape[1], device=hidden.device)
                part = decoder_attention_rows(
                    module, hidden, kwargs["position_embeddings"], rows, mask, score_dtype=sig.score_dtype
                )
                scores = part.new_zeros(hidden.shape[0], hidden.shape[1], hidden.shape[1])
                scores[:, first:] = part
            elif sig.kind == "key_l1":
                scores = decoder_key_l1(module, hidden, kwargs["position_embeddings"])
            else:
                known = "last_row, rows_from_visual, key_l1, hidden"
                raise TokenzipError(f"unknown LLM signal {sig.kind!r}; known: {known}")
            require_finite(scores, cfg.policy.name, where, what)
        st.signals[sig.key] = scores
    st.seconds["llm_signals"] = st.seconds.get("llm_signals", 0.0) + seconds[0]


def layer_inputs(
    cfg: PatchConfig,
    st: ForwardState,
    index: int,
    layer: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    replaying: Decisions | None,
    decisions: Decisions | None,
):
    """Pre-hook of decoder layer `index`: in prefill, run the layer's stage (if planned) and give the layer the
    arguments of the layout it runs on (a replayed decode edit becomes a mask; a non-causal layer gets a
    bidirectional mask); in decode, the mask / positions of its own cache. Returns (args, kwargs) or None."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if st.phase == "prefill":
        if index in cfg.plan.llm_layers:
            hidden = llm_stage(cfg, st, index, layer, hidden, kwargs, replaying, decisions)
        layout = st.current
        st.layer_layouts[index] = layout
        evict = replaying is not None and index in replaying.decode
        if index in cfg.plan.noncausal_layers:
            if layout is not st.layout0:
                kwargs.update(stage_kwargs(cfg, layout, kwargs, hidden))
            kwargs["attention_mask"] = decode.bidirectional_mask(cfg, layout, hidden.dtype)
            return ((hidden, *args[1:]) if args else args), kwargs
        if layout is st.layout0 and not evict:
            return None
        if layout is not st.layout0:
            kwargs.update(stage_kwargs(cfg, layout, kwargs, hidden))
        if evict:
            kwargs["attention_mask"] = decode.eviction_mask(cfg, replaying, layout, index, hidden.dtype)
            if cfg.renumbers_decode:
                kwargs.update(decode.eviction_positions(cfg, replaying, layout, index, hidden))
    else:
        layout = st.layer_layouts[index]
        if layout is st.layout0:
            return None
        kwargs.update(decode.decode_layer_kwargs(cfg, st, layout, hidden))
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs
