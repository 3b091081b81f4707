"""Autograd through merged values.

The engine runs every policy call under `torch.no_grad()`: selection (scores, top-k, assignments) is not
differentiable and needs no graph. A merge, though, produces new token VALUES (means, weighted sums of the
model's hidden states) that the rest of the forward uses; built under `no_grad` they would carry no graph, so
`backward()` would silently give zero gradient to everything upstream of them (the projector, the vision tower,
earlier decoder layers). Policies therefore build merged values inside `differentiable_values()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def differentiable_values() -> Iterator[None]:
    """Re-enable autograd for the arithmetic that builds merged values inside a policy call.

    A graph is recorded only for inputs that already carry one, i.e. when the model itself runs with grad
    enabled and the inputs depend on parameters that require grad; under the user's `no_grad` /
    `inference_mode` the inputs carry no graph and nothing is recorded, so inference costs nothing extra.
    Selection inputs (scores, similarity metrics) should be `.detach()`ed inside this block.
    """
    with torch.enable_grad():
        yield
