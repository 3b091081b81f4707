"""`none`: leaves the model untouched (statistics only)."""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.base import ModelInfo
from ..budget import Keep
from ..contexts import Plan
from .base import Policy
from .nominal import Nominal
from .registry import register


@register
@dataclass(frozen=True)
class NonePolicy(Policy):
    """No compression: the model runs unchanged; `patch.stats` records its token counts (the reference row)."""

    name = "none"
    description = "No compression: the unpatched model, with tokenzip's statistics recorded."

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        return Plan()

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        return Nominal([shape.length] * info.n_llm_layers)
