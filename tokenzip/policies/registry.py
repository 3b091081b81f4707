"""Name -> policy class."""

from __future__ import annotations

from ..errors import UnknownPolicyError
from .base import Policy

_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator adding a policy under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def get_policy_class(name: str) -> type[Policy]:
    """The policy class registered as `name` (case-insensitive); `UnknownPolicyError` lists the known names."""
    if not isinstance(name, str):
        raise UnknownPolicyError(
            f"a policy name must be a str, got {name!r} of type {type(name).__name__}; available policies: "
            f"{', '.join(sorted(_REGISTRY))}"
        )
    key = name.lower()
    if key not in _REGISTRY:
        raise UnknownPolicyError(f"unknown policy {name!r}; available policies: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def list_policies() -> dict[str, str]:
    """Registered policy names with their one-line descriptions, sorted by name."""
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}
