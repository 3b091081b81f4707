"""Exceptions raised by tokenzip. Every message says what was wrong and what is allowed."""

from __future__ import annotations


class TokenzipError(Exception):
    """Base class of all tokenzip errors."""


class UnsupportedModelError(TokenzipError, TypeError):
    """The model is not one of the supported families (or is configured in an unsupported way)."""


class UnknownPolicyError(TokenzipError, ValueError):
    """The policy name is not registered."""


class BudgetError(TokenzipError, ValueError):
    """`keep` is invalid, or the policy cannot meet it on this model."""


class PolicyOptionError(TokenzipError, ValueError):
    """A policy option has an unknown name or an invalid value."""


class UnsupportedInputError(TokenzipError, ValueError):
    """The inputs of a forward call cannot be compressed as asked (e.g. a StaticCache with an in-LLM stage)."""


class TokenzipWarning(UserWarning):
    """Something tokenzip did that may not be what was meant (e.g. a second patch applied over a first)."""
