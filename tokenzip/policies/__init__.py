"""Registered policies. Importing this package registers the built-in ones."""

from . import atp, fastv, hiprune, holitom, holov, mustdrop, none, oracle, pool, random, visiondrop  # noqa: F401  (registration side effects)
from .base import Policy
from .registry import get_policy_class, list_policies, register

__all__ = ["Policy", "get_policy_class", "list_policies", "register"]
