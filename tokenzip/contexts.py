"""What a policy sees at each stage, and what it returns.

Policies never touch modules, hooks or caches: the engine builds these contexts (tensors plus lazily
computed attention signals) and applies the `Selection`s a policy returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters.base import ModelInfo
from .budget import Keep, item_budget
from .engine.layout import Layout
from .items import ItemsOfBatch, VisualItem


@dataclass
class Selection:
    """Tokens a policy keeps out of a candidate set.

    keep:    LongTensor [n] indices into the candidates (item-local token indices for `pre_llm`, slot indices
             of the current layout for `llm`). With `ordered=False` the engine sorts them (sequence order).
    values:  optional [n, D] replacement values for the kept tokens (merges: a kept token stands for a group
             and carries its merged value; it keeps its own position).
    padding: the last `padding` entries are zero rows standing in for missing tokens (HoloV's official
             shortfall); they enter the LLM but are reported separately from real tokens.
    offset:  pre_llm only, <= 0: `keep` indexes the window [start + offset, start + offset + length) instead of
             the item's run; the |offset| text tokens before the run become selectable and the last |offset|
             tokens of the run are always kept after the window (reproduces a released off-by-one window).
    annotations: pre_llm only, optional float [n] per kept token, available to later stages as
             `layout.annotation` (NaN for tokens without one).
    groups:  optional LongTensor [2, m] of merges, in the same index space as `keep`: column j says candidate
             groups[0, j] was merged into the kept candidate groups[1, j] (for statistics and `tokenzip.viz`;
             the merged value itself is in `values`).
    """

    keep: torch.Tensor
    values: torch.Tensor | None = None
    ordered: bool = False
    padding: int = 0
    offset: int = 0
    annotations: torch.Tensor | None = None
    groups: torch.Tensor | None = None


@dataclass(frozen=True)
class VisionSignal:
    """A per-token signal from vision layer `layer`, computed from that layer's attention input:

    'received': mean attention received, over heads and over the queries of the token's attention segment;
    'cls':      the CLS query's attention row, mean over heads (CLIP only);
    'keys':     the layer's key vectors averaged over heads (before the 2-D RoPE on Qwen2.5-VL): [*, head_dim].

    Policies receive them mapped onto each item's LLM tokens (`PreLLMItem.signals`), or per tower row
    (`ProjectorInputContext.signals`). `score_dtype` ("float32" or "model", see `tokenzip.signals.attention`)
    sets the numerics of the attention kinds; 'keys' are always head-means in float32.
    """

    kind: str
    layer: int
    score_dtype: str = "float32"

    @property
    def key(self) -> str:
        suffix = "" if self.score_dtype == "float32" or self.kind == "keys" else f":{self.score_dtype}"
        return f"vision.{self.kind}@{self.layer}{suffix}"


@dataclass(frozen=True)
class LLMSignal:
    """Attention captured at decoder layer `layer` during prefill (from that layer's own q/k):

    'last_row':         [B, L] head-mean attention of each sample's last token over all slots (FastV);
    'rows_from_visual': [B, L, L] head-mean attention of every query row from the batch's first visual slot on
                        (earlier rows are 0), computed in row chunks (MustDrop's text rows, ATP's rows).
    'key_l1':           [B, L] L1 norm of each slot's post-RoPE key, all KV heads concatenated (DART's pivots;
                        float32, `score_dtype` unused).
    'hidden':           [B, L, D] the hidden states entering decoder layer `layer` (before its input norm; at layer
                        0 the LLM input embeddings, SparseVLM's raters), in the layout that layer runs on.

    `score_dtype`: "float32" or "model" (see `tokenzip.signals.attention`).
    """

    kind: str
    layer: int
    score_dtype: str = "float32"

    @property
    def key(self) -> str:
        suffix = "" if self.score_dtype == "float32" else f":{self.score_dtype}"
        return f"llm.{self.kind}@{self.layer}{suffix}"


@dataclass(frozen=True)
class Plan:
    """Which stages a policy uses on one model, and which signals it needs.

    vision_layer: prune inside the vision tower before this encoder layer (families with
                  `supports_vision_stage`); projector_input: select / merge the feature layer's output (CLS
                  included) before the projector (LLaVA-1.5); pre_llm: select at the LLM input; llm_layers:
                  select before these decoder layers during prefill; decode: edit the KV cache once after
                  prefill.
    llm_structural: in-LLM stages may also select among items' structural tokens (newlines); else those are
                  always kept. llm_keep_positions: in-LLM stages keep the current position ids even with
                  positions="compact" (HoliTom's inner merge). noncausal_layers: decoder layers that attend
                  bidirectionally in prefill (reproduces a released quirk; parity only).
    state: what the policy derived for this model (layers, signal keys, compat mode...), any object; the engine
                  hands it back unchanged to every stage as `ctx.state` (a policy keeps no per-model state).
    """

    vision_layer: int | None = None
    projector_input: bool = False
    pre_llm: bool = False
    llm_layers: tuple[int, ...] = ()
    decode: bool = False
    vision_signals: tuple[VisionSignal, ...] = ()
    llm_signals: tuple[LLMSignal, ...] = ()
    llm_structural: bool = False
    llm_keep_positions: bool = False
    noncausal_layers: tuple[int, ...] = ()
    state: Any = field(default=None, compare=False)

    @property
    def is_empty(self) -> bool:
        return (
            self.vision_layer is None
            and not self.projector_input
            and not self.pre_llm
            and not self.llm_layers
            and not self.decode
        )


@dataclass
class VisionStageContext:
    """Input of a vision-tower stage: the hidden states entering encoder layer `layer`.

    hidden_states: [R, T, D] (one row per image; CLS at index 0 when `has_cls`).
    row_keys:      one int per row derived from the row's pixels (stable across batch compositions), for
                   seeding per-image randomness.
    """

    layer: int
    hidden_states: torch.Tensor
    has_cls: bool
    keep: Keep
    row_keys: list[int]
    info: ModelInfo | None = None
    state: Any = None  # the policy's `Plan.state` for this model

    @property
    def n_patches(self) -> int:
        return self.hidden_states.shape[1] - int(self.has_cls)


@dataclass
class ProjectorInputContext:
    """The vision feature layer's output before the projector (one row per image), CLS at index 0.

    hidden:  [R, T, D_vision] (T = 1 + patches for CLIP); signals: key -> raw per-row signals [R, T, *C].
    A policy returns one `Selection` per row over the T tokens (values in vision space); the engine projects
    the selected values and hands them to the LLM in that order, each standing at the position of its token
    (CLS stands at the first patch).
    """

    hidden: torch.Tensor
    signals: dict[str, torch.Tensor]
    keep: Keep
    row_keys: list[int]
    has_cls: bool
    info: ModelInfo | None = None
    state: Any = None  # the policy's `Plan.state` for this model

    @property
    def n_patches(self) -> int:
        return self.hidden.shape[1] - int(self.has_cls)


@dataclass
class PreLLMItem:
    """One image / video at the LLM input.

    embeds:    [length, D] the item's token embeddings (projector outputs, newline embeddings).
    available: LongTensor [n] item-local indices that reached the LLM input, in the order they arrive (all
               tokens in sequence order unless a vision stage pruned or reordered some).
    signals:   name -> float [length] vision scores mapped to the item's tokens (NaN at structural tokens).
    """

    item: VisualItem
    embeds: torch.Tensor
    available: torch.Tensor
    keep: Keep
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    before: torch.Tensor | None = None  # [D] embedding of the token just before the item's run, if any
    batch: ItemsOfBatch | None = None  # every item of the forward call, per sample (the oracle checks its truth)
    info: ModelInfo | None = None
    state: Any = None  # the policy's `Plan.state` for this model

    @property
    def content_available(self) -> torch.Tensor:
        """Item-local indices of available content (grid) tokens."""
        mask = self.item.shape.content_mask().to(self.available.device)
        return self.available[mask[self.available]]

    @property
    def budget(self) -> int:
        """Content tokens to keep under `keep` (counted on the item's full grid, capped by what is available)."""
        return min(item_budget(self.keep, self.item.shape.n_content), int(self.content_available.numel()))


@dataclass
class LLMStageContext:
    """Input of an in-LLM stage: the hidden states entering decoder layer `layer` during prefill.

    `attention_received(query_mask [B, L], score_dtype="float32")` recomputes, from this layer's own q/k, the
    mean attention each slot receives from the selected queries ([B, L]; `score_dtype` as in
    `tokenzip.signals.attention`); `head_mean_keys()` gives this layer's post-RoPE keys
    averaged over heads ([B, L, head_dim]). `signals` holds captured LLM signals by key; `item_signals[(b, j)]`
    the vision signals of sample b's item j mapped onto the item's tokens (as `PreLLMItem.signals`);
    `input_layout` the layout at the LLM input; `note(text)` records a remark in `patch.stats`.
    `sample_keys`: one int per sample derived from its prompt tokens (stable across batch compositions).
    `final_norm(x)`: the LLM's final norm (the one before the LM head) applied to x [B, L, D].
    """

    layer: int
    info: ModelInfo
    hidden_states: torch.Tensor
    layout: Layout
    items: ItemsOfBatch
    keep: Keep
    signals: dict[str, torch.Tensor]
    attention_received: Callable[..., torch.Tensor]
    sample_keys: list[int] = field(default_factory=list)
    head_mean_keys: Callable[[], torch.Tensor] | None = None
    item_signals: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    input_layout: Layout | None = None
    note: Callable[[str], None] = print
    state: Any = None  # the policy's `Plan.state` for this model
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None

    def item_targets(self) -> list[int]:
        """Per sample: the layer-averaged visual budget, the sum of `item_budget` over its items."""
        return [sum(item_budget(self.keep, it.shape.n_content) for it in items) for items in self.items.per_sample]

    def item_totals(self) -> list[int]:
        """Per sample: visual content tokens entering the LLM."""
        return [sum(it.shape.n_content for it in items) for items in self.items.per_sample]


@dataclass
class DecodeContext:
    """State after prefill: the layout each decoder layer's KV cache holds."""

    info: ModelInfo
    layer_layouts: list[Layout]
    items: ItemsOfBatch
    keep: Keep
    sample_keys: list[int] = field(default_factory=list)
    stage_layers: tuple[int, ...] = ()
    state: Any = None  # the policy's `Plan.state` for this model
