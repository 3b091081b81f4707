"""`none`: leaves the model untouched (statistics only)."""

from __future__ import annotations

from typing import ClassVar

from ..adapters.base import ModelInfo
from ..budget import Keep
from ..contexts import Plan
from .base import Option, Policy
from .nominal import Nominal
from .registry import register


@register
class NonePolicy(Policy):
    name = "none"
    description = "No compression: the unpatched model, with tokenzip's statistics recorded."
    options_spec: ClassVar[dict[str, Option]] = {}

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        return Plan()

    def nominal(self, info: ModelInfo, shape, keep: Keep) -> Nominal:
        return Nominal([shape.length] * info.n_llm_layers)
