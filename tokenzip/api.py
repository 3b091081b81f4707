"""`tokenzip.apply` and `Patch`: compress the visual tokens of one model instance."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from .adapters import get_adapter
from .budget import Keep, validate_keep
from .engine.runtime import Runtime
from .engine.state import PatchStats
from .errors import PolicyOptionError, UnsupportedModelError
from .policies import Policy, get_policy_class, list_policies

POSITION_MODES = ("original", "compact")
_ATTR = "_tokenzip_patch"


class Patch:
    """tokenzip's hooks on one model instance.

    Use `remove()` (or a `with` block) to restore the model exactly; `stats` holds per-prefill records
    (visual tokens per item, per decoder layer, kept indices, selection time); `keep` can be changed in place.
    """

    def __init__(self, model: nn.Module, policy: Policy, keep: Keep, positions: str) -> None:
        self.model = model
        self.policy = policy
        self.positions = positions
        self._stats = PatchStats()
        self._runtime: Runtime | None = None
        self._keep = keep
        self._install()

    def _install(self) -> None:
        runtime = Runtime(self.model, get_adapter(self.model), self.policy, self._keep, self.positions)
        runtime.stats = self._stats
        runtime.install()
        self._runtime = runtime

    @property
    def stats(self) -> PatchStats:
        """Per-prefill statistics (`stats.last`, `stats.history`)."""
        return self._stats

    @property
    def keep(self) -> Keep:
        return self._keep

    @keep.setter
    def keep(self, value: Any) -> None:
        keep = validate_keep(value)
        if self._runtime is None:
            raise RuntimeError("this patch was removed; apply a new one")
        self._runtime.remove()
        self._keep = keep
        self._install()

    @property
    def plan(self):
        """The stages the policy uses on this model at the current keep."""
        return self._runtime.plan if self._runtime is not None else None

    @contextlib.contextmanager
    def replay(self):
        """Within this block every prefill reuses the selections of the last prefill made outside it.

        The prompts must be the recorded ones, possibly extended at the end (e.g. with generated tokens): this
        is the cache-free reference of compressed generation, "recompute the prompt plus the generated prefix
        under the same pruning". Selections that depend on the last token (FastV) or on the prompt checksum
        (random in-LLM) would otherwise change with every extension. Decode-stage KV edits are replayed as
        masks: tokens after the recorded prompt cannot attend to what the edit evicted.
        """
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError("this patch was removed; apply a new one")
        if runtime.decisions is None:
            raise RuntimeError("nothing to replay: run a prefill (model(...) or generate) with images first")
        runtime.replaying = runtime.decisions
        try:
            yield self
        finally:
            runtime.replaying = None

    @property
    def active(self) -> bool:
        return self._runtime is not None

    def remove(self) -> None:
        """Remove every hook and wrapper; the model behaves exactly as before `apply`."""
        if self._runtime is not None:
            self._runtime.remove()
            self._runtime = None
        if self.model.__dict__.get(_ATTR) is self:
            del self.model.__dict__[_ATTR]

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Patch(policy={self.policy.name!r}, keep={self._keep!r}, positions={self.positions!r}, {state})"


def apply(
    model: nn.Module,
    policy: str | Policy = "none",
    keep: Any = 1.0,
    *,
    positions: str | None = None,
    **options: Any,
) -> Patch:
    """Compress the visual tokens of `model` (this instance only) with `policy`.

    Args:
        model: a `LlavaForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` or
            `LlavaOnevisionForConditionalGeneration` (any dtype, device, attention backend sdpa / eager /
            flash_attention_2, with or without an accelerate device_map).
        policy: a registered policy name (see `list_policies()`) or a `Policy` instance.
        keep: float in (0, 1] = fraction of each image's visual tokens, or int >= 1 = tokens per image (per
            video for video); the layer-averaged visual budget of the LLM. keep=1.0 leaves the model untouched.
        positions: "original" (kept tokens keep their RoPE positions) or "compact" (renumbered contiguously);
            None = the policy's default for this model family. Qwen2.5-VL (M-RoPE) supports "original" only.
        **options: policy options (see the policy's `defaults`).

    Applying a patch to a model that already has one removes the old patch first.
    """
    keep = validate_keep(keep)
    adapter = get_adapter(model)
    if isinstance(policy, Policy):
        if options:
            raise PolicyOptionError("options go to the Policy constructor when a Policy instance is passed")
        policy_obj = policy
    else:
        policy_obj = get_policy_class(policy)(**options)
    info = adapter.info()
    mode = positions if positions is not None else policy_obj.default_positions(info)
    if mode not in POSITION_MODES:
        raise PolicyOptionError(f"positions={mode!r} is not allowed; choose one of {list(POSITION_MODES)}")
    if mode == "compact" and not info.supports_compact_positions:
        raise UnsupportedModelError(
            f"positions='compact' is not defined for {info.family} (3-D M-RoPE ids are kept as computed on the "
            "unpruned sequence); use positions='original'"
        )
    old = model.__dict__.get(_ATTR)
    if old is not None:
        old.remove()
    patch = Patch(model, policy_obj, keep, mode)
    model.__dict__[_ATTR] = patch
    return patch


def current_patch(model: nn.Module) -> Patch | None:
    """The patch applied to `model`, if any."""
    return model.__dict__.get(_ATTR)


__all__ = ["Patch", "apply", "current_patch", "list_policies"]
