"""The hook runtime: installs tokenzip on one model instance and routes each hook to the stage that handles it.

Hooks (all on this instance; nothing class-level or global), and where their work is done:

* a forward pre-/post-hook on the model: detects prefill vs decode, captures `input_ids`, finalises the stats
  (`recording`) and applies decode-stage KV-cache edits after prefill (`decode.edit_kv_cache`);
* instance-attribute wrappers around the base model's `get_image_features` / `get_video_features`: these run
  (inside `generate`, before the first forward) for every image / video, so they see the geometry and the vision
  signals captured meanwhile (`feature_calls`);
* pre-hooks on vision attention modules (signals) and encoder layers, hooks on the feature layer and projector
  (`vision_stages`);
* a pre-hook on the decoder stack: rebuilds the LLM input in prefill (`llm_input`) and keeps the 2-D mask and
  positions consistent with it in decode (`decode.decode_step_inputs`); a post-hook re-lays a right-padded batch;
* a wrapper of the decoder stack's `_deepstack_process` (Qwen3-VL): its additions follow kept tokens (`deepstack`);
* pre-hooks on decoder layers: in-LLM stages and per-layer arguments (`llm_stage.layer_inputs`); forward hooks on
  decoder attention modules for LLM signals (`llm_stage.capture_llm_signal`).

The runtime holds the per-patch mutable state: the `ForwardState` of the latest prefill, the feature calls
pending for the next forward, the recorded `Decisions` and the one being replayed. Everything fixed is in the
frozen `PatchConfig` passed to every stage. Stages refuse non-finite signals and features.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from ..adapters.base import Adapter
from ..budget import Keep
from ..contexts import Plan
from ..errors import UnsupportedInputError, UnsupportedModelError
from . import decode, llm_input, llm_stage, steps, vision_stages
from .cache import PREFILLS, cache_argument, cache_output, mark_cache
from .config import PatchConfig, patch_config
from .deepstack import DeepstackWrapper
from .feature_calls import record_call
from .hooks import ABSENT, FeatureWrapper, Hook, stopwatch
from .recording import forward_record
from .state import CallCapture, Decisions, ForwardState, PatchStats, VisionCall


class Runtime:
    """tokenzip's hooks on one model instance for one policy."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter, policy, keep: Keep, positions: str) -> None:
        self.cfg: PatchConfig = patch_config(model, adapter, policy, keep, positions)
        self.stats = PatchStats()
        self.handles: list[Any] = []
        self.wrapped: list[tuple[Any, str, FeatureWrapper, Any]] = []  # (owner, name, wrapper, previous entry)
        self._in_forward = False  # inside the model's forward (feature calls there all belong to that forward)
        self.state: ForwardState | None = None
        self.pending: dict[str, list[VisionCall]] = {m: [] for m in adapter.token_ids}
        self._call: CallCapture | None = None  # the feature call running now
        self.decisions: Decisions | None = None  # the last prefill's selections
        self.replaying: Decisions | None = None  # set by Patch.replay()
        self._auto_replay = False  # `replaying` was set for one step of a cache-free generate()

    @property
    def plan(self) -> Plan:
        return self.cfg.plan

    @property
    def model(self) -> torch.nn.Module:
        return self.cfg.model

    # ------------------------------------------------------------------------------------------ install / remove
    def install(self) -> None:
        model, adapter, plan = self.cfg.model, self.cfg.adapter, self.cfg.plan
        self.handles.append(model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._top_post, with_kwargs=True))
        self.handles.append(model.register_forward_pre_hook(self._enter_forward))
        self.handles.append(model.register_forward_hook(self._exit_forward, always_call=True))
        for modality, name in adapter.feature_functions.items():
            if getattr(adapter.base, name, None) is not None:
                self._wrap(adapter.base, name, lambda f, m=modality: FeatureWrapper(self, m, f))
        if adapter.deepstack_layers():  # Qwen3-VL: its DeepStack additions follow the tokens each layer keeps
            self._wrap(adapter.lm, "_deepstack_process", lambda f: DeepstackWrapper(self, f))
        self.handles.append(adapter.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(adapter.lm.register_forward_hook(self._lm_post))
        if plan.llm_layers or plan.decode or plan.noncausal_layers:
            for i, layer in enumerate(adapter.lm_layers):
                self.handles.append(layer.register_forward_pre_hook(Hook(self, "_layer_hook", i), with_kwargs=True))
        for sig in plan.llm_signals:
            self.handles.append(llm_stage.register_signal_hook(adapter, sig, Hook(self, "_llm_signal_hook", sig)))
        for sig in plan.vision_signals:
            hook = Hook(self, "_vision_signal_hook", sig)
            self.handles.append(adapter.vision_attention(sig.layer).register_forward_pre_hook(hook, with_kwargs=True))
        if plan.projector_input:
            feature = adapter.vision_layers[self.cfg.info.vision_feature_layer]
            self.handles.append(feature.register_forward_hook(self._feature_layer_hook))
            self.handles.append(adapter.projector.register_forward_pre_hook(self._projector_pre))
            self.handles.append(adapter.projector.register_forward_hook(self._projector_post))
        if plan.vision_layer is not None:
            for i, layer in enumerate(adapter.vision_layers):
                if i >= plan.vision_layer:
                    hook = Hook(self, "_vision_layer_hook", i)
                    self.handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook; put back exactly the instance attributes the feature wrappers replaced.

        A wrapper that another tool wrapped again after `apply` (or replaced) is no longer reachable by tokenzip
        alone: the other tool's attribute is left in place and tokenzip's wrapper becomes a pass-through to
        what it wrapped, so the other tool keeps working and tokenzip no longer records anything.
        """
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for owner, name, wrapper, previous in self.wrapped:
            wrapper.runtime = None  # a pass-through from now on
            if owner.__dict__.get(name) is wrapper:
                if previous is ABSENT:
                    del owner.__dict__[name]
                else:
                    owner.__dict__[name] = previous
        self.wrapped.clear()
        self.state = None
        self._drop_pending()

    def _wrap(self, owner: torch.nn.Module, name: str, make) -> None:
        """Replace method `name` of this `owner` instance by `make(original)` (undone by `remove`)."""
        if getattr(owner, name, None) is None:
            raise UnsupportedModelError(f"{type(owner).__name__} has no `{name}`, which tokenzip wraps for this family")
        wrapper = make(getattr(owner, name))
        self.wrapped.append((owner, name, wrapper, owner.__dict__.get(name, ABSENT)))
        owner.__dict__[name] = wrapper

    # ------------------------------------------------------------------------------------------ vision side
    def feature_call(self, modality: str, original, args: tuple, kwargs: dict) -> Any:
        """One call of a wrapped feature function: run it with signals captured, then record the call. A feature
        function called inside another (Qwen3-VL's `get_video_features` runs `get_image_features`) belongs to the
        outer call and is not recorded on its own."""
        if self._call is not None:
            return original(*args, **kwargs)
        capture = CallCapture(modality, (args, kwargs))
        self._call = capture
        try:
            with stopwatch(self.cfg.adapter.base.device) as seconds:
                out = original(*args, **kwargs)
        finally:
            self._call = None
        capture.call_seconds = seconds[0]
        call = record_call(self.cfg, capture, original, out)
        if self._in_forward:
            self.pending[modality].append(call)
        else:  # a direct call (or generate() encoding before its first forward): the next forward uses only the
            self.pending[modality][:] = [call]  # latest call per modality, so hold only that one
        return out

    def _replayed(self, kind: str, modality: str):
        """None, or (while replaying) rows -> the recorded selections of the current feature call."""
        if self.replaying is None:
            return None
        return vision_stages.recorded_rows(self.replaying, kind, modality, len(self.pending[modality]))

    def _vision_signal_hook(self, sig):
        def hook(module, args, kwargs):
            if self._call is not None and self.replaying is None:  # a replay reuses decisions: no scoring
                vision_stages.capture_signal(self.cfg, self._call, sig, module, args, kwargs)

        return hook

    def _vision_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            capture = self._call
            if capture is None:
                return None
            replayed = self._replayed("vision", capture.modality)
            return vision_stages.vision_stage(self.cfg, capture, index, args, kwargs, replayed)

        return hook

    def _feature_layer_hook(self, module, args, output):
        if self._call is not None:
            self._call.feature_out = output[0] if isinstance(output, tuple) else output

    def _projector_pre(self, module, args):
        capture = self._call
        if capture is None or capture.feature_out is None:
            return None
        replayed = self._replayed("projector", capture.modality)
        return (vision_stages.projector_input_stage(self.cfg, capture, args[0], replayed), *args[1:])

    def _projector_post(self, module, args, output):
        capture = self._call
        if capture is None or capture.projected_reps is None:
            return None
        return vision_stages.projector_output(capture, output)

    def _enter_forward(self, module, args) -> None:
        self._in_forward = True

    def _exit_forward(self, module, args, output) -> None:
        self._in_forward = False  # `always_call`: also when the forward raised

    # ------------------------------------------------------------------------------------------ top level
    def _top_pre(self, module, args, kwargs):
        cache = cache_argument(kwargs)
        if self._auto_replay:  # left over from the previous forward of a cache-free generate()
            self.replaying, self._auto_replay = None, False
        if not self.cfg.plan.is_empty and cache is not None and not isinstance(cache, DynamicCache):
            self._drop_pending()
            raise UnsupportedInputError(
                f"policy {self.cfg.policy.name!r} shortens the prompt (and may give layers different KV lengths), "
                f"which a {type(cache).__name__} cannot hold; use the default DynamicCache (do not set "
                "cache_implementation)"
            )
        if cache is None or cache.get_seq_length() == 0:
            self._start_prefill(args, kwargs)
        else:
            self._start_decode_step(cache, kwargs)

    def _start_prefill(self, args, kwargs) -> None:
        previous = self.state
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        encoded = kwargs.get("mm_encoder_outputs")
        reused = False
        if encoded is None:
            self._drop_pending()
        else:  # generate() encoded each modality with one feature call just before this forward
            for modality, calls in self.pending.items():
                del calls[: -1 if encoded.get(modality) is not None else len(calls)]
            reused = steps.requeue_encoded(previous, encoded, self.pending)
        self.state = ForwardState(
            input_ids=input_ids,
            attention_mask=kwargs.get("attention_mask"),
            user_positions=kwargs.get("position_ids") is not None,
            labels=kwargs.get("labels") is not None,
            serial=next(PREFILLS),
        )
        if reused and self.replaying is None and steps.extends(previous, self.decisions, input_ids):
            # generate(use_cache=False) re-runs the whole sequence each step with the first step's encoder
            # outputs: replay that step's selections so that it equals cached generation (see Patch.replay)
            self.replaying, self._auto_replay = self.decisions, True

    def _start_decode_step(self, cache, kwargs) -> None:
        problem = steps.decode_step_problem(self.state, cache, kwargs)
        if problem is not None:
            self._drop_pending()
            raise problem
        if self.state is not None and self.state.active:
            self.state.phase = "decode"
            self.state.user_positions = kwargs.get("position_ids") is not None

    def _drop_pending(self) -> None:
        for calls in self.pending.values():
            calls.clear()

    def _top_post(self, module, args, kwargs, output):
        st = self.state
        try:
            if st is None or st.phase != "prefill":
                return None
            processed = list(st.layer_layouts)
            cache = cache_output(output)
            if st.active and self.cfg.plan.decode and (cache is not None or self.replaying is None):
                recording = self.decisions if self.replaying is None else None
                decode.edit_kv_cache(self.cfg, st, cache, recording)  # without a cache: only records (for replay)
            if st.active and not self.cfg.plan.is_empty and isinstance(cache, DynamicCache):
                mark_cache(cache, st.serial, [st.orig_len - lay.length for lay in st.layer_layouts])
            if st.layout0 is not None:
                self.stats.history.append(forward_record(self.cfg, st, processed))
            st.phase = "decode"
            return None
        finally:
            if self._auto_replay:
                self.replaying, self._auto_replay = None, False

    # ------------------------------------------------------------------------------------------ LLM
    def _lm_pre(self, module, args, kwargs):
        st = self.state
        if st is None:
            return None
        if st.phase == "prefill":
            calls = {m: list(c) for m, c in self.pending.items()}
            self._drop_pending()
            out, decisions = llm_input.prefill_llm_input(self.cfg, st, calls, kwargs, self.replaying)
            if decisions is not None:
                self.decisions = decisions
        elif st.active and (st.rebuilt or self.cfg.plan.decode or self.cfg.plan.llm_layers):
            out = decode.decode_step_inputs(self.cfg, st, kwargs)
        else:
            out = None
        return None if out is None else (args, out)

    def _lm_post(self, module, args, output):
        st = self.state
        if st is not None and st.phase == "prefill" and st.active and st.right_padded and st.current is not None:
            return llm_input.right_padded_output(st.current, output)
        return None

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            st = self.state
            if st is None or not st.active or st.layout0 is None:
                return None
            recording = self.decisions if self.replaying is None else None
            return llm_stage.layer_inputs(self.cfg, st, index, module, args, kwargs, self.replaying, recording)

        return hook

    def _llm_signal_hook(self, sig):
        def hook(module, args, kwargs, *output):  # a forward hook, or a pre-hook for 'hidden'
            st = self.state
            if st is not None and st.active and st.phase == "prefill" and self.replaying is None:
                llm_stage.capture_llm_signal(self.cfg, st, sig, module, kwargs, args)

        return hook
