"""tokenzip: training-free visual-token compression for Hugging Face vision-language models.

import tokenzip
patch = tokenzip.apply(model, policy="fastv", keep=0.5)
model.generate(**inputs)
patch.remove()                  # or tokenzip.remove(model)
"""

from .api import Patch, apply, current_patch, remove
from .errors import (
    BudgetError,
    PolicyOptionError,
    TokenzipError,
    TokenzipWarning,
    UnknownPolicyError,
    UnsupportedInputError,
    UnsupportedModelError,
)
from .policies import Policy, list_policies

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "Patch",
    "Policy",
    "PolicyOptionError",
    "TokenzipError",
    "TokenzipWarning",
    "UnknownPolicyError",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "current_patch",
    "list_policies",
    "remove",
]
