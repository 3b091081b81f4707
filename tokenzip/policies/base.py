"""The `Policy` base class: a policy plans its stages for a model and selects tokens at each one."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep
from ..contexts import (
    DecodeContext,
    LLMStageContext,
    Plan,
    PreLLMItem,
    ProjectorInputContext,
    Selection,
    VisionStageContext,
)
from ..errors import PolicyOptionError
from ..items import ItemShape
from .nominal import Nominal


class Policy:
    """Base class of all policies.

    A subclass sets `name`, `description` and `defaults` (every option with its default value), implements
    `plan` and the `select_*` method of each stage it uses. Options are validated at construction; an
    unknown option name raises `PolicyOptionError` listing the allowed ones.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise PolicyOptionError(f"policy {self.name!r} has no option(s) {unknown}; its options are: {allowed}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.validate()

    def validate(self) -> None:
        """Check option values; raise `PolicyOptionError` with the allowed values."""

    def default_positions(self, info: ModelInfo) -> str:
        """Position mode used when `apply` gets no `positions`: the LLaVA convention (compact) where defined."""
        return "compact" if info.supports_compact_positions else "original"

    def decode_positions(self, info: ModelInfo) -> str:
        """With compact positions and decode-stage KV edits: "layout" (default) lets an edited layer's new
        tokens continue from the length the layer processed in prefill; "cache_length" from the number of
        entries the edit kept (official MustDrop)."""
        return "layout"

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        """The stages and signals this policy uses on a model described by `info`."""
        raise NotImplementedError

    def nominal(self, info: ModelInfo, shape: ItemShape, keep: Keep) -> Nominal:
        """Predicted tokens of one item per decoder layer on a model described by `info` (see
        `tokenzip.policies.nominal`); used to price the policy without running it."""
        raise NotImplementedError(f"policy {self.name!r} has no nominal schedule")

    def select_vision(self, ctx: VisionStageContext) -> list[Selection | torch.Tensor]:
        """Per vision row: the patches (0-based, CLS excluded; CLS always stays first) that continue through the
        tower, as a `Selection` (values = merged hidden states, `ordered` = keep this order) or a LongTensor of
        kept indices (sorted by the engine)."""
        raise NotImplementedError(f"policy {self.name!r} has no vision stage")

    def select_projector_input(self, ctx: ProjectorInputContext) -> list[Selection]:
        """Per image row: the feature-layer tokens (0 = CLS) that enter the projector, values in vision space."""
        raise NotImplementedError(f"policy {self.name!r} has no projector-input stage")

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        """For one item: the item-local token indices (structural tokens included) that enter the LLM."""
        raise NotImplementedError(f"policy {self.name!r} has no pre_llm stage")

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        """Per sample: the visual slots (of `ctx.layout`) kept from decoder layer `ctx.layer` on."""
        raise NotImplementedError(f"policy {self.name!r} has no llm stage")

    def select_decode(self, ctx: DecodeContext) -> dict[int, list[Selection]]:
        """After prefill: {layer: per-sample `Selection` of the visual slots kept in that layer's KV cache}."""
        raise NotImplementedError(f"policy {self.name!r} has no decode stage")

    def _check_choice(self, option: str, allowed: tuple) -> None:
        value = self.options[option]
        if value not in allowed:
            raise PolicyOptionError(f"{self.name}: {option}={value!r} is not allowed; choose one of {list(allowed)}")

    def _check_int(self, option: str, minimum: int = 0, allow_none: bool = False) -> None:
        value = self.options[option]
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise PolicyOptionError(f"{self.name}: {option} must be an int >= {minimum}, got {value!r}")
