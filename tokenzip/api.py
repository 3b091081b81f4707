"""`tokenzip.apply` and `Patch`: compress the visual tokens of one model instance."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from torch import nn

from .adapters import get_adapter
from .budget import Keep, validate_keep
from .engine.runtime import Runtime
from .engine.state import PatchStats
from .errors import PolicyOptionError, TokenzipWarning, UnknownPolicyError, UnsupportedModelError
from .policies import Policy, get_policy_class, list_policies

POSITION_MODES = ("original", "compact")
_ATTR = "_tokenzip_patch"


class Patch:
    """tokenzip's hooks on one model instance.

    Use `remove()` (or a `with` block) to restore the model exactly; `stats` holds per-prefill records
    (visual tokens per item, per decoder layer, kept indices, selection time); `keep` can be changed in place.

    Patches on one model form a stack: `apply` on a model that already has a patch suspends that patch (with a
    `TokenzipWarning`) and `remove()` of the newer one re-installs it unchanged (same policy, keep, positions,
    `stats` object, replay record). A patch is "active" (its hooks are on the model), "suspended" (a later patch
    replaced it for now) or "removed" (for good).
    """

    def __init__(self, model: nn.Module, policy: Policy, keep: Keep, positions: str) -> None:
        self.model = model
        self.policy = policy
        self.positions = positions
        self._stats = PatchStats()
        self._keep = keep
        self._previous: Patch | None = None  # the patch this one suspended, restored by remove()
        self._runtime: Runtime | None = self._new_runtime(keep)  # None once removed
        self._installed = False

    def _new_runtime(self, keep: Keep) -> Runtime:
        """A runtime planned for `keep` (raises on an infeasible plan before anything touches the model)."""
        runtime = Runtime(self.model, get_adapter(self.model), self.policy, keep, self.positions)
        runtime.stats = self._stats
        return runtime

    def _install(self) -> None:
        self._runtime.install()
        self._installed = True

    def _uninstall(self) -> None:
        if self._installed:
            self._runtime.remove()
            self._installed = False

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
        self._require_not_removed()
        runtime = self._new_runtime(keep)  # an infeasible keep raises here and leaves the patch as it was
        installed = self._installed
        self._uninstall()
        self._runtime, self._keep = runtime, keep
        if installed:
            self._install()

    @property
    def plan(self):
        """The stages the policy uses on this model at the current keep."""
        return self._runtime.plan if self._runtime is not None else None

    def _require_not_removed(self) -> None:
        if self._runtime is None:
            raise RuntimeError("this patch was removed; apply a new one")

    @contextlib.contextmanager
    def replay(self):
        """Within this block every prefill reuses the selections of the last prefill made outside it.

        The prompts must be the recorded ones, possibly extended at the end (e.g. with generated tokens): this
        is the cache-free reference of compressed generation, "recompute the prompt plus the generated prefix
        under the same pruning". Selections that depend on the last token (FastV) or on the prompt checksum
        (random in-LLM) would otherwise change with every extension. Decode-stage KV edits are replayed as
        masks: tokens after the recorded prompt cannot attend to what the edit evicted.
        """
        self._require_not_removed()
        if not self._installed:
            raise RuntimeError("this patch is suspended by a later patch on the same model; remove that one first")
        runtime = self._runtime
        if runtime.decisions is None:
            raise RuntimeError("nothing to replay: run a prefill (model(...) or generate) with images first")
        runtime.replaying = runtime.decisions
        try:
            yield self
        finally:
            runtime.replaying = None

    @property
    def active(self) -> bool:
        """True while this patch's hooks are on the model (not removed, not suspended by a later patch)."""
        return self._installed

    @property
    def suspended(self) -> bool:
        """True while a later patch on the same model replaces this one (it comes back when that one is removed)."""
        return self._runtime is not None and not self._installed

    def remove(self) -> None:
        """Remove this patch's hooks and wrappers; idempotent.

        If this patch replaced an earlier one (see `apply`), that one is re-installed as it was; otherwise the
        model behaves exactly as before `apply`. Removing a suspended patch drops it from the stack (it will not
        come back) and leaves the active one alone. A feature-function wrapper another tool installed on top of
        tokenzip's after `apply` stays in place; tokenzip's wrapper under it becomes a pass-through.
        """
        if self._runtime is None:
            return
        top = self.model.__dict__.get(_ATTR)
        if top is self:
            self._uninstall()
            previous = self._previous
            if previous is not None:
                previous._install()
                self.model.__dict__[_ATTR] = previous
            else:
                del self.model.__dict__[_ATTR]
        else:  # suspended: unlink it from the stack
            later = top
            while later is not None and later._previous is not self:
                later = later._previous
            if later is not None:
                later._previous = self._previous
            self._uninstall()
        self._runtime = None
        self._previous = None

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _describe(self) -> str:
        return f"policy={self.policy.name!r}, keep={self._keep!r}, positions={self.positions!r}"

    def __repr__(self) -> str:
        state = "active" if self.active else "suspended" if self.suspended else "removed"
        return f"Patch({self._describe()}, {state})"


def _policy_object(policy: Any, options: dict[str, Any]) -> Policy:
    """The validated policy object of one patch: the registered class built with `options`, or the `Policy`
    instance itself (policies are frozen and keep no per-model state: their `plan` returns it)."""
    if isinstance(policy, Policy):
        if options:
            raise PolicyOptionError(
                f"options {sorted(options)} go to the Policy constructor when a Policy instance is passed "
                f"(or use dataclasses.replace(policy, **options))"
            )
        return policy
    if isinstance(policy, type) and issubclass(policy, Policy):
        raise UnknownPolicyError(
            f"policy must be a name or a Policy instance, got the class {policy.__name__}; pass "
            f"{policy.__name__}(...) or {policy.name!r}"
        )
    if not isinstance(policy, str):
        raise UnknownPolicyError(
            f"policy must be a registered name (str) or a Policy instance, got {policy!r} of type "
            f"{type(policy).__name__}; available policies: {', '.join(list_policies())} ('none' compresses nothing)"
        )
    return get_policy_class(policy)(**options)


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
        policy: a registered policy name (see `list_policies()`) or a `Policy` instance (frozen, stateless: one
            instance may be applied to any number of models). Anything else (None, a class) raises
            `UnknownPolicyError`.
        keep: float in (0, 1] = fraction of each image's visual tokens, or int >= 1 = tokens per image (per
            video for video); the layer-averaged visual budget of the LLM. keep=1.0 leaves the model untouched.
        positions: "original" (kept tokens keep their RoPE positions) or "compact" (renumbered contiguously);
            None = the policy's default for this model family. Qwen2.5-VL (M-RoPE) supports "original" only.
        **options: policy options, each checked here (type, range, NaN / inf) against the policy's declaration
            (`get_policy_class(name).option_help()`); a bad one raises `PolicyOptionError` naming it.

    A second `apply` to a model that already has a patch warns (`TokenzipWarning`) and suspends the first patch:
    the new one replaces it until it is removed, then the first is re-installed unchanged. So leaving an inner
    `with tokenzip.apply(...)` block restores the outer patch. If the new patch cannot be planned (an invalid
    option or keep), the existing patch stays as it was. `tokenzip.remove(model)` removes the current patch.
    """
    keep = validate_keep(keep)
    adapter = get_adapter(model)
    policy_obj = _policy_object(policy, options)
    info = adapter.info()
    mode = positions if positions is not None else policy_obj.default_positions(info)
    if not isinstance(mode, str) or mode not in POSITION_MODES:
        raise PolicyOptionError(f"positions={mode!r} is not allowed; choose one of {list(POSITION_MODES)}")
    if mode == "compact" and not info.supports_compact_positions:
        raise UnsupportedModelError(
            f"positions='compact' is not defined for {info.family} (3-D M-RoPE ids are kept as computed on the "
            "unpruned sequence); use positions='original'"
        )
    patch = Patch(model, policy_obj, keep, mode)  # planned; nothing installed yet
    old = model.__dict__.get(_ATTR)
    if old is not None:
        warnings.warn(
            f"this model already has a tokenzip patch ({old._describe()}); the new one ({patch._describe()}) "
            "replaces it until the new one is removed, then the old one is restored. Remove the old patch first "
            "(patch.remove() or tokenzip.remove(model)) to replace it for good.",
            TokenzipWarning,
            stacklevel=2,
        )
        old._uninstall()
        patch._previous = old
    patch._install()
    model.__dict__[_ATTR] = patch
    return patch


def current_patch(model: nn.Module) -> Patch | None:
    """The active patch of `model`, if any (suspended patches are not returned)."""
    return model.__dict__.get(_ATTR)


def remove(model: nn.Module, *, all_patches: bool = False) -> Patch | None:
    """Remove the active patch of `model` and return it; None (and nothing done) if the model has none.

    As `patch.remove()`: a patch it had suspended comes back. `all_patches=True` removes the suspended ones
    too, leaving the model exactly as before any `apply`.
    """
    patch = current_patch(model)
    if patch is None:
        return None
    patch.remove()
    while all_patches and current_patch(model) is not None:
        current_patch(model).remove()
    return patch


__all__ = ["Patch", "apply", "current_patch", "list_policies", "remove"]
