"""Per-forward runtime state and the statistics a patch records."""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..items import ItemShape, ItemsOfBatch
from .layout import Layout

if TYPE_CHECKING:
    from ..contexts import Selection
    from .summary import SampleSummary


@dataclass
class VisionCall:
    """One call of a feature function (`get_image_features` / `get_video_features`).

    signals: key -> raw scores of the call ([R, T] per vision row with NaN at pruned slots, or [N] packed).
    available: per item, the item-local token indices that survived a vision stage (None: all).
    """

    modality: str
    arguments: dict[str, Any]
    shapes: list[ItemShape]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    available: list[torch.Tensor] | None = None
    vision_groups: list[torch.Tensor | None] | None = None  # per item: merges [2, m] of a vision stage, item-local
    seconds: float = 0.0  # policy work inside the call (signals, vision / projector-input stages)
    call_seconds: float = 0.0  # the whole call
    kept_rows: list[Selection] | None = None  # vision-stage `Selection` per tower row (for replay)
    projector_rows: list[Any] | None = None  # projector-input `Selection` per tower row (for replay)
    overrides: list[Any] | None = None  # per item: `Selection` replacing its tokens (projector-input stage)
    workload: dict | None = None  # what the vision side computed (FLOP accounting)
    output_ref: Any = None  # weakref to the call's output (generate() without a cache passes it to every step)


@dataclass
class VisionStageState:
    """Inside one feature call: what the vision stage did to the tower's rows (right-padded)."""

    slots: torch.Tensor  # LongTensor [R, W] original token index (CLS = 0) of each kept slot
    valid: torch.Tensor  # BoolTensor [R, W]
    mask: Any  # attention mask passed to the later encoder layers (None if no padding)
    full_length: int  # tokens per row before the stage


@dataclass
class CallCapture:
    """Collected while a feature function runs."""

    modality: str
    arguments: tuple[tuple, dict]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    stage: VisionStageState | None = None
    seconds: float = 0.0  # policy work inside the call
    call_seconds: float = 0.0  # the whole call
    kept_rows: list[Selection] | None = None  # vision-stage `Selection` per tower row (for replay)
    projector_rows: list[Any] | None = None  # projector-input decision per row (for replay)
    feature_out: torch.Tensor | None = None  # output of the vision feature layer (projector-input stage)
    projected_reps: list[torch.Tensor] | None = None  # per row: tower token each projected token stands for
    projector_shape: tuple[int, int] | None = None
    projected: list[torch.Tensor] | None = None  # per row: projected tokens [n, D]


@dataclass
class ForwardState:
    """Everything tokenzip tracks between the prefill of a prompt and its last decode step."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    user_positions: bool
    labels: bool = False  # the forward got `labels` (its sequence must not be shortened)
    right_padded: bool = False  # the LLM input has padding after a sample's tokens (its output is re-laid so)
    serial: int = -1  # process-wide number of this prefill (the KV cache it fills is tagged with it)
    phase: str = "prefill"
    active: bool = False
    items: ItemsOfBatch = field(default_factory=ItemsOfBatch)
    orig_len: int = 0
    orig_last_pos: torch.Tensor | None = None  # [B] row-0 position of each sample's last prompt token
    rebuilt: bool = False
    layout0: Layout | None = None
    current: Layout | None = None
    layer_layouts: list[Layout] = field(default_factory=list)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    item_signals: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    decoded: int = 0  # tokens appended to the cache since prefill (read from the cache at each decode step)
    tail: torch.Tensor | None = None  # BoolTensor [B, decoded] validity of tokens appended after prefill
    lm_positions: torch.Tensor | None = None  # [R, B, q] original-frame positions of this decode step
    seconds: dict[str, float] = field(default_factory=dict)
    item_kept: list[list[tuple]] = field(default_factory=list)  # per item: `runtime._kept_record`
    notes: list[str] = field(default_factory=list)
    calls: list[VisionCall] = field(default_factory=list)
    step_cache: dict = field(default_factory=dict)

    def sample_keys(self) -> list[int]:
        """One stable int per sample (seeds per-sample randomness): a checksum of its real prompt tokens once the
        prompt's items are laid out, else the sample's index."""
        ids = self.input_ids.detach().cpu()
        keys = []
        for b in range(ids.shape[0]):
            row = ids[b]
            if isinstance(self.attention_mask, torch.Tensor):
                row = row[self.attention_mask[b].bool().cpu()]
            keys.append(zlib.crc32(row.numpy().tobytes()) if self.layout0 is not None else b)
        return keys

    def shift(self, layout: Layout) -> torch.Tensor:
        """LongTensor [B]: per sample, the original-frame next position minus `layout`'s (0 unless compact)."""
        return self.orig_last_pos - layout.positions[0, :, -1]


@dataclass
class ItemRecord:
    """One image / video of one sample after a prefill."""

    modality: str
    tokens: int  # placeholder tokens (structural included)
    content: int  # grid tokens (what keep is counted on)
    kept: int  # real content tokens entering the LLM
    kept_indices: torch.Tensor  # item-local indices of the real tokens entering the LLM, in sequence order
    padded: int = 0  # zero rows a policy appended in place of missing tokens (they enter the LLM too)
    shape: ItemShape | None = None  # the item's token layout (grid parts, newlines)
    groups: torch.Tensor | None = None  # [2, m] item-local (merged token, kept token it joined) before the LLM
    stages: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (stage name, item-local indices of
    # the visual content tokens present after it), one entry per stage that changed the set: 'vision' (tower-side
    # pruning), 'LLM input', then 'layer k' for each decoder layer whose input holds fewer of the item's tokens


@dataclass
class SampleRecord:
    items: list[ItemRecord]
    visual_per_layer: list[int]  # visual content tokens each decoder layer processed in prefill
    sequence_per_layer: list[int]  # real (non-padding) tokens each decoder layer processed in prefill
    cache_per_layer: list[int]  # real KV entries each layer holds after prefill (after decode-stage edits)
    budget: int | None = None  # layer-average budget: sum over items of `item_budget(keep, content)`
    prompt_tokens: int | None = None  # real prompt tokens before compression (what the unpatched model processes)

    @property
    def visual_in(self) -> int:
        """Visual content tokens of the sample's items before compression."""
        return sum(it.content for it in self.items)

    @property
    def visual_llm_input(self) -> int:
        """Visual tokens entering the LLM: the kept content tokens and any zero rows a policy padded in."""
        return sum(it.kept + it.padded for it in self.items)

    @property
    def on_budget(self) -> bool | None:
        """Whether the layer average meets `budget` within one token per item (None without a budget)."""
        if self.budget is None:
            return None
        return abs(self.visual_mean - self.budget) <= len(self.items)

    @property
    def visual_mean(self) -> float:
        """Layer-averaged visual tokens (the quantity `keep` budgets)."""
        return sum(self.visual_per_layer) / max(1, len(self.visual_per_layer))

    @property
    def visual_mean_logged(self) -> float:
        """Layer average as FastV/SparseVLM-style logs count it (MustDrop's official log): a layer after which a
        prune happens is counted with the pruned set, i.e. layer i with the tokens of layer i + 1 (the last layer
        with its own). Never above `visual_mean`; the gap is what such logs under-report."""
        per_layer = self.visual_per_layer
        if not per_layer:
            return 0.0
        return (sum(per_layer[1:]) + per_layer[-1]) / len(per_layer)


@dataclass
class ForwardRecord:
    """Statistics of one prefill (a `model(...)` call or the first step of `generate`)."""

    policy: str
    keep: Any
    samples: list[SampleRecord]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    width_per_layer: list[int] = field(default_factory=list)  # padded tokens each layer processed (batch)
    cache_width_per_layer: list[int] = field(default_factory=list)  # padded KV entries per layer after prefill
    vision: list[dict] = field(default_factory=list)  # vision workload per feature call
    config: Any = field(default=None, repr=False, compare=False)  # the model's config (analytic FLOPs)

    def summary(self) -> list[SampleSummary]:
        """Per sample, what this prefill saved (`tokenzip.engine.summary.SampleSummary`, the same fields for every
        policy): visual tokens in / into the LLM / layer mean vs budget, prefill FLOPs as run and unpruned, and
        the policy's selection time. The repr prints it as a table."""
        from .summary import summarize

        return summarize(self)

    @property
    def selection_s(self) -> float:
        """Seconds of all policy work in this prefill (everything but the vision encoder's own time)."""
        from .summary import selection_stages

        return sum(selection_stages(self.seconds).values())

    @property
    def selection_stages_s(self) -> dict[str, float]:
        """`selection_s` per stage: vision, pre_llm, llm, decode, other (always all five keys)."""
        from .summary import selection_stages

        return selection_stages(self.seconds)

    def __repr__(self) -> str:
        from .summary import format_record

        return format_record(self)


class PatchStats:
    """Records of the most recent prefills of a patched model (`history`, newest last)."""

    def __init__(self, maxlen: int = 256) -> None:
        self.history: deque[ForwardRecord] = deque(maxlen=maxlen)

    @property
    def last(self) -> ForwardRecord | None:
        return self.history[-1] if self.history else None

    def clear(self) -> None:
        self.history.clear()

    def __len__(self) -> int:
        return len(self.history)

    def __repr__(self) -> str:
        return f"PatchStats({len(self.history)} forwards); last:\n{self.last!r}"


@dataclass
class Decisions:
    """Every selection of one prefill, in prompt coordinates, so a later prefill can replay it.

    vision:  modality -> per feature call -> per tower row, the vision-stage `Selection` (patch indices, CLS
             excluded: it always stays first).
    projector: modality -> per feature call -> per tower row, the projector-input `Selection`.
    pre_llm: per sample -> per item, the `Selection` (item-local indices).
    llm:     layer -> per sample (kept LLM-input slots of visual tokens [n], values or None, ordered).
    decode:  layer -> per sample, LLM-input slots of the visual tokens kept in that layer's cache.

    LLM-input slots (the layout after the pre-LLM stage) are unique per token and unchanged when a prompt is
    extended at its end, so they identify tokens across the recorded and the replaying prefill.
    """

    batch: int
    prompt_len: int
    vision: dict[str, list[list[Selection]]] = field(default_factory=dict)
    projector: dict[str, list[list[Any]]] = field(default_factory=dict)
    pre_llm: list[list[Any]] | None = None
    llm: dict[int, list[tuple[torch.Tensor, torch.Tensor | None, bool]]] = field(default_factory=dict)
    decode: dict[int, list[torch.Tensor]] = field(default_factory=dict)
