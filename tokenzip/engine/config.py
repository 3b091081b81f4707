"""The frozen per-patch configuration every stage receives, and the check of a policy's plan against the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..adapters.base import SUPPORTED_ATTENTION, Adapter, ModelInfo
from ..budget import Keep, is_passthrough
from ..contexts import Plan
from ..errors import TokenzipError, UnsupportedModelError


@dataclass(frozen=True)
class PatchConfig:
    """What stays fixed for the lifetime of one patch: the model, its adapter and facts, the policy, `keep`, the
    position mode and the checked plan (`plan.state` is the policy's per-model state)."""

    model: nn.Module
    adapter: Adapter
    policy: Any  # tokenzip.policies.Policy (not imported: the policies package imports the engine)
    keep: Keep
    positions: str  # "original" or "compact"
    info: ModelInfo
    plan: Plan

    @property
    def compact(self) -> bool:
        return self.positions == "compact"

    @property
    def renumbers_decode(self) -> bool:
        """Decode positions of a layer whose KV cache a decode stage edited continue from the entries it kept
        (official MustDrop) rather than from the length the layer processed in prefill."""
        return self.compact and self.policy.decode_positions(self.info) == "cache_length"


def patch_config(model: nn.Module, adapter: Adapter, policy: Any, keep: Keep, positions: str) -> PatchConfig:
    """The configuration of a patch: the policy planned on this model (nothing planned at keep=1.0) and checked."""
    info = adapter.info()
    plan = Plan() if is_passthrough(keep) else policy.plan(info, keep)
    check_plan(plan, info, policy.name)
    return PatchConfig(model, adapter, policy, keep, positions, info, plan)


def check_plan(plan: Plan, info: ModelInfo, policy: str) -> None:
    """Refuse a plan the model cannot run: an in-LLM stage under an unsupported attention backend, a stage or
    signal layer outside the model, a vision / projector stage on a family without it, an unknown signal kind."""
    n_llm, n_vis = info.n_llm_layers, info.n_vision_layers
    if (plan.llm_layers or plan.decode) and info.attn_implementation not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"attn_implementation={info.attn_implementation!r} is not supported by in-LLM stages; "
            f"load the model with one of {list(SUPPORTED_ATTENTION)}"
        )
    for layer in plan.llm_layers:
        if not 0 < layer < n_llm:
            raise TokenzipError(f"{policy}: LLM stage layer {layer} is outside 1..{n_llm - 1}")
    for sig in plan.llm_signals:
        if not 0 <= sig.layer < n_llm:
            raise TokenzipError(f"{policy}: LLM signal layer {sig.layer} is outside 0..{n_llm - 1}")
    if plan.vision_layer is not None:
        if not info.supports_vision_stage:
            raise UnsupportedModelError(
                f"{policy}: a vision-tower stage is not supported on {info.family} "
                "(its features are windowed/merged or resampled after the tower); use a pre_llm stage"
            )
        feature_layer = info.vision_feature_layer
        if not 0 <= plan.vision_layer <= (feature_layer if feature_layer is not None else n_vis - 1):
            raise TokenzipError(
                f"{policy}: vision stage layer {plan.vision_layer} must lie in 0..{feature_layer} "
                "(at or before the feature layer)"
            )
    for sig in plan.vision_signals:
        if not 0 <= sig.layer < n_vis:
            raise TokenzipError(f"{policy}: vision signal layer {sig.layer} is outside 0..{n_vis - 1}")
        if sig.kind == "cls" and not info.vision_has_cls:
            raise UnsupportedModelError(f"{info.family}'s vision tower has no CLS token ('cls' signal)")
        if sig.kind not in ("cls", "received", "keys"):
            raise TokenzipError(f"unknown vision signal {sig.kind!r}; known: received, cls, keys")
    if plan.projector_input and not info.supports_projector_stage:
        raise UnsupportedModelError(f"{policy}: a projector-input stage is not supported on {info.family}; use pre_llm")
