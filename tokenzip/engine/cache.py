"""The KV cache of a compressed prefill: reading it from a forward's arguments and output, tagging it, editing it.

A compressed prefill leaves each decoder layer with fewer entries than prompt tokens (and layers may differ). The
cache is tagged (instance attributes only, so `copy.deepcopy` carries them) with the prefill's serial number and
per layer the number of prompt tokens it lacks, so that `generate()` still counts the full prompt.
"""

from __future__ import annotations

import itertools
import types
from typing import Any

import torch
from transformers import Cache, DynamicCache

from ..errors import UnsupportedInputError
from .state import ForwardState

PREFILLS = itertools.count()  # a process-wide serial number per prefill (marks the KV cache it filled)


def cache_argument(kwargs: dict) -> Any:
    """The KV cache handed to a forward: ``cache`` since transformers 5.24, ``past_key_values`` before it."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_output(output: Any) -> Any:
    """The KV cache a forward returned (field ``cache`` since transformers 5.24, ``past_key_values`` before).

    The old name is read only where the output has no ``cache`` field: on 5.24 reading ``past_key_values`` (also
    when the field is None, e.g. ``use_cache=False``) logs a deprecation warning.
    """
    if isinstance(output, tuple):  # return_dict=False
        return next((x for x in output if isinstance(x, Cache)), None)
    if hasattr(output, "cache"):
        return output.cache
    return getattr(output, "past_key_values", None)


def _frame_seq_length(self, layer_idx: int = 0) -> int:
    """`DynamicCache.get_seq_length` of a cache tokenzip compressed: the number of sequence tokens the layer's
    entries stand for (its own entries plus the prompt tokens pruned from it), which is what `generate()` uses
    to slice the new tokens and build their positions when it continues from the cache."""
    n = type(self).get_seq_length(self, layer_idx)
    return n + self._tokenzip_offsets[layer_idx] if n > 0 else n


def _stored_query_offset(self, layer_idx: int = 0) -> int:
    """`DynamicCache.get_query_offset` of a cache tokenzip compressed: still the number of stored entries (the
    offset of new queries among the layer's keys, which the model's causal mask needs)."""
    offset = type(self).get_query_offset(self, layer_idx)
    if type(self).get_seq_length(self, layer_idx) > 0:
        offset -= self._tokenzip_offsets[layer_idx]
    return offset


def mark_cache(cache: DynamicCache, serial: int, offsets: list[int]) -> None:
    """Tag a cache filled by a compressed prefill: the prefill's serial number, and per layer the prompt tokens
    it lacks (`offsets`, original prompt width minus the layer's width); its `get_seq_length` then counts them
    (`get_query_offset`, which the model's mask uses, keeps counting stored entries).

    Instance attributes only (they travel with `copy.deepcopy`); the cache class is untouched."""
    cache._tokenzip_serial = serial
    cache._tokenzip_offsets = list(offsets)
    for name, method in (("get_seq_length", _frame_seq_length), ("get_query_offset", _stored_query_offset)):
        if any(offsets):
            setattr(cache, name, types.MethodType(method, cache))
        else:
            cache.__dict__.pop(name, None)


def appended_tokens(st: ForwardState, kwargs: dict) -> int:
    """Tokens already appended to the KV cache after the prompt, read from layer 0's cache (its prefill width
    is known): the cache is the truth after `generate()` cropped rejected draft tokens (prompt lookup /
    assisted decoding) or when a generation continues from a returned cache."""
    cache = cache_argument(kwargs)
    layers = getattr(cache, "layers", None)
    if not layers or not st.layer_layouts or not hasattr(layers[0], "get_seq_length"):
        return st.decoded
    t = int(layers[0].get_seq_length()) - st.layer_layouts[0].length
    if t < 0:
        raise UnsupportedInputError(
            f"the KV cache holds {t + st.layer_layouts[0].length} entries in layer 0, fewer than the "
            f"{st.layer_layouts[0].length} of this patch's compressed prompt: it was cropped into the prompt; "
            "run generate() again on the full sequence"
        )
    return t


def gather_cache_layer(cache: Any, layer: int, index: torch.Tensor, valid: torch.Tensor) -> None:
    """Keep, per sample, the KV entries `index` [B, L'] of decoder layer `layer` (zeroed where `valid` [B, L'] is
    False: left padding of the shortened layer)."""
    cache_layer = cache.layers[layer]
    if not hasattr(cache_layer, "keys"):
        raise UnsupportedInputError(f"cache type {type(cache).__name__} cannot be edited per layer; use DynamicCache")
    idx = index.to(cache_layer.keys.device)[:, None, :, None]
    for name in ("keys", "values"):
        tensor = getattr(cache_layer, name)
        gathered = torch.gather(tensor, 2, idx.expand(-1, tensor.shape[1], -1, tensor.shape[-1]))
        setattr(cache_layer, name, gathered * valid.to(gathered.device)[:, None, :, None].to(gathered.dtype))
