"""Finiteness checks for what policies rank or merge tokens by.

NaN or inf in a score (vision attention, LLM attention rows, keys) or in the features a stage hands to a policy
(usually from NaN / inf pixel values, or an overflow in a half-precision model) makes every ranking, top-k,
quota or merge built on it meaningless, and can make quota loops diverge. The engine checks each of them where
it is computed and raises `UnsupportedInputError` naming the policy, the stage and the signal.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedInputError


def require_finite(values: torch.Tensor, policy: str, stage: str, signal: str) -> torch.Tensor:
    """`values` unchanged if all its entries are finite; else `UnsupportedInputError`.

    values: any float tensor (e.g. scores [B, L] or hidden states of the real tokens [n, D]); policy / stage /
    signal: names for the message (e.g. "holov", "vision layer 3", "vision signal 'cls'"); the message reads
    "{policy}: NaN in the {signal} at {stage} ...".
    """
    if values.numel() == 0 or not values.is_floating_point():
        return values
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return values
    kind = "NaN" if bool(torch.isnan(values).any()) else "inf"
    bad = int((~finite).sum())
    raise UnsupportedInputError(
        f"{policy}: {kind} in the {signal} at {stage} ({bad} of {values.numel()} values are not finite); tokenzip "
        "does not select or merge tokens on non-finite values. They usually come from NaN/inf in pixel_values or "
        "an overflow in the model's dtype: check the inputs (the unpatched model's outputs are not finite on them "
        "either), or run the model in float32 / bfloat16"
    )
