"""`random`: keep a uniformly random subset of each image's tokens (seeded, per image).

The control baseline of every stage: `stage="pre_llm"` (default) drops tokens at the LLM input,
`stage="vision"` inside the vision tower before encoder layer `layer` (LLaVA-1.5), `stage="llm"` before
decoder layer `layer` (keep = layer-averaged budget, as FastV), `stage="decode"` evicts visual KV entries of
layers >= `layer` once prefill is done.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep, infeasible_budget, item_budget, one_stage_llm_count
from ..contexts import DecodeContext, LLMStageContext, Plan, PreLLMItem, Selection, VisionStageContext
from ..errors import PolicyOptionError
from .base import Choice, Int, Option, Policy
from .common import NEWLINE_MODES, generator, structural_to_keep
from .nominal import Nominal, staged, structural
from .registry import register

STAGES = ("pre_llm", "vision", "llm", "decode")
DEFAULT_LAYER = {"pre_llm": None, "vision": 0, "llm": 2, "decode": 0}


def random_subset(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices of range(n), uniformly at random, ascending."""
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


@register
class RandomPolicy(Policy):
    name = "random"
    description = "Uniformly random tokens per image (seeded); any stage: pre_llm, vision, llm or decode."
    options_spec: ClassVar[dict[str, Option]] = {
        "seed": Int(0, ge=0, doc="base seed; each image / sample draws from (seed, its key)"),
        "stage": Choice("pre_llm", STAGES, doc="where tokens are dropped"),
        "layer": Int(
            None,
            ge=0,
            none=True,
            doc="vision layer (stage='vision'), decoder layer ('llm', >= 1) or first edited "
            "KV layer ('decode'); None = 0 / 2 / 0; not used by 'pre_llm'",
        ),
        "newlines": Choice("keep_nonempty_rows", NEWLINE_MODES, doc="OneVision per-row newlines (stage='pre_llm')"),
    }

    def validate(self) -> None:
        stage, layer = self.options["stage"], self.options["layer"]
        if stage == "pre_llm" and layer is not None:
            raise PolicyOptionError(
                f"random: layer={layer!r} is not used with stage='pre_llm'; leave layer=None or choose stage "
                "'vision', 'llm' or 'decode'"
            )
        if stage == "llm" and layer == 0:
            raise PolicyOptionError("random: stage='llm' needs layer >= 1 (decoder layer 0 sees every token)")
        if stage != "pre_llm" and self.options["newlines"] != self.defaults["newlines"]:
            raise PolicyOptionError(
                f"random: newlines={self.options['newlines']!r} is only used with stage='pre_llm' (stage={stage!r} "
                "keeps the structural tokens); drop the option"
            )

    @property
    def layer(self) -> int | None:
        layer = self.options["layer"]
        return DEFAULT_LAYER[self.options["stage"]] if layer is None else layer

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        stage = self.options["stage"]
        if stage == "pre_llm":
            return Plan(pre_llm=True)
        if stage == "vision":
            return Plan(vision_layer=self.layer)
        if stage == "llm":
            return Plan(llm_layers=(self.layer,))
        return Plan(decode=True)

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        """Exact counts; newlines assumed kept in every row ('keep_nonempty_rows')."""
        stage, n_layers = self.options["stage"], info.n_llm_layers
        n, budget = shape.n_content, item_budget(keep, shape.n_content)
        other = shape.length - shape.n_content
        if stage == "pre_llm":
            return Nominal([budget + structural(shape, self.options["newlines"])] * n_layers)
        if stage == "vision":
            width = 1 + budget  # CLS + kept patches
            widths = [1 + n] * self.layer + [width] * (info.n_vision_layers - self.layer)
            return Nominal([budget + other] * n_layers, vision_widths=widths)
        if stage == "llm":
            kept = min(n, max(1, round(one_stage_llm_count(budget, n, self.layer, n_layers))))
            return Nominal(staged(n, [kept], (self.layer,), n_layers, other))
        cache = [shape.length] * self.layer + [budget + other] * (n_layers - self.layer)
        return Nominal([shape.length] * n_layers, cache)

    def select_vision(self, ctx: VisionStageContext) -> list[torch.Tensor]:
        n = ctx.n_patches
        k = item_budget(ctx.keep, n)
        return [random_subset(n, k, generator(self.options["seed"], key)) for key in ctx.row_keys]

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        content = ctx.content_available
        gen = generator(self.options["seed"], ctx.item.index_in_sample)
        kept = content[random_subset(content.numel(), ctx.budget, gen)]
        extra = structural_to_keep(ctx.item.shape, kept, self.options["newlines"])
        extra = extra[torch.isin(extra, ctx.available)]
        return Selection(torch.cat([kept, extra]))

    def _sample_choice(self, slots: torch.Tensor, count: int, key: int) -> Selection:
        pick = random_subset(slots.numel(), count, generator(self.options["seed"], key))
        return Selection(slots[pick.to(slots.device)])

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        out = []
        layout = ctx.layout
        for b, target in enumerate(ctx.item_targets()):
            slots = (layout.valid[b] & layout.visual[b]).nonzero().flatten()
            n = slots.numel()
            if n == 0:  # a sample without visual tokens (e.g. no image in its prompt) passes through
                out.append(Selection(slots))
                continue
            r = one_stage_llm_count(target, n, ctx.layer, ctx.info.n_llm_layers)
            if r < 0.5:
                n_layers = ctx.info.n_llm_layers
                floor = (ctx.layer * n + (n_layers - ctx.layer)) / n_layers
                reason = f"stage='llm' at layer {ctx.layer} of {n_layers}: layers before it see all {n}; lower layer"
                sizes = [it.shape.n_content for it in ctx.items.per_sample[b]]
                raise infeasible_budget("random", reason, ctx.keep, target, floor, sizes)
            out.append(self._sample_choice(slots, min(n, max(1, round(r))), ctx.sample_keys[b]))
        return out

    def select_decode(self, ctx: DecodeContext) -> dict[int, list[Selection]]:
        edits: dict[int, list[Selection]] = {}
        for layer in range(self.layer, ctx.info.n_llm_layers):
            layout = ctx.layer_layouts[layer]
            per_sample = []
            for b, items in enumerate(ctx.items.per_sample):
                slots = (layout.valid[b] & layout.visual[b]).nonzero().flatten()
                target = sum(item_budget(ctx.keep, it.shape.n_content) for it in items)
                per_sample.append(self._sample_choice(slots, min(slots.numel(), target), ctx.sample_keys[b]))
            edits[layer] = per_sample
        return edits
