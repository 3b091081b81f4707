"""Name -> policy class: the built-in policies, and third-party ones from the `tokenzip.policies` entry points.

A package adds a policy without editing tokenzip by declaring an entry point that loads its policy class:

    [project.entry-points."tokenzip.policies"]
    mine = "my_package.policies:MyPolicy"

The entry points are loaded once, the first time a policy is looked up or listed; the class is registered
under its own `name` (the entry point's name is only a label). A broken entry point is reported with a
`TokenzipWarning` and skipped, so it cannot break tokenzip or the other policies.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

from ..errors import TokenzipWarning, UnknownPolicyError
from .base import Policy, check_policy_class, options_doc

ENTRY_POINT_GROUP = "tokenzip.policies"

_REGISTRY: dict[str, type[Policy]] = {}
_PLUGINS_LOADED = False


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator adding a policy under `cls.name` (checked: a frozen dataclass whose fields are all
    declared options); appends an 'Options' section to its docstring. Re-registering a name replaces it."""
    check_policy_class(cls)
    if "Options:" not in (cls.__doc__ or ""):
        cls.__doc__ = (cls.__doc__ or cls.description) + options_doc(cls)
    _REGISTRY[cls.name.lower()] = cls
    return cls


def load_plugins() -> None:
    """Register the policies of the `tokenzip.policies` entry points (once per process)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if cls.name.lower() in _REGISTRY and _REGISTRY[cls.name.lower()] is not cls:
                raise TypeError(f"the name {cls.name!r} is already taken by {_REGISTRY[cls.name.lower()].__module__}")
            register(cls)
        except Exception as exc:  # a broken plug-in must not break tokenzip
            warnings.warn(
                f"tokenzip: skipped the policy entry point {ep.name!r} = {ep.value!r} ({type(exc).__name__}: {exc})",
                TokenzipWarning,
                stacklevel=2,
            )


def get_policy_class(name: str) -> type[Policy]:
    """The policy class registered as `name` (case-insensitive); `UnknownPolicyError` lists the known names."""
    load_plugins()
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
    load_plugins()
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}
