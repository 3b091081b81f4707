"""Registered policies and the API to write one (see docs/writing-a-policy.md).

Importing this package registers the built-in policies; third-party ones come from the `tokenzip.policies` entry
points (`registry.load_plugins`).
"""

from . import (  # noqa: F401  (registration side effects)
    atp,
    dart,
    divprune,
    fastv,
    hiprune,
    holitom,
    holov,
    mustdrop,
    none,
    oracle,
    pdrop,
    pool,
    random,
    sparsevlm,
    visiondrop,
    visionzip,
)
from .base import Bool, Choice, Float, Int, Option, Policy, Tuple
from .registry import get_policy_class, list_policies, register
from .scorer import LLMScorerPolicy, ScorerPolicy

__all__ = [
    "Bool",
    "Choice",
    "Float",
    "Int",
    "LLMScorerPolicy",
    "Option",
    "Policy",
    "ScorerPolicy",
    "Tuple",
    "get_policy_class",
    "list_policies",
    "register",
]
