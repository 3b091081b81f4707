"""Attention masks for decoder layers whose sequence tokenzip changed.

transformers builds one mask for all layers from layer 0's length; layers after an in-LLM stage (or whose KV
cache was edited) need their own. The format follows the attention backend:

* eager: additive float [B, 1, Q, K] (0 = attend, dtype min = masked);
* sdpa: bool [B, 1, Q, K] (True = attend), or None when plain causal attention is exact;
* flash_attention_2/3: 2-D padding mask [B, K] (1 = real token), or None without padding.

Causality is by slot order (the order of the re-built sequence). Padding query rows attend to themselves
so that no row is fully masked (a fully masked row yields NaN in some kernels).
"""

from __future__ import annotations

import torch


def _is_flash(impl: str) -> bool:
    return impl.startswith("flash_attention") or "flash" in impl


def _finish(keep: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=keep.device)
        return torch.where(keep, zero, torch.finfo(dtype).min)
    return keep


def prefill_mask(valid: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Mask for a prefill over a re-padded layout. valid: BoolTensor [B, L]."""
    if _is_flash(impl):
        return None if bool(valid.all()) else valid.long()
    if impl != "eager" and bool(valid.all()):
        return None  # sdpa: is_causal is exact
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    keep = causal[None] & valid[:, None, :]
    keep = keep | (torch.eye(n, dtype=torch.bool, device=valid.device)[None] & ~valid[:, :, None])
    return _finish(keep.unsqueeze(1), impl, dtype)


def decode_mask(
    cached_valid: torch.Tensor, tail: torch.Tensor, q_len: int, impl: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """Mask for q_len new tokens attending to a layer's cache.

    cached_valid: BoolTensor [B, C] validity of the prefill entries of this layer's cache.
    tail: BoolTensor [B, T] validity of the entries appended since prefill, this step's q_len tokens included
    (its last q_len columns are the new tokens). Returns a mask over K = C + T keys.
    """
    keys = torch.cat([cached_valid, tail], dim=1)
    if _is_flash(impl):
        return None if bool(keys.all()) else keys.long()
    if impl != "eager" and q_len == 1 and bool(keys.all()):
        return None
    k = keys.shape[1]
    q_idx = torch.arange(k - q_len, k, device=keys.device)
    causal = torch.arange(k, device=keys.device)[None, :] <= q_idx[:, None]  # [Q, K]
    keep = causal[None] & keys[:, None, :]
    return _finish(keep.unsqueeze(1), impl, dtype)
