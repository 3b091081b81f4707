"""`random`: keep a uniformly random subset of each image's tokens (seeded, per image).

The control baseline of every stage: `stage="pre_llm"` (default) drops tokens at the LLM input,
`stage="vision"` inside the vision tower before encoder layer `layer` (LLaVA-1.5), `stage="llm"` before
decoder layer `layer` (keep = layer-averaged budget, as FastV), `stage="decode"` evicts visual KV entries of
layers >= `layer` once prefill is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, item_budget, one_stage_count, one_stage_llm_count
from ..contexts import DecodeContext, LLMStageContext, Plan, PreLLMItem, Selection, VisionStageContext
from ..errors import PolicyOptionError
from .base import Choice, Int, Policy
from .common import NEWLINE_MODES, generator, structural_to_keep
from .nominal import Nominal, staged, structural
from .registry import register

STAGES = ("pre_llm", "vision", "llm", "decode")
DEFAULT_LAYER = {"pre_llm": None, "vision": 0, "llm": 2, "decode": 0}


def random_subset(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices of range(n), uniformly at random, ascending."""
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


@register
@dataclass(frozen=True)
class RandomPolicy(Policy):
    """Uniformly random visual tokens per image (seeded by the image or sample), at any stage: the control
    baseline every selector must beat."""

    name = "random"
    description = "Uniformly random tokens per image (seeded); any stage: pre_llm, vision, llm or decode."

    seed: int = Int(0, ge=0, doc="base seed; each image / sample draws from (seed, its key)")
    stage: str = Choice("pre_llm", STAGES, doc="where tokens are dropped")
    layer: int | None = Int(
        None,
        ge=0,
        none=True,
        doc="vision layer (stage='vision'), decoder layer ('llm', >= 1) or first edited KV layer ('decode'); "
        "None = 0 / 2 / 0; not used by 'pre_llm'",
    )
    newlines: str = Choice("keep_nonempty_rows", NEWLINE_MODES, doc="OneVision per-row newlines (stage='pre_llm')")

    def validate(self) -> None:
        stage, layer = self.stage, self.layer
        if stage == "pre_llm" and layer is not None:
            raise PolicyOptionError(
                f"random: layer={layer!r} is not used with stage='pre_llm'; leave layer=None or choose stage "
                "'vision', 'llm' or 'decode'"
            )
        if stage == "llm" and layer == 0:
            raise PolicyOptionError("random: stage='llm' needs layer >= 1 (decoder layer 0 sees every token)")
        if stage != "pre_llm" and self.newlines != self.option_defaults()["newlines"]:
            raise PolicyOptionError(
                f"random: newlines={self.newlines!r} is only used with stage='pre_llm' (stage={stage!r} "
                "keeps the structural tokens); drop the option"
            )

    @property
    def stage_layer(self) -> int | None:
        """`layer`, or the stage's default when None."""
        return DEFAULT_LAYER[self.stage] if self.layer is None else self.layer

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        stage = self.stage
        if stage == "pre_llm":
            return Plan(pre_llm=True)
        if stage == "vision":
            return Plan(vision_layer=self.stage_layer)
        if stage == "llm":
            return Plan(llm_layers=(self.stage_layer,))
        return Plan(decode=True)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Exact counts; newlines assumed kept in every row ('keep_nonempty_rows')."""
        stage, n_layers = self.stage, info.n_llm_layers
        n, budget = shape.n_content, item_budget(keep, shape.n_content)
        other = shape.length - shape.n_content
        if stage == "pre_llm":
            return Nominal([budget + structural(shape, self.newlines)] * n_layers)
        if stage == "vision":
            width = 1 + budget  # CLS + kept patches
            widths = [1 + n] * self.stage_layer + [width] * (info.n_vision_layers - self.stage_layer)
            return Nominal([budget + other] * n_layers, vision_widths=widths)
        if stage == "llm":
            kept = min(n, max(1, round(one_stage_llm_count(budget, n, self.stage_layer, n_layers))))
            return Nominal(staged(n, [kept], (self.stage_layer,), n_layers, other))
        cache = [shape.length] * self.stage_layer + [budget + other] * (n_layers - self.stage_layer)
        return Nominal([shape.length] * n_layers, cache)

    def select_vision(self, ctx: VisionStageContext) -> list[torch.Tensor]:
        n = ctx.n_patches
        k = item_budget(ctx.keep, n)
        return [random_subset(n, k, generator(self.seed, key)) for key in ctx.row_keys]

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        content = ctx.content_available
        gen = generator(self.seed, ctx.item.index_in_sample)
        kept = content[random_subset(content.numel(), ctx.budget, gen)]
        extra = structural_to_keep(ctx.item.shape, kept, self.newlines)
        extra = extra[torch.isin(extra, ctx.available)]
        return Selection(torch.cat([kept, extra]))

    def _sample_choice(self, slots: torch.Tensor, count: int, key: int) -> Selection:
        pick = random_subset(slots.numel(), count, generator(self.seed, key))
        return Selection(slots[pick.to(slots.device)])

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        out = []
        layout = ctx.layout
        for b, target in enumerate(ctx.item_targets()):
            slots = layout.visual_slots(b)
            n = slots.numel()
            if n == 0:  # a sample without visual tokens (e.g. no image in its prompt) passes through
                out.append(Selection(slots))
                continue
            sizes = [it.shape.n_content for it in ctx.items.per_sample[b]]
            count = one_stage_count("random", target, n, ctx.layer, ctx.info.n_llm_layers, ctx.keep, sizes)
            out.append(self._sample_choice(slots, count, ctx.sample_keys[b]))
        return out

    def select_decode(self, ctx: DecodeContext) -> dict[int, list[Selection]]:
        edits: dict[int, list[Selection]] = {}
        for layer in range(self.stage_layer, ctx.info.n_llm_layers):
            layout = ctx.layer_layouts[layer]
            per_sample = []
            for b, items in enumerate(ctx.items.per_sample):
                slots = layout.visual_slots(b)
                target = sum(item_budget(ctx.keep, it.shape.n_content) for it in items)
                per_sample.append(self._sample_choice(slots, min(slots.numel(), target), ctx.sample_keys[b]))
            edits[layer] = per_sample
        return edits
