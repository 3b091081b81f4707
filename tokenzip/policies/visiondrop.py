"""VisionDrop (arXiv 2506.22283, AAAI 2026; official code Ruixxxx/VisionDrop @ f7a9444), training-free.

Progressive dominant selection + contextual merging at four stages: stage 1 on the vision output, stages 2-4
before decoder layers b1, b2, b3 (default round(k L / 4): 8, 16, 24 of 32). At each stage the d highest-scoring
tokens are kept in order (dominant) and the rest are merged into c "contextual" tokens: c targets spaced
evenly through the remaining tokens, every other remaining token assigned to its most similar target (cosine
of head-mean keys), contextual value = target + mean(assigned). Output per image: [dominant, contextual].

Scores: stage 1 = the CLS query's attention row at the feature layer (LLaVA-1.5) or the mean attention
received at the last / feature layer (Qwen2.5-VL, OneVision); LLM stages = the mean attention the image's
tokens receive from the image's own tokens, recomputed from the stage layer's q/k (causal, full-row softmax).

`keep` is the layer-averaged budget K: stage 1 keeps E = min(round(encoder_factor K), N) (factor 1.5 for
images, 3.0 for video), later stages decay geometrically so that the layer average is exactly K
(`visiondrop_schedule`). Each stage splits its count n into c = min(ceil(n / 8), n - 1) contextual and
d = n - c dominant tokens. On LLaVA-1.5 stage 1 works in CLIP space before the projector and feeds the CLS
token to the LLM (official; `include_cls=False` drops it); positions are compacted at every stage (official
LLaVA), decode positions follow each layer's measured prefill length; `stage1_space="post_projector"` runs
stage 1 on projector outputs instead (no CLS; an approximation, the projector being non-linear). Qwen2.5-VL
keeps original M-RoPE
positions (a contextual token stands at its target's position); OneVision drops newline tokens at stage 1
(a video's trailing newline is kept) and compacts positions.

`score_dtype="float32"` (default) scores in float32; `"model"` reproduces the official numerics on fp16 / bf16
models (attention logits, probabilities and head means rounded to the model dtype: the official LLM stages cast
the float32 softmax back to fp16 before averaging; see `tokenzip.signals.attention`). Similarity metrics (head-mean
keys) stay float32 in both modes. `compat="official"` sets include_cls=True and score_dtype="model",
`compat="fixed"` include_cls=False and score_dtype="float32" (explicit options win; None = include_cls=True,
score_dtype="float32"). Official quirks NOT reproduced under either mode, because each is a crash or a
cache-inconsistent result rather than a scoring choice: decode positions shifted by the scheduled rather than the
measured counts (identical whenever a stage keeps its scheduled count; otherwise the official positions disagree
with the KV cache), the attention mask rebuilt at the original length (works only for an all-ones mask, fails
otherwise), and the batch-size-1 / right-padding asserts. Merged values are differentiable (`tokenzip.ops.grad`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, geometric_schedule, item_budget
from ..contexts import LLMStageContext, Plan, PreLLMItem, ProjectorInputContext, Selection, VisionSignal
from ..errors import PolicyOptionError
from ..ops.grad import differentiable_values
from ..ops.topk import topk_stable
from .base import Choice, Float, Int, Policy, Tuple
from .contextual import dominant_contextual_item, dominant_contextual_rows, merge_contextual
from .nominal import Nominal, staged
from .registry import register


def stage_split(count: int, ctx_div: int = 8) -> tuple[int, int]:
    """(dominant, contextual) for a stage keeping `count` tokens: c = min(ceil(count / ctx_div), count - 1)."""
    contextual = max(0, min(math.ceil(count / ctx_div), count - 1))
    return count - contextual, contextual


def default_boundaries(n_layers: int) -> tuple[int, int, int]:
    """The three decoder layers whose input is reduced: round(k * L / 4), k = 1, 2, 3 (8, 16, 24 of 32)."""
    return tuple(round(k * n_layers / 4) for k in (1, 2, 3))


def visiondrop_schedule(
    target: float,
    n_stage1: int,
    n_layers: int,
    boundaries: tuple[int, int, int],
    encoder_factor: float = 1.5,
    decay: float | None = None,
) -> list[int]:
    """Visual tokens kept by each of the four stages so that the layer average equals `target`.

    E = min(round(encoder_factor * target), n_stage1) enters the LLM; with block sizes w_k (layers 0..b1-1,
    b1..b2-1, b2..b3-1, b3..L-1) the decay lambda solves sum_k w_k E lambda^k = L target (lambda = 1 when E <=
    target), n_1 = round(E lambda), n_2 = round(E lambda^2), and n_3 absorbs the rounding so the average is
    exact; counts are >= 1 and non-increasing. With an explicit `decay`, n_k = round(E decay^k).
    """
    e = min(max(1, round(encoder_factor * target)), n_stage1)
    edges = (0, *boundaries, n_layers)
    w = [edges[k + 1] - edges[k] for k in range(4)]
    if decay is None:
        return [e, *geometric_schedule(n_layers * target, e, w, floor=1, solve_floor=0)]
    n1, n2, n3 = (round(e * decay**k) for k in (1, 2, 3))
    counts = [e, n1, n2, n3]
    for k in range(1, 4):
        counts[k] = max(1, min(counts[k], counts[k - 1]))
    return counts


@dataclass(frozen=True)
class VisionDropState:
    """What `VisionDropPolicy.plan` derives for one model."""

    score: VisionSignal  # dominant-token scores of stage 1
    metric: VisionSignal  # key vectors for contextual merging in stage 1
    bounds: tuple[int, ...]  # decoder layers of stages 2-4
    n_llm_layers: int
    score_dtype: str  # numerics of the in-LLM attention scores
    pre_projector: bool = False  # LLaVA-1.5: stage 1 in CLIP space (official) rather than on projector outputs
    cls_in_stage1: bool = False  # LLaVA-1.5 pre-projector stage 1 feeds CLS to the LLM


@register
@dataclass(frozen=True)
class VisionDropPolicy(Policy):
    """VisionDrop: dominant tokens by attention plus contextual tokens merged by key similarity, at the vision
    output and again before three decoder layers (see the module docstring per family)."""

    name = "visiondrop"
    description = "VisionDrop: dominant selection + contextual merging on the vision output and at 3 LLM layers."

    encoder_factor: float | None = Float(
        None, gt=0, none=True, doc="stage-1 count E = factor x K (None: 1.5 for images, 3.0 for video)"
    )
    decay: float | None = Float(
        None, gt=0, le=1, none=True, doc="explicit per-stage decay (None: solved for the budget)"
    )
    ctx_div: int = Int(8, ge=1, doc="contextual tokens per stage = ceil(n / ctx_div)")
    boundaries: tuple[int, ...] | None = Tuple(
        None, Int(1, ge=1), length=3, increasing=True, none=True, doc="decoder layers of stages 2-4"
    )
    include_cls: bool | None = Choice(
        None, (None, True, False), doc="LLaVA-1.5 pre-projector stage 1: feed CLS to the LLM (None: from compat)"
    )
    stage1_space: str = Choice("pre_projector", ("pre_projector", "post_projector"), doc="LLaVA-1.5 stage 1")
    score_dtype: str | None = Choice(
        None, (None, "float32", "model"), doc="scoring numerics (None: from compat; 'float32' by default)"
    )
    compat: str | None = Choice(
        None,
        (None, "official", "fixed"),
        doc="official: include_cls=True, score_dtype='model'; fixed: include_cls=False, score_dtype='float32'",
    )

    def validate(self) -> None:
        if self.include_cls is not None and self.stage1_space == "post_projector":
            raise PolicyOptionError(
                "visiondrop: include_cls applies only to stage1_space='pre_projector' (the CLIP-space stage 1 of "
                "LLaVA-1.5); post-projector stage 1 has no CLS token"
            )

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        bounds = tuple(self.boundaries or default_boundaries(info.n_llm_layers))
        if bounds[-1] >= info.n_llm_layers:
            raise PolicyOptionError(f"visiondrop: boundaries {bounds} exceed the LLM's {info.n_llm_layers} layers")
        # the scoring numerics: the option, else per compat ("model" under "official")
        dtype = self.score_dtype or ("model" if self.compat == "official" else "float32")
        if info.supports_projector_stage and info.vision_has_cls:  # CLIP + projector-input stage (LLaVA-1.5)
            layer = info.vision_feature_layer
            pre_projector = self.stage1_space == "pre_projector"
            # CLS enters the LLM (LLaVA-1.5 pre-projector stage 1): the option, else per compat (default True)
            include_cls = self.include_cls if self.include_cls is not None else self.compat != "fixed"
            state = VisionDropState(
                VisionSignal("cls", layer, dtype),
                VisionSignal("keys", layer),
                bounds,
                info.n_llm_layers,
                dtype,
                pre_projector,
                pre_projector and include_cls,
            )
            stage1 = {"projector_input": True} if pre_projector else {"pre_llm": True}
            return Plan(llm_layers=bounds, vision_signals=(state.score, state.metric), state=state, **stage1)
        if self.include_cls is not None:
            raise PolicyOptionError(
                "visiondrop: include_cls applies only to LLaVA-1.5 (CLIP with CLS and a projector-input stage); "
                f"{info.family} has no CLS token in its LLM input"
            )
        layer = info.vision_feature_layer
        state = VisionDropState(
            VisionSignal("received", layer, dtype), VisionSignal("keys", layer), bounds, info.n_llm_layers, dtype
        )
        return Plan(pre_llm=True, llm_layers=bounds, vision_signals=(state.score, state.metric), state=state)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Exact stage counts; LLaVA's stage 1 includes CLS; a video's trailing newline stays."""
        state: VisionDropState = self.plan(info, keep).state
        video = shape.modality == "video"
        n_stage1 = shape.n_content + int(state.cls_in_stage1)
        counts = self._counts(state, keep, shape.n_content, n_stage1, video)
        return Nominal(staged(counts[0], counts[1:], state.bounds, info.n_llm_layers, shape.trailing))

    def default_positions(self, info: ModelInfo) -> str:
        return "compact" if info.supports_compact_positions else "original"

    def _counts(self, state: VisionDropState, keep: Keep, n_content: int, n_stage1: int, video: bool) -> list[int]:
        factor = self.encoder_factor or (3.0 if video else 1.5)
        target = item_budget(keep, n_content)
        return visiondrop_schedule(target, n_stage1, state.n_llm_layers, state.bounds, factor, self.decay)

    # ---------------------------------------------------------------------------------- stage 1, LLaVA-1.5
    @differentiable_values()  # merged values keep their autograd graph; selection inputs carry none
    def select_projector_input(self, ctx: ProjectorInputContext) -> list[Selection]:
        state: VisionDropState = ctx.state
        include_cls = state.cls_in_stage1
        n_patches = ctx.n_patches
        count = self._counts(state, ctx.keep, n_patches, n_patches + int(include_cls), False)[0]
        dom_count, ctx_count = stage_split(count, self.ctx_div)
        return dominant_contextual_rows(ctx, state.score.key, state.metric.key, dom_count, ctx_count, include_cls)

    # ---------------------------------------------------------------------------------- stage 1, others
    @differentiable_values()  # merged values keep their autograd graph; selection inputs carry none
    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        state: VisionDropState = ctx.state
        shape = ctx.item.shape
        video = ctx.item.modality == "video"
        count = self._counts(state, ctx.keep, shape.n_content, ctx.content_available.numel(), video)[0]
        dom_count, ctx_count = stage_split(count, self.ctx_div)
        return dominant_contextual_item(ctx, state.score.key, state.metric.key, dom_count, ctx_count)

    # ---------------------------------------------------------------------------------- LLM stages
    @differentiable_values()  # merged values keep their autograd graph; selection inputs carry none
    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        state: VisionDropState = ctx.state
        stage = state.bounds.index(ctx.layer) + 1
        layout = ctx.layout
        hidden = ctx.hidden_states
        with torch.no_grad():
            keys = ctx.head_mean_keys()
        n_items = max((len(items) for items in ctx.items.per_sample), default=0)
        per_sample: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(layout.batch)]
        for j in range(n_items):
            query = layout.valid & layout.visual & (layout.item == j)
            if not bool(query.any()):
                continue
            with torch.no_grad():
                received = ctx.attention_received(query, state.score_dtype)
            for b, items in enumerate(ctx.items.per_sample):
                if j >= len(items):
                    continue
                slots = query[b].nonzero().flatten()
                item = items[j]
                video = item.modality == "video"
                n_stage1 = item.shape.n_content + int(state.cls_in_stage1)
                count = self._counts(state, ctx.keep, item.shape.n_content, n_stage1, video)[stage]
                if slots.numel() <= count:
                    per_sample[b].append((slots, hidden[b, slots]))
                    continue
                dom_count, ctx_count = stage_split(count, self.ctx_div)
                dominant = topk_stable(received[b, slots], dom_count)
                reps, values = merge_contextual(hidden[b, slots], keys[b, slots], dominant, ctx_count)
                per_sample[b].append((slots[reps], values))
        out = []
        for parts in per_sample:
            if not parts:  # a text-only sample in a batch with images
                out.append(Selection(torch.zeros(0, dtype=torch.long)))
                continue
            out.append(Selection(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), ordered=True))
        return out
