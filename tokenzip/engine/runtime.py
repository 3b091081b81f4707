"""The hook runtime: installs tokenzip on one model instance and drives a policy's stages.

Hooks (all on this instance; nothing class-level or global):

* a forward pre-/post-hook on the model: detects prefill vs decode, captures `input_ids`, finalises stats
  and applies decode-stage KV-cache edits after prefill;
* instance-attribute wrappers around the base model's `get_image_features` / `get_video_features`: these
  run (inside `generate`, before the first forward) for every image/video, so they see the geometry
  (image sizes, grids, frames) and the vision signals captured meanwhile;
* pre-hooks on vision attention modules (signals) and encoder layers (vision stage);
* a pre-hook on the decoder stack: rebuilds the LLM input (pre-LLM stage) and, in decode, keeps the 2-D mask
  and positions consistent with the rebuilt prefill;
* pre-hooks on decoder layers: in-LLM stages and per-layer masks / positions during decode;
* forward hooks on decoder attention modules for LLM signals (e.g. FastV's last-token row);
* a post-hook on the decoder stack: a right-padded batch gets its shortened output right-padded again.

Hooks and wrappers are bound methods or small callable objects holding the runtime (no closures), so
`copy.deepcopy` of a patched model copies them with a runtime of its own that drives the copy. Stages refuse
non-finite signals and features (`tokenzip.signals.checks.require_finite`).
"""

from __future__ import annotations

import functools
import itertools
import time
import types
import warnings
import weakref
from typing import Any

import torch
from transformers import Cache, DynamicCache

from ..adapters.base import SUPPORTED_ATTENTION, Adapter
from ..budget import Keep, is_passthrough
from ..contexts import (
    DecodeContext,
    LLMStageContext,
    Plan,
    PreLLMItem,
    ProjectorInputContext,
    Selection,
    VisionStageContext,
)
from ..errors import TokenzipError, UnsupportedInputError, UnsupportedModelError
from ..items import ItemsOfBatch, locate_items
from ..ops.gather import gather_seq
from ..signals.attention import (
    decoder_attention_received,
    decoder_attention_rows,
    decoder_head_mean_keys,
    encoder_attention_received,
    encoder_attention_rows,
    encoder_head_mean_keys,
    qwen_vision_attention_received,
    qwen_vision_head_mean_keys,
)
from ..signals.checks import require_finite
from .accounting import policy_work
from .compose import compose_prompt, compose_slots
from .layout import Layout, compact_positions, first_positions, gather_hidden, take
from .masks import decode_mask, prefill_mask
from .state import (
    CallCapture,
    Decisions,
    ForwardRecord,
    ForwardState,
    ItemRecord,
    PatchStats,
    SampleRecord,
    VisionCall,
    VisionStageState,
)
from .vision import encoder_padding_mask, expand_features, pad_rows, scatter_signal


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(kwargs: dict) -> Any:
    """The KV cache handed to a forward: ``cache`` since transformers 5.24, ``past_key_values`` before it."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _cache_output(output: Any) -> Any:
    """The KV cache a forward returned (field ``cache`` since transformers 5.24, ``past_key_values`` before).

    The old name is read only where the output has no ``cache`` field: on 5.24 reading ``past_key_values`` (also
    when the field is None, e.g. ``use_cache=False``) logs a deprecation warning.
    """
    if isinstance(output, tuple):  # return_dict=False
        return next((x for x in output if isinstance(x, Cache)), None)
    if hasattr(output, "cache"):
        return output.cache
    return getattr(output, "past_key_values", None)


_PREFILLS = itertools.count()  # a process-wide serial number per prefill (marks the KV cache it filled)


def _has_media(kwargs: dict) -> bool:
    """Whether a forward's kwargs carry images or videos (pixels, or non-empty pre-computed encoder outputs)."""
    if any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
        return True
    encoded = kwargs.get("mm_encoder_outputs")
    return bool(encoded) and any(v is not None for v in encoded.values())


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


def _mark_cache(cache: DynamicCache, serial: int, offsets: list[int]) -> None:
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


def _kept_record(
    sel: Selection, item, available: torch.Tensor | None = None, vision_groups: torch.Tensor | None = None
) -> tuple:
    """(item-local indices of the real tokens a pre-LLM selection keeps, in sequence order; zero rows added;
    merges [2, m] item-local of the vision stage and this selection, or None; the tokens a vision stage left, or
    None).

    With a window offset the index -1 is the token before the run; the run's uncovered tail is always kept.
    """
    keep = sel.keep.cpu().long()
    if not sel.ordered:
        keep = torch.sort(keep).values
    real = keep[: keep.numel() - sel.padding] + sel.offset
    tail = torch.arange(item.length + sel.offset, item.length)
    merges = [
        g
        for g in (vision_groups, None if sel.groups is None else sel.groups.cpu().long() + sel.offset)
        if g is not None
    ]
    groups = torch.cat(merges, dim=1) if merges else None
    return torch.cat([real, tail]), sel.padding, groups, available


def _item_groups(groups: torch.Tensor | None, dropped: int) -> torch.Tensor | None:
    """A projector-input selection's merges [2, m] (tower indices) as item-local indices: minus the `dropped`
    leading tower tokens (CLS); merges involving a dropped token are left out."""
    if groups is None:
        return None
    shifted = groups.cpu().long() - dropped
    return shifted[:, (shifted >= 0).all(0)]


def _changed_layouts(layouts: list, counts: list[int]) -> list[tuple[str, Layout]]:
    """('LLM input', layer-0 layout), then ('layer k', layout) for every layer whose visual count (one sample's
    `counts`, per layer) is below the previous layer's: the stages at which that sample's visual tokens changed."""
    out = [("LLM input", layouts[0])]
    out += [(f"layer {k}", layouts[k]) for k in range(1, len(layouts)) if counts[k] < counts[k - 1]]
    return out


def _pixel_key(pixels: torch.Tensor) -> int:
    """A stable per-image integer from its pixel values (independent of batch composition)."""
    import zlib

    data = pixels.detach().float().cpu().contiguous().numpy().tobytes()
    return zlib.crc32(data)


class _Absent:
    """Marks a feature function that had no instance-level attribute before `apply` (one object, also across
    `copy.deepcopy` and pickling)."""

    def __reduce__(self) -> str:
        return "_ABSENT"


_ABSENT = _Absent()


class _Hook:
    """A hook built by a `Runtime` factory method (`factory(arg)` returns the hook function), kept as (runtime,
    factory name, argument) rather than as a closure: `copy.deepcopy` of a patched model then copies the hook
    with the copy's runtime (closures are copied by reference and would drive the original model's runtime)."""

    def __init__(self, runtime: Runtime, factory: str, arg: Any) -> None:
        self.runtime, self.factory, self.arg = runtime, factory, arg
        self._fn = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fn is None:
            self._fn = getattr(self.runtime, self.factory)(self.arg)
        return self._fn(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {"runtime": self.runtime, "factory": self.factory, "arg": self.arg, "_fn": None}


class _FeatureWrapper:
    """tokenzip's instance-level wrapper of `get_image_features` / `get_video_features`.

    A callable object (not a closure) so that `copy.deepcopy` of the model copies it with the copy's runtime and
    the copy's bound original. After `Runtime.remove()` (`runtime` is None) it is a pass-through to `original`:
    that matters only where another tool wrapped it after `apply`, whose wrapper then stays in place.
    """

    def __init__(self, runtime: Runtime, modality: str, original: Any) -> None:
        functools.update_wrapper(self, original)  # __name__, __doc__, __wrapped__ = original
        self.runtime: Runtime | None = runtime
        self.modality = modality
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.runtime is None:
            return self.original(*args, **kwargs)
        return self.runtime._feature_call(self.modality, self.original, args, kwargs)


class Runtime:
    """tokenzip's hooks on one model instance for one policy."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter, policy, keep: Keep, positions: str) -> None:
        self.model = model
        self.adapter = adapter
        self.policy = policy
        self.keep = keep
        self.positions = positions
        self.info = adapter.info()
        self.stats = PatchStats()
        self.handles: list[Any] = []
        self.wrapped: list[tuple[Any, str, _FeatureWrapper, Any]] = []  # (owner, name, wrapper, previous entry)
        self._in_forward = False  # inside the model's forward (feature calls there all belong to that forward)
        self.state: ForwardState | None = None
        self.pending: dict[str, list[VisionCall]] = {m: [] for m in adapter.token_ids}
        self._call: CallCapture | None = None
        self.decisions: Decisions | None = None  # the last prefill's selections
        self.replaying: Decisions | None = None  # set by Patch.replay()
        self._auto_replay = False  # `replaying` was set for one step of a cache-free generate()
        self.plan = self._make_plan()

    # ------------------------------------------------------------------------------------------ set-up
    def _make_plan(self) -> Plan:
        if is_passthrough(self.keep):
            return Plan()
        plan = self.policy.plan(self.info, self.keep)
        n_llm, n_vis = self.info.n_llm_layers, self.info.n_vision_layers
        if (plan.llm_layers or plan.decode) and self.info.attn_implementation not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"attn_implementation={self.info.attn_implementation!r} is not supported by in-LLM stages; "
                f"load the model with one of {list(SUPPORTED_ATTENTION)}"
            )
        for layer in plan.llm_layers:
            if not 0 < layer < n_llm:
                raise TokenzipError(f"{self.policy.name}: LLM stage layer {layer} is outside 1..{n_llm - 1}")
        for sig in plan.llm_signals:
            if not 0 <= sig.layer < n_llm:
                raise TokenzipError(f"{self.policy.name}: LLM signal layer {sig.layer} is outside 0..{n_llm - 1}")
        if plan.vision_layer is not None:
            if not self.info.supports_vision_stage:
                raise UnsupportedModelError(
                    f"{self.policy.name}: a vision-tower stage is not supported on {self.info.family} "
                    "(its features are windowed/merged or resampled after the tower); use a pre_llm stage"
                )
            feature_layer = self.info.vision_feature_layer
            if not 0 <= plan.vision_layer <= (feature_layer if feature_layer is not None else n_vis - 1):
                raise TokenzipError(
                    f"{self.policy.name}: vision stage layer {plan.vision_layer} must lie in 0..{feature_layer} "
                    "(at or before the feature layer)"
                )
        for sig in plan.vision_signals:
            if not 0 <= sig.layer < n_vis:
                raise TokenzipError(f"{self.policy.name}: vision signal layer {sig.layer} is outside 0..{n_vis - 1}")
            if sig.kind == "cls" and not self.info.vision_has_cls:
                raise UnsupportedModelError(f"{self.info.family}'s vision tower has no CLS token ('cls' signal)")
            if sig.kind not in ("cls", "received", "keys"):
                raise TokenzipError(f"unknown vision signal {sig.kind!r}; known: received, cls, keys")
        if plan.projector_input and not self.info.supports_projector_stage:
            raise UnsupportedModelError(
                f"{self.policy.name}: a projector-input stage is not supported on {self.info.family}; use pre_llm"
            )
        return plan

    def install(self) -> None:
        model, adapter, plan = self.model, self.adapter, self.plan
        self.handles.append(model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._top_post, with_kwargs=True))
        self.handles.append(model.register_forward_pre_hook(self._enter_forward))
        self.handles.append(model.register_forward_hook(self._exit_forward, always_call=True))
        for modality, fname in adapter.feature_functions.items():
            self._wrap_feature_function(modality, fname)
        self.handles.append(adapter.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(adapter.lm.register_forward_hook(self._lm_post))
        if plan.llm_layers or plan.decode or plan.noncausal_layers:
            for i, layer in enumerate(adapter.lm_layers):
                self.handles.append(layer.register_forward_pre_hook(_Hook(self, "_layer_hook", i), with_kwargs=True))
        for sig in plan.llm_signals:
            attn = adapter.lm_layers[sig.layer].self_attn
            hook = _Hook(self, "_llm_signal_hook", sig)
            self.handles.append(attn.register_forward_hook(hook, with_kwargs=True))
        for sig in plan.vision_signals:
            attn = adapter.vision_attention(sig.layer)
            hook = _Hook(self, "_vision_signal_hook", sig)
            self.handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        if plan.projector_input:
            feature = adapter.vision_layers[self.info.vision_feature_layer]
            self.handles.append(feature.register_forward_hook(self._feature_layer_hook))
            self.handles.append(adapter.projector.register_forward_pre_hook(self._projector_pre))
            self.handles.append(adapter.projector.register_forward_hook(self._projector_post))
        if plan.vision_layer is not None:
            for i, layer in enumerate(adapter.vision_layers):
                if i >= plan.vision_layer:
                    hook = _Hook(self, "_vision_layer_hook", i)
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
                if previous is _ABSENT:
                    del owner.__dict__[name]
                else:
                    owner.__dict__[name] = previous
        self.wrapped.clear()
        self.state = None
        self._drop_pending()

    def _wrap_feature_function(self, modality: str, fname: str) -> None:
        owner = self.adapter.base
        original = getattr(owner, fname, None)
        if original is None:
            return
        wrapper = _FeatureWrapper(self, modality, original)
        self.wrapped.append((owner, fname, wrapper, owner.__dict__.get(fname, _ABSENT)))
        owner.__dict__[fname] = wrapper

    def _feature_call(self, modality: str, original, args: tuple, kwargs: dict) -> Any:
        """One call of a wrapped feature function: run it with signals captured, then record the call."""
        capture = CallCapture(modality, (args, kwargs))
        self._call = capture
        device = self.adapter.base.device
        _sync(device)
        start = time.perf_counter()
        try:
            out = original(*args, **kwargs)
        finally:
            self._call = None
        _sync(device)
        capture.call_seconds = time.perf_counter() - start
        self._record_call(capture, original, out)
        return out

    def _enter_forward(self, module, args) -> None:
        self._in_forward = True

    def _exit_forward(self, module, args, output) -> None:
        self._in_forward = False  # `always_call`: also when the forward raised

    # ------------------------------------------------------------------------------------------ vision side
    def _record_call(self, capture: CallCapture, original, out) -> None:
        args, kwargs = capture.arguments
        arguments = Adapter.bind(original, args, kwargs)
        stage = capture.stage
        shapes = self.adapter.item_shapes(capture.modality, arguments, out, check=stage is None)
        call = VisionCall(
            capture.modality,
            arguments,
            shapes,
            capture.signals,
            seconds=capture.seconds,
            call_seconds=capture.call_seconds,
            kept_rows=capture.kept_rows,
            projector_rows=capture.projector_rows,
        )
        strategy = arguments.get("vision_feature_select_strategy") or getattr(
            self.model.config, "vision_feature_select_strategy", "full"
        )
        dropped = 1 if strategy == "default" else 0
        if stage is not None:
            full, available = expand_features(list(out.pooler_output), stage.slots, stage.valid, shapes, dropped)
            out.pooler_output = type(out.pooler_output)(full) if isinstance(out.pooler_output, tuple) else full
            call.available = available
            call.vision_groups = [self._vision_groups(capture, shape, dropped) for shape in shapes]
        if capture.projected is not None:
            call.overrides = [
                Selection(
                    (capture.projected_reps[shape.vision_rows[0]] - dropped).clamp_min(0),
                    capture.projected[shape.vision_rows[0]],
                    ordered=True,
                    groups=_item_groups(capture.projector_rows[shape.vision_rows[0]].groups, dropped),
                )
                for shape in shapes
            ]
        call.workload = self._workload(capture, arguments, shapes, dropped)
        try:
            call.output_ref = weakref.ref(out)
        except TypeError:  # an output type without weak references: no reuse across cache-free steps
            call.output_ref = None
        # the shapes are recorded: hold no pixels (a record lives until the next forward)
        call.arguments = {k: v for k, v in arguments.items() if not k.startswith("pixel_values")}
        if self._in_forward:
            self.pending[capture.modality].append(call)
        else:  # a direct call (or generate() encoding before its first forward): the next forward uses only the
            self.pending[capture.modality][:] = [call]  # latest call per modality, so hold only that one

    def _vision_groups(self, capture: CallCapture, shape, dropped: int) -> torch.Tensor | None:
        """The merges [2, m] a vision-stage selection recorded for a single-row item, as item-local indices."""
        start, end = shape.vision_rows
        if end - start != 1 or not capture.kept_rows or capture.kept_rows[start].groups is None:
            return None
        return _item_groups(capture.kept_rows[start].groups + int(self.info.vision_has_cls), dropped)

    def _workload(self, capture: CallCapture, arguments, shapes, dropped: int) -> dict:
        """What the vision side computed in one feature call (for FLOP accounting)."""
        if self.adapter.vision_kind == "qwen":
            key = "image_grid_thw" if capture.modality == "image" else "video_grid_thw"
            return {"qwen_grids": [tuple(g) for g in torch.as_tensor(arguments[key]).tolist()]}
        rows = max(shape.vision_rows[1] for shape in shapes)
        vcfg = self.model.config.vision_config
        tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + int(self.info.vision_has_cls)
        widths = [tokens] * self.info.n_vision_layers
        if capture.stage is not None:
            width = capture.stage.slots.shape[1]
            widths = [tokens] * self.plan.vision_layer + [width] * (self.info.n_vision_layers - self.plan.vision_layer)
        per_row = widths[self.info.vision_feature_layer] if self.info.vision_feature_layer is not None else widths[-1]
        per_row -= dropped
        if capture.projected_reps is not None:
            per_row = max(int(r.numel()) for r in capture.projected_reps)
        return {"vision_rows": rows, "vision_widths": widths, "projector_tokens": rows * per_row}

    def _vision_signal_hook(self, sig):
        kind = self.adapter.vision_kind

        def hook(module, args, kwargs):
            capture = self._call
            if capture is None or self.replaying is not None:  # a replay reuses decisions: no scoring
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            _sync(hidden.device)
            start = time.perf_counter()
            where, what = f"vision layer {sig.layer}", f"vision signal {sig.kind!r}"
            require_finite(hidden, self.policy.name, where, f"input (hidden states) of the {what}")
            with policy_work():
                if kind == "qwen":
                    if sig.kind == "keys":
                        scores = qwen_vision_head_mean_keys(module, hidden)
                    else:
                        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
                        scores = qwen_vision_attention_received(
                            module, hidden, cu, kwargs["position_embeddings"], score_dtype=sig.score_dtype
                        )
                else:
                    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
                    if sig.kind == "cls":
                        scores = encoder_attention_rows(module, hidden, slice(0, 1), mask, sig.score_dtype)[:, 0]
                    elif sig.kind == "keys":
                        scores = encoder_head_mean_keys(module, hidden)
                    else:
                        scores = encoder_attention_received(module, hidden, mask, score_dtype=sig.score_dtype)
                require_finite(scores, self.policy.name, where, what)
                if kind != "qwen" and capture.stage is not None:
                    scores = scatter_signal(scores, capture.stage.slots, capture.stage.valid, capture.stage.full_length)
            capture.signals[sig.key] = scores
            _sync(hidden.device)
            capture.seconds += time.perf_counter() - start
            return None

        return hook

    def _vision_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            capture = self._call
            if capture is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == self.plan.vision_layer:
                _sync(hidden.device)
                start = time.perf_counter()
                pixels = capture.arguments[1].get(
                    "pixel_values", capture.arguments[0][0] if capture.arguments[0] else None
                )
                keys = [_pixel_key(p) for p in pixels] if pixels is not None else list(range(hidden.shape[0]))
                has_cls = self.info.vision_has_cls
                require_finite(hidden, self.policy.name, f"the vision stage (vision layer {index})", "hidden states")
                ctx = VisionStageContext(index, hidden, has_cls, self.keep, keys)
                if self.replaying is not None:
                    selections = self._replayed_vision(capture.modality, hidden.shape[0])
                else:
                    with policy_work():
                        selections = [
                            s if isinstance(s, Selection) else Selection(s) for s in self.policy.select_vision(ctx)
                        ]
                capture.kept_rows = selections
                offset = int(has_cls)
                rows, values = [], []
                for r, sel in enumerate(selections):
                    keep = sel.keep.to(hidden.device).long() + offset
                    vals = hidden[r, keep] if sel.values is None else sel.values.to(hidden.device, hidden.dtype)
                    if not sel.ordered:
                        keep, order = torch.sort(keep)
                        vals = vals[order]
                    if has_cls:  # CLS stays first and unchanged
                        keep = torch.cat([torch.zeros(1, dtype=torch.long, device=hidden.device), keep])
                        vals = torch.cat([hidden[r, :1], vals])
                    rows.append(keep)
                    values.append(vals)
                hidden, slots, valid = pad_rows(hidden, rows, values)
                mask = encoder_padding_mask(valid, self.info.attn_implementation, hidden.dtype)
                capture.stage = VisionStageState(
                    slots, valid, mask, full_length=args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
                )
                _sync(hidden.device)
                capture.seconds += time.perf_counter() - start
            stage = capture.stage
            if stage is None:
                return None
            if args:
                args = (hidden, stage.mask, *args[2:])
            else:
                kwargs["hidden_states"] = hidden
                kwargs["attention_mask"] = stage.mask
            return args, kwargs

        return hook

    def _feature_layer_hook(self, module, args, output):
        capture = self._call
        if capture is not None:
            capture.feature_out = output[0] if isinstance(output, tuple) else output
        return None

    def _projector_pre(self, module, args):
        capture = self._call
        if capture is None or capture.feature_out is None:
            return None
        features = args[0]
        hidden = capture.feature_out
        _sync(hidden.device)
        start = time.perf_counter()
        require_finite(hidden, self.policy.name, "the projector-input stage", "vision features")
        pixels = capture.arguments[1].get("pixel_values", capture.arguments[0][0] if capture.arguments[0] else None)
        keys = [_pixel_key(p) for p in pixels] if pixels is not None else list(range(hidden.shape[0]))
        if self.replaying is not None:
            selections = self._replayed_projector(capture.modality, hidden.shape[0])
        else:
            ctx = ProjectorInputContext(hidden, dict(capture.signals), self.keep, keys, self.info.vision_has_cls)
            with policy_work():
                selections = self.policy.select_projector_input(ctx)
        capture.projector_rows = list(selections)
        rows, reps = [], []
        for r, sel in enumerate(selections):
            keep = sel.keep.to(hidden.device).long()
            values = hidden[r, keep] if sel.values is None else sel.values.to(hidden.device, hidden.dtype)
            if not sel.ordered:
                keep, order = torch.sort(keep)
                values = values[order]
            rows.append(values)
            reps.append(keep.cpu())
        width = max(v.shape[0] for v in rows)
        padded = hidden.new_zeros(len(rows), width, hidden.shape[-1])
        for r, values in enumerate(rows):
            padded[r, : values.shape[0]] = values
        capture.projected_reps = reps
        capture.projector_shape = (features.shape[0], features.shape[1])
        _sync(hidden.device)
        capture.seconds += time.perf_counter() - start
        return (padded, *args[1:])

    def _projector_post(self, module, args, output):
        capture = self._call
        if capture is None or capture.projected_reps is None:
            return None
        capture.projected = [output[r, : reps.numel()] for r, reps in enumerate(capture.projected_reps)]
        rows, length = capture.projector_shape
        return output.new_zeros(rows, length, output.shape[-1])  # the model's own count; replaced at the LLM input

    def _replayed_vision(self, modality: str, rows: int) -> list[Selection]:
        return self._replayed_call(self.replaying.vision, modality, rows)

    def _replayed_projector(self, modality: str, rows: int) -> list[Selection]:
        return self._replayed_call(self.replaying.projector, modality, rows)

    def _replayed_call(self, recorded: dict, modality: str, rows: int) -> list[Selection]:
        """The recorded per-row selections of this feature call (calls are matched by their order)."""
        calls = recorded.get(modality, [])
        index = len(self.pending[modality])
        if index >= len(calls) or len(calls[index]) != rows:
            raise UnsupportedInputError("replay: this prefill's images differ from the recorded prefill's")
        return calls[index]

    # ------------------------------------------------------------------------------------------ top level
    def _top_pre(self, module, args, kwargs):
        cache = _cache_argument(kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        prefill = cache is None or cache.get_seq_length() == 0
        if self._auto_replay:  # left over from the previous forward of a cache-free generate()
            self.replaying, self._auto_replay = None, False
        if not self.plan.is_empty and cache is not None and not isinstance(cache, DynamicCache):
            self._drop_pending()
            raise UnsupportedInputError(
                f"policy {self.policy.name!r} shortens the prompt (and may give layers different KV lengths), "
                f"which a {type(cache).__name__} cannot hold; use the default DynamicCache (do not set "
                "cache_implementation)"
            )
        if prefill:
            previous = self.state
            encoded = kwargs.get("mm_encoder_outputs")
            reused = False
            if encoded is None:
                self._drop_pending()
            else:  # generate() encoded each modality with one feature call just before this forward
                for modality, calls in self.pending.items():
                    del calls[: -1 if encoded.get(modality) is not None else len(calls)]
                reused = self._reuse_encoded(previous, encoded)
            self.state = ForwardState(
                input_ids=input_ids,
                attention_mask=kwargs.get("attention_mask"),
                user_positions=kwargs.get("position_ids") is not None,
                labels=kwargs.get("labels") is not None,
                serial=next(_PREFILLS),
            )
            if reused and self.replaying is None and self._extends(previous, input_ids):
                # generate(use_cache=False) re-runs the whole sequence each step with the first step's encoder
                # outputs: replay that step's selections so that it equals cached generation (see Patch.replay)
                self.replaying, self._auto_replay = self.decisions, True
            return None
        serial = getattr(cache, "_tokenzip_serial", None)
        st = self.state
        if serial is not None and (st is None or st.serial != serial):
            self._drop_pending()
            raise UnsupportedInputError(
                "this KV cache holds a compressed prefill that is not this patch's latest one (tokenzip keeps the "
                "token layout of the latest prefill only, and its layers hold fewer entries than tokens); continue "
                "from a returned cache (or a copy of it) before the next prefill of the model, or run generate() "
                "again on the full sequence with its images"
            )
        if st is not None and st.active:
            st.phase = "decode"
            st.user_positions = kwargs.get("position_ids") is not None
            if _has_media(kwargs):
                self._drop_pending()
                raise UnsupportedInputError(
                    "new image/video inputs arrived after prefill, with a non-empty KV cache (a continued generation); "
                    "tokenzip compresses images only in a fresh prefill: continue with text-only tokens, or start a "
                    "new generate() on the full sequence without a passed cache"
                )
        return None

    def _reuse_encoded(self, previous: ForwardState | None, encoded: dict) -> bool:
        """generate() without a cache passes the same `mm_encoder_outputs` to every step: queue again the feature
        calls the previous prefill recorded for them. True if every encoded modality was such a repeat."""
        if previous is None:
            return False
        again: dict[str, list[VisionCall]] = {}
        for modality, out in encoded.items():
            if out is None or modality not in self.pending:
                continue
            if self.pending[modality]:
                return False  # a fresh feature call: a new prompt
            match = [c for c in previous.calls if c.modality == modality and c.output_ref is not None]
            match = [c for c in match if c.output_ref() is out]
            if not match:
                return False
            again[modality] = match[-1:]
        for modality, calls in again.items():
            self.pending[modality].extend(calls)
        return bool(again)

    def _extends(self, previous: ForwardState | None, input_ids: torch.Tensor | None) -> bool:
        """Whether `input_ids` [B, L] continue the recorded prompt (same batch, recorded prompt as prefix)."""
        rec = self.decisions
        if previous is None or not previous.active or rec is None or input_ids is None:
            return False
        first = previous.input_ids
        if first is None or input_ids.shape[0] != rec.batch or input_ids.shape[1] < first.shape[1]:
            return False
        return bool(torch.equal(input_ids[:, : first.shape[1]].to(first.device), first))

    def _drop_pending(self) -> None:
        for calls in self.pending.values():
            calls.clear()

    def _top_post(self, module, args, kwargs, output):
        st = self.state
        try:
            if st is None or st.phase != "prefill":
                return None
            processed = list(st.layer_layouts)
            cache = _cache_output(output)
            if st.active and self.plan.decode and (cache is not None or self.replaying is None):
                self._decode_stage(cache)  # without a cache: only records the decisions (for replay)
            if st.active and not self.plan.is_empty and isinstance(cache, DynamicCache):
                _mark_cache(cache, st.serial, [st.orig_len - lay.length for lay in st.layer_layouts])
            if st.layout0 is not None:
                self._record_stats(st, processed)
            st.phase = "decode"
            return None
        finally:
            if self._auto_replay:
                self.replaying, self._auto_replay = None, False

    # ------------------------------------------------------------------------------------------ LLM input
    def _lm_pre(self, module, args, kwargs):
        st = self.state
        if st is None:
            return None
        if st.phase == "prefill":
            out = self._prefill_lm(kwargs)
        elif st.active and (st.rebuilt or self.plan.decode or self.plan.llm_layers):
            out = self._decode_lm(kwargs)
        else:
            out = None
        return None if out is None else (args, out)

    def _lm_post(self, module, args, output):
        """Prefill of a right-padded batch: lay the LLM's output out right-padded too (each sample's real tokens
        first, in order), as the unpatched model returns it; tokenzip's shortened layouts are left-padded inside.
        Sample b's last real token is then at slot `stats.last.samples[b].sequence_per_layer[-1] - 1`."""
        st = self.state
        if st is None or st.phase != "prefill" or not st.active or not st.right_padded or st.current is None:
            return None
        valid = st.current.valid
        order = torch.sort((~valid).long(), dim=1, stable=True).indices  # [B, L'] real slots first
        if bool((order == torch.arange(valid.shape[1], device=order.device)).all()):
            return None
        hidden = output[0]
        relaid = gather_seq(hidden, order.to(hidden.device), dim=1)
        if isinstance(output, tuple):
            return (relaid, *output[1:])
        output.last_hidden_state = relaid
        return output

    def _flat_calls(self, calls, input_ids: torch.Tensor) -> dict[str, list[tuple[VisionCall, int]]]:
        """Per modality, (call, item) references in the order the model scatters features.

        `generate` with num_beams / num_return_sequences > 1 repeats every sample k times after the features
        were computed (and recorded); the references are repeated to match.
        """
        flat = {m: [(c, j) for c in cs for j in range(len(c.shapes))] for m, cs in calls.items()}
        for modality, entries in flat.items():
            token = self.adapter.token_ids[modality]
            n_placeholders = int((input_ids == token).sum())
            total = sum(c.shapes[j].length for c, j in entries)
            if not entries or n_placeholders == total or n_placeholders % total:
                continue
            k = n_placeholders // total
            batch = input_ids.shape[0]
            if batch % k or not all(torch.equal(input_ids[b], input_ids[b - b % k]) for b in range(batch)):
                continue  # not generate's expansion: locate_items reports the mismatch
            expanded, cursor = [], 0
            for b in range(0, batch, k):
                need, group = int((input_ids[b] == token).sum()), []
                while need > 0 and cursor < len(entries):
                    group.append(entries[cursor])
                    need -= entries[cursor][0].shapes[entries[cursor][1]].length
                    cursor += 1
                expanded += group * k
            flat[modality] = expanded
        return flat

    def _collect_items(self, st: ForwardState, flat) -> ItemsOfBatch:
        shapes = {m: [c.shapes[j] for c, j in entries] for m, entries in flat.items()}
        if st.input_ids is None:
            if any(shapes.values()):
                warnings.warn(
                    "tokenzip: the model was called with inputs_embeds and no input_ids, so image tokens cannot "
                    "be located; this forward runs uncompressed",
                    stacklevel=3,
                )
            return ItemsOfBatch()
        present = {m: bool((st.input_ids == t).any()) for m, t in self.adapter.token_ids.items()}
        for modality, has in present.items():
            if has and not shapes[modality]:
                raise UnsupportedInputError(
                    f"the prompt has {modality} tokens but tokenzip saw no {modality} features being computed "
                    "(pre-computed mm_encoder_outputs are not supported); pass pixel values to the model"
                )
        used = {m: s for m, s in shapes.items() if present[m]}
        return locate_items(st.input_ids, self.adapter.token_ids, used)

    def _prefill_lm(self, kwargs):
        st = self.state
        embeds = kwargs["inputs_embeds"]
        batch, length, _ = embeds.shape
        calls = {m: list(c) for m, c in self.pending.items()}
        for c in self.pending.values():
            c.clear()
        st.calls = [c for cs in calls.values() for c in cs]
        flat = self._flat_calls(calls, st.input_ids) if st.input_ids is not None else {}
        st.items = self._collect_items(st, flat)
        vision_calls = [c for cs in calls.values() for c in cs]
        inside = sum(c.seconds for c in vision_calls)
        st.seconds["vision_encoder"] = sum(c.call_seconds for c in vision_calls) - inside
        st.seconds["vision_stage"] = inside
        if not st.items:
            return None
        st.active = True
        device = embeds.device
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and (not isinstance(mask2d, torch.Tensor) or mask2d.dim() != 2):
            raise UnsupportedInputError("tokenzip needs a 2-D attention_mask (or None) at the LLM input")
        valid = mask2d.bool() if mask2d is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        st.right_padded = bool((~valid[:, -1]).any())
        pos = kwargs.get("position_ids")
        if pos is None:
            pos_rows = torch.arange(length, device=device)[None, None].expand(1, batch, length)
        else:
            pos_rows = pos.unsqueeze(0) if pos.dim() == 2 else pos
        visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
        item_id = torch.full((batch, length), -1, dtype=torch.long, device=device)
        for it in st.items.all:
            visual[it.sample, it.span] = it.shape.content_mask().to(device)
            item_id[it.sample, it.span] = it.index_in_sample
        arange = torch.arange(length, device=device).expand(batch, -1)
        orig = Layout(arange, arange, arange, valid.to(device), visual, item_id, pos_rows)
        st.orig_len = length
        st.orig_last_pos = pos_rows[0, :, -1].clone()

        self._new_decisions(st, batch, length, calls)
        signals = self._item_signals(flat) if self.plan.vision_signals else {}
        st.item_signals = {
            (b, j): signals.get((it.modality, it.index_in_modality), {})
            for b, items in enumerate(st.items.per_sample)
            for j, it in enumerate(items)
        }
        available = self._per_item(flat, "available")
        vision_groups = self._per_item(flat, "vision_groups")
        overrides = self._per_item(flat, "overrides")
        pruned_in_tower = any(a is not None for a in available.values()) or bool(overrides)
        if not (self.plan.pre_llm or pruned_in_tower):
            st.layout0 = orig
            st.item_kept = [[(torch.arange(it.length), 0, None, None) for it in items] for items in st.items.per_sample]
            self._start_layers(st)
            return None

        _sync(device)
        start = time.perf_counter()
        keep_lists, writes, item_kept, annotations = [], [], [], []
        replay = self.replaying.pre_llm if self.replaying is not None else None
        for b, items in enumerate(st.items.per_sample):
            selections = []
            vision_left = []
            for j, it in enumerate(items):
                avail = available.get((it.modality, it.index_in_modality))
                vision_left.append((avail, vision_groups.get((it.modality, it.index_in_modality))))
                avail = torch.arange(it.length) if avail is None else avail
                if replay is not None:
                    sel = replay[b][j]
                elif (it.modality, it.index_in_modality) in overrides:
                    sel = overrides[(it.modality, it.index_in_modality)]
                elif self.plan.pre_llm:
                    ctx = PreLLMItem(
                        it,
                        embeds[b, it.span],
                        avail,
                        self.keep,
                        signals.get((it.modality, it.index_in_modality), {}),
                        embeds[b, it.start - 1] if it.start > 0 else None,
                        batch=st.items,
                    )
                    what = f"features of sample {b}'s {it.modality} {it.index_in_sample}"
                    require_finite(ctx.embeds, self.policy.name, "the pre_llm stage", what)
                    with policy_work():
                        sel = self.policy.select_pre_llm(ctx)
                else:
                    sel = Selection(avail, ordered=True)  # the order a vision stage emitted them
                selections.append(sel)
            if self.decisions is not None and replay is None:
                self.decisions.pre_llm = (self.decisions.pre_llm or []) + [selections]
            kept, over, annotation = compose_prompt(valid[b], items, selections)
            keep_lists.append(kept)
            writes.append(over)
            annotations.append(annotation)
            item_kept.append(
                [_kept_record(sel, it, *v) for sel, it, v in zip(selections, items, vision_left, strict=True)]
            )
        layout0, index = take(orig, keep_lists)
        self._refuse_labels(orig, layout0, "at the LLM input")
        layout0.lm_src = torch.arange(layout0.length, device=device).expand(batch, -1)  # it *is* the LLM input
        if self.positions == "compact":
            layout0.positions = compact_positions(layout0, first_positions(pos_rows, valid))
        if any(a is not None for a in annotations):
            layout0.annotation = torch.full(layout0.valid.shape, float("nan"), device=device)
            for b, values in enumerate(annotations):
                if values is not None:
                    layout0.annotation[b, layout0.length - values.numel() :] = values.to(device)
        new_embeds = gather_hidden(embeds, index, layout0.valid)
        width = layout0.length
        for b, over in enumerate(writes):
            pad = width - int(keep_lists[b].numel())
            for offset, count, values in over:
                new_embeds[b, pad + offset : pad + offset + count] = values.to(new_embeds.dtype)
        _sync(device)
        st.seconds["pre_llm"] = time.perf_counter() - start
        st.layout0, st.rebuilt, st.item_kept = layout0, True, item_kept
        kwargs["inputs_embeds"] = new_embeds
        kwargs["attention_mask"] = layout0.valid.long()
        kwargs["position_ids"] = layout0.positions[0] if (pos is None or pos.dim() == 2) else layout0.positions
        self._start_layers(st)
        return kwargs

    def _refuse_labels(self, before: Layout, after: Layout, where: str) -> None:
        """A forward with `labels` must not shorten its sequence: the model's loss aligns the labels [B, L] with
        the logits position by position, and the logits would cover fewer positions."""
        if not self.state.labels:
            return
        if after.length == before.length and torch.equal(after.valid.sum(1), before.valid.sum(1)):
            return
        raise UnsupportedInputError(
            f"labels= was passed, but policy {self.policy.name!r} (keep={self.keep!r}) removes tokens {where}, so "
            "the logits no longer line up with labels, which follow the unpruned sequence; call the model without "
            "labels and compute the loss from the logits yourself (e.g. for the text positions after the image), "
            "or use keep=1.0"
        )

    def _new_decisions(self, st: ForwardState, batch: int, length: int, calls) -> None:
        if self.replaying is not None:
            rec = self.replaying
            if rec.batch != batch or length < rec.prompt_len:
                raise UnsupportedInputError(
                    f"replay: the recorded prefill had batch {rec.batch} and prompt length {rec.prompt_len}; this "
                    f"one has batch {batch} and length {length} (replay needs the same prompts, possibly extended)"
                )
            return
        vision = {m: [c.kept_rows for c in cs if c.kept_rows is not None] for m, cs in calls.items()}
        projector = {m: [c.projector_rows for c in cs if c.projector_rows is not None] for m, cs in calls.items()}
        self.decisions = Decisions(batch=batch, prompt_len=length, vision=vision, projector=projector)

    def _start_layers(self, st: ForwardState) -> None:
        st.current = st.layout0
        st.layer_layouts = [st.layout0] * self.info.n_llm_layers

    @staticmethod
    def _per_item(flat, field: str) -> dict[tuple[str, int], Any]:
        """(modality, index in modality) -> the item's entry of the per-item list `VisionCall.<field>`
        (`available`, `vision_groups` or `overrides`); items of calls whose list is None are left out."""
        return {
            (m, k): getattr(call, field)[j]
            for m, entries in flat.items()
            for k, (call, j) in enumerate(entries)
            if getattr(call, field) is not None
        }

    def _item_signals(self, flat) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
        mapped: dict[int, dict[str, list[torch.Tensor]]] = {}
        out: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for modality, entries in flat.items():
            for k, (call, j) in enumerate(entries):
                if id(call) not in mapped:
                    mapped[id(call)] = {
                        key: self.adapter.vision_scores_to_items(modality, raw, call.shapes, call.arguments)
                        for key, raw in call.signals.items()
                    }
                out[(modality, k)] = {key: vals[j] for key, vals in mapped[id(call)].items()}
        return out

    def _sample_keys(self) -> list[int]:
        """One stable int per sample: a checksum of its real prompt tokens."""
        import zlib

        st = self.state
        ids = st.input_ids.detach().cpu()
        valid = st.layout0 is not None
        keys = []
        for b in range(ids.shape[0]):
            row = ids[b]
            if st.attention_mask is not None and isinstance(st.attention_mask, torch.Tensor):
                row = row[st.attention_mask[b].bool().cpu()]
            keys.append(zlib.crc32(row.numpy().tobytes()) if valid else b)
        return keys

    def _shift(self, layout: Layout) -> torch.Tensor:
        """Per sample: original-frame next position minus this layout's next position (0 unless compact)."""
        return self.state.orig_last_pos - layout.positions[0, :, -1]

    def _appended(self, kwargs) -> int:
        """Tokens already appended to the KV cache after the prompt, read from layer 0's cache (its prefill width
        is known): the cache is the truth after `generate()` cropped rejected draft tokens (prompt lookup /
        assisted decoding) or when a generation continues from a returned cache."""
        st = self.state
        cache = _cache_argument(kwargs)
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

    def _decode_lm(self, kwargs):
        st = self.state
        embeds = kwargs["inputs_embeds"]
        batch, q = embeds.shape[0], embeds.shape[1]
        t = self._appended(kwargs)
        st.decoded = t + q
        st.step += 1
        st.step_cache = {}
        mask = kwargs.get("attention_mask")
        if mask is None:
            tail = torch.ones(batch, t + q, dtype=torch.bool, device=embeds.device)
            new_mask = None if bool(st.layout0.valid.all()) else torch.cat([st.layout0.valid.long(), tail.long()], 1)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] != st.orig_len + t + q:
                raise UnsupportedInputError(
                    f"decode attention_mask has {mask.shape[1]} columns; expected prompt length {st.orig_len} + "
                    f"{t + q} new tokens (extend the prompt's 2-D mask by one column per generated token)"
                )
            tail = mask[:, st.orig_len :].bool()
            new_mask = torch.cat([st.layout0.valid.long(), mask[:, st.orig_len :].long()], 1)
        else:
            raise UnsupportedInputError("tokenzip needs a 2-D attention_mask (or None) during decoding")
        st.tail = tail
        pos = kwargs.get("position_ids")
        rows = st.layout0.positions.shape[0]
        steps = torch.arange(t, t + q, device=embeds.device)
        if not st.user_positions or pos is None:
            base = self.state.orig_last_pos.to(embeds.device)[:, None] + 1 + steps[None]  # [B, q] original frame
            if rows == 1:
                lm_pos = base.unsqueeze(0)
            else:
                last = st.layout0.positions[..., -1]  # M-RoPE rows: continue each row from the last prompt token
                lm_pos = last[..., None] + 1 + steps[None, None]
        else:
            lm_pos = pos.unsqueeze(0) if pos.dim() == 2 else pos
        st.lm_positions = lm_pos
        shift = self._shift(st.layout0).to(embeds.device)
        new_pos = lm_pos - shift[None, :, None] if rows == 1 else lm_pos
        if not (st.rebuilt or self.plan.decode):
            return None  # the LLM input is the original sequence: its own mask and positions are right
        if st.rebuilt:
            kwargs["attention_mask"] = new_mask
        kwargs["position_ids"] = new_pos[0] if rows == 1 else new_pos
        return kwargs

    # ------------------------------------------------------------------------------------------ decoder layers
    def _stage_kwargs(self, layout: Layout, kwargs, hidden: torch.Tensor) -> dict:
        """position_embeddings / position_ids / mask for layers running on `layout` in prefill (cached)."""
        if "prefill" in layout.cache:
            return layout.cache["prefill"]
        cos, sin = kwargs["position_embeddings"]
        if self.positions == "compact":
            pos = layout.positions[0]
            cos, sin = self.adapter.rotary_emb(hidden, pos)
            pos_ids = pos if kwargs.get("position_ids") is not None else None
        else:
            cos, sin = gather_seq(cos, layout.lm_src), gather_seq(sin, layout.lm_src)
            pid = kwargs.get("position_ids")
            pos_ids = gather_seq(pid, layout.lm_src) if pid is not None else None
        out = {
            "position_embeddings": (cos, sin),
            "position_ids": pos_ids,
            "attention_mask": prefill_mask(layout.valid, self.info.attn_implementation, hidden.dtype),
        }
        layout.cache["prefill"] = out
        return out

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            st = self.state
            if st is None or not st.active or st.layout0 is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if st.phase == "prefill":
                if index in self.plan.llm_layers:
                    hidden = self._llm_stage(index, module, hidden, kwargs)
                layout = st.current
                st.layer_layouts[index] = layout
                evict = self.replaying is not None and index in self.replaying.decode
                if index in self.plan.noncausal_layers:
                    if layout is not st.layout0:
                        kwargs.update(self._stage_kwargs(layout, kwargs, hidden))
                    kwargs["attention_mask"] = self._bidirectional_mask(layout, hidden.dtype)
                    return ((hidden, *args[1:]) if args else args), kwargs
                if layout is st.layout0 and not evict:
                    return None
                if layout is not st.layout0:
                    kwargs.update(self._stage_kwargs(layout, kwargs, hidden))
                if evict:
                    kwargs["attention_mask"] = self._eviction_mask(layout, index, hidden.dtype)
                    if self.positions == "compact" and self.policy.decode_positions(self.info) == "cache_length":
                        kwargs.update(self._eviction_positions(layout, index, hidden))
            else:
                layout = st.layer_layouts[index]
                if layout is st.layout0:
                    return None
                kwargs.update(self._decode_kwargs(layout, hidden))
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _eviction_mask(self, layout: Layout, index: int, dtype: torch.dtype):
        """Replay of a decode-stage KV edit in a cache-free prefill: tokens after the recorded prompt (the
        generated ones) cannot see the visual tokens that the edit evicted from layer `index`'s cache."""
        key = ("evict", index)
        if key in layout.cache:
            return layout.cache[key]
        rec = self.replaying
        evicted = layout.valid & layout.visual
        for b, kept in enumerate(rec.decode[index]):
            evicted[b] &= ~torch.isin(layout.lm_src[b], kept.to(layout.lm_src.device))
        late = layout.orig >= rec.prompt_len  # [B, L] queries generated after the recorded prompt
        n = layout.length
        keep = torch.ones(n, n, dtype=torch.bool, device=layout.valid.device).tril()[None] & layout.valid[:, None, :]
        keep &= ~(late[:, :, None] & evicted[:, None, :])
        keep |= torch.eye(n, dtype=torch.bool, device=keep.device)[None] & ~layout.valid[:, :, None]
        impl = self.info.attn_implementation
        if impl.startswith("flash"):
            raise UnsupportedInputError("replaying a decode-stage edit needs a 4-D mask: use sdpa or eager")
        mask = keep.unsqueeze(1)
        if impl == "eager":
            mask = torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
        layout.cache[key] = mask
        return mask

    def _bidirectional_mask(self, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
        """Prefill mask without causality (padding keys hidden) for a layer that attends both ways."""
        if self.info.attn_implementation.startswith("flash"):
            raise UnsupportedInputError("a bidirectional layer needs a 4-D mask: use sdpa or eager")
        n = layout.length
        keep = layout.valid[:, None, None, :].expand(-1, 1, n, -1)
        keep = keep | torch.eye(n, dtype=torch.bool, device=keep.device)[None, None]
        if self.info.attn_implementation == "eager":
            return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), torch.finfo(dtype).min)
        return keep

    def _eviction_positions(self, layout: Layout, index: int, hidden: torch.Tensor) -> dict:
        """Replay of the 'own cache length' decode positions: generated tokens in an edited layer continue
        from the number of prompt tokens the edit kept."""
        key = ("evict-pos", index)
        if key not in layout.cache:
            rec = self.replaying
            late = layout.orig >= rec.prompt_len
            kept = layout.valid & ~late
            visual = kept & layout.visual
            for b, slots in enumerate(rec.decode[index]):
                kept[b] &= ~visual[b] | torch.isin(layout.lm_src[b], slots.to(layout.lm_src.device))
            start = first_positions(layout.positions, layout.valid)
            late_rank = late.long().cumsum(1) - 1
            pos = torch.where(late, start[:, None] + kept.sum(1, keepdim=True) + late_rank, layout.positions[0])
            layout.cache[key] = {"position_embeddings": self.adapter.rotary_emb(hidden, pos), "position_ids": pos}
        return layout.cache[key]

    def _decode_kwargs(self, layout: Layout, hidden: torch.Tensor) -> dict:
        st = self.state
        key = id(layout)
        if key in st.step_cache:
            return st.step_cache[key]
        q = hidden.shape[1]
        out: dict[str, Any] = {
            "attention_mask": decode_mask(
                layout.valid, st.tail.to(layout.valid.device), q, self.info.attn_implementation, hidden.dtype
            )
        }
        if self.positions == "compact":
            shift = self._shift(layout).to(hidden.device)
            pos = st.lm_positions[0] - shift[:, None]
            out["position_embeddings"] = self.adapter.rotary_emb(hidden, pos)
            out["position_ids"] = pos
        st.step_cache[key] = out
        return out

    def _llm_stage(self, index: int, layer: torch.nn.Module, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        st = self.state
        prev = st.current
        _sync(hidden.device)
        start = time.perf_counter()
        stage_kw = kwargs if prev is st.layout0 else self._stage_kwargs(prev, kwargs, hidden)
        normed_cache: dict[str, torch.Tensor] = {}

        def attention_received(query_mask: torch.Tensor, score_dtype: str = "float32") -> torch.Tensor:
            if "normed" not in normed_cache:
                normed_cache["normed"] = layer.input_layernorm(hidden)
            return decoder_attention_received(
                layer.self_attn,
                normed_cache["normed"],
                stage_kw["position_embeddings"],
                query_mask,
                stage_kw["attention_mask"],
                score_dtype=score_dtype,
            )

        def head_mean_keys() -> torch.Tensor:
            if "normed" not in normed_cache:
                normed_cache["normed"] = layer.input_layernorm(hidden)
            return decoder_head_mean_keys(layer.self_attn, normed_cache["normed"], stage_kw["position_embeddings"])

        prunable = prev.visual | (prev.item >= 0) if self.plan.llm_structural else prev.visual
        if self.replaying is not None:
            selections = [
                self._replayed_selection(prev, prunable, b, *rec) for b, rec in enumerate(self.replaying.llm[index])
            ]
        else:
            real = hidden[prev.valid.to(hidden.device)]  # [n, D] the real tokens (padding slots are never scored)
            require_finite(real, self.policy.name, f"the LLM stage at decoder layer {index}", "hidden states")
            ctx = LLMStageContext(
                index,
                self.info,
                hidden,
                prev,
                st.items,
                self.keep,
                st.signals,
                attention_received,
                self._sample_keys(),
                head_mean_keys,
                st.item_signals,
                st.layout0,
                st.notes.append,
            )
            with policy_work():
                selections = self.policy.select_llm(ctx)
            if self.decisions is not None:
                self.decisions.llm[index] = [
                    (prev.lm_src[b][sel.keep.to(prev.lm_src.device)].cpu(), sel.values, sel.ordered)
                    for b, sel in enumerate(selections)
                ]
        keep_lists, value_lists = [], []
        for b, sel in enumerate(selections):
            kept, values, out_pos = compose_slots(prev.valid[b], prunable[b], prev.item[b], sel)
            keep_lists.append(kept)
            value_lists.append((values, out_pos))
        positions = None
        layout, gather_index = take(prev, keep_lists)
        self._refuse_labels(prev, layout, f"at LLM layer {index}")
        if self.positions == "compact" and not self.plan.llm_keep_positions:
            first = first_positions(prev.positions, prev.valid)
            positions = compact_positions(layout, first)
            layout.positions = positions
        new_hidden = gather_hidden(hidden, gather_index, layout.valid)
        for b, (values, out_pos) in enumerate(value_lists):
            if values is not None:
                pad = layout.length - int(keep_lists[b].numel())
                new_hidden[b, pad + out_pos.to(hidden.device)] = values.to(new_hidden.dtype)
        st.current = layout
        _sync(hidden.device)
        st.seconds[f"llm@{index}"] = time.perf_counter() - start
        return new_hidden

    @staticmethod
    def _replayed_selection(
        layout: Layout, prunable: torch.Tensor, b: int, recorded: torch.Tensor, values, ordered: bool
    ) -> Selection:
        """The slots of `layout` (sample b) holding the recorded LLM-input slots, in recorded order."""
        slots = (layout.valid[b] & prunable[b]).nonzero().flatten()
        if recorded.numel() == 0:  # the sample kept no prunable token (e.g. it has no image)
            return Selection(slots[:0], values, ordered)
        match = layout.lm_src[b][slots][None, :] == recorded.to(slots.device)[:, None]  # [n_rec, n_slots]
        if not bool(match.any(1).all()):
            raise UnsupportedInputError("replay: a recorded token is missing from this prefill")
        return Selection(slots[match.float().argmax(1)], values, ordered)

    def _llm_signal_hook(self, sig):
        def hook(module, args, kwargs, output):
            st = self.state
            if st is None or not st.active or st.phase != "prefill" or self.replaying is not None:
                return None
            hidden = kwargs["hidden_states"]
            _sync(hidden.device)
            start = time.perf_counter()
            where, what = f"decoder layer {sig.layer}", f"LLM signal {sig.kind!r}"
            real = hidden[st.current.valid.to(hidden.device)]  # [n, D] the real tokens
            require_finite(real, self.policy.name, where, f"input (hidden states) of the {what}")
            with policy_work():
                mask = kwargs.get("attention_mask")
                if sig.kind == "last_row":  # each sample's last real token (right padding: not the last slot)
                    valid = st.current.valid.to(hidden.device)
                    last = valid.shape[1] - 1 - valid.flip(1).long().argmax(1)  # [B]
                    rows, which = torch.unique(last, return_inverse=True)
                    part = decoder_attention_rows(
                        module, hidden, kwargs["position_embeddings"], rows, mask, score_dtype=sig.score_dtype
                    )
                    scores = part[torch.arange(hidden.shape[0], device=hidden.device), which]
                elif sig.kind == "rows_from_visual":
                    layout = st.current
                    first = int((layout.visual & layout.valid).float().argmax(1).min())
                    rows = torch.arange(first, hidden.shape[1], device=hidden.device)
                    part = decoder_attention_rows(
                        module, hidden, kwargs["position_embeddings"], rows, mask, score_dtype=sig.score_dtype
                    )
                    scores = part.new_zeros(hidden.shape[0], hidden.shape[1], hidden.shape[1])
                    scores[:, first:] = part
                else:
                    raise TokenzipError(f"unknown LLM signal {sig.kind!r}; known: last_row, rows_from_visual")
                require_finite(scores, self.policy.name, where, what)
            st.signals[sig.key] = scores
            _sync(hidden.device)
            st.seconds["llm_signals"] = st.seconds.get("llm_signals", 0.0) + time.perf_counter() - start
            return None

        return hook

    # ------------------------------------------------------------------------------------------ decode stage
    def _decode_stage(self, cache) -> None:
        """Decode-stage KV edits after prefill. Without a cache (`use_cache=False`) the selections are only
        recorded, so that a replay (or the next step of a cache-free generate()) applies them as masks."""
        st = self.state
        start = time.perf_counter()
        ctx = DecodeContext(
            self.info, list(st.layer_layouts), st.items, self.keep, self._sample_keys(), self.plan.llm_layers
        )
        renumber = self.positions == "compact" and self.policy.decode_positions(self.info) == "cache_length"
        with policy_work():
            edits = self.policy.select_decode(ctx)
        for layer, selections in edits.items():
            prev = st.layer_layouts[layer]
            if self.decisions is not None and self.replaying is None:
                self.decisions.decode[layer] = [
                    prev.lm_src[b][sel.keep.to(prev.lm_src.device)].cpu() for b, sel in enumerate(selections)
                ]
            if cache is None:
                continue
            keep_lists = [
                compose_slots(prev.valid[b], prev.visual[b], prev.item[b], sel)[0] for b, sel in enumerate(selections)
            ]
            layout, index = take(prev, keep_lists)
            if renumber:  # decode positions continue from this layer's own cache length (official MustDrop)
                layout.positions = compact_positions(layout, first_positions(prev.positions, prev.valid))
            cache_layer = cache.layers[layer]
            if not hasattr(cache_layer, "keys"):
                raise UnsupportedInputError(
                    f"cache type {type(cache).__name__} cannot be edited per layer; use DynamicCache"
                )
            idx = index.to(cache_layer.keys.device)[:, None, :, None]
            for name in ("keys", "values"):
                tensor = getattr(cache_layer, name)
                gathered = torch.gather(tensor, 2, idx.expand(-1, tensor.shape[1], -1, tensor.shape[-1]))
                setattr(
                    cache_layer, name, gathered * layout.valid.to(gathered.device)[:, None, :, None].to(gathered.dtype)
                )
            st.layer_layouts[layer] = layout
        st.seconds["decode"] = time.perf_counter() - start

    # ------------------------------------------------------------------------------------------ stats
    def _record_stats(self, st: ForwardState, processed: list[Layout]) -> None:
        from ..budget import item_budget

        samples = []
        layouts = processed or [st.layout0]
        budget_keep = 1.0 if self.policy.name == "none" else self.keep  # `none` is asked to keep everything
        prompt_mask = st.attention_mask
        if isinstance(prompt_mask, torch.Tensor) and prompt_mask.dim() == 2:
            prompt_tokens = prompt_mask.bool().sum(1).tolist()
        else:
            prompt_tokens = [st.orig_len] * len(st.items.per_sample)
        vis = torch.stack([lay.visual_counts() for lay in layouts], 1).tolist()
        seq = torch.stack([lay.valid.sum(1) for lay in layouts], 1).tolist()
        cached = torch.stack([lay.valid.sum(1) for lay in (st.layer_layouts or layouts)], 1).tolist()
        for b, items in enumerate(st.items.per_sample):
            records = []
            for j, it in enumerate(items):
                blank = (torch.arange(it.length), 0, None, None)
                kept_idx, padded, groups, vision_left = st.item_kept[b][j] if st.item_kept else blank
                content = it.shape.content_mask()
                n_content = int(content[kept_idx[kept_idx >= 0]].sum())
                record = ItemRecord(it.modality, it.length, it.shape.n_content, n_content, kept_idx, padded)
                record.shape, record.groups = it.shape, groups
                if vision_left is not None:
                    record.stages.append(("vision", vision_left[content[vision_left]]))
                records.append(record)
            for name, lay in _changed_layouts(layouts, vis[b]):
                for j, it in enumerate(items):
                    mask = lay.valid[b] & lay.visual[b] & (lay.item[b] == j)
                    local = (lay.orig[b][mask] - it.start).cpu()
                    records[j].stages.append((name, local[local >= 0]))
            budget = sum(item_budget(budget_keep, it.shape.n_content) for it in items)
            samples.append(SampleRecord(records, vis[b], seq[b], cached[b], budget, int(prompt_tokens[b])))
        record = ForwardRecord(self.policy.name, self.keep, samples, dict(st.seconds), list(dict.fromkeys(st.notes)))
        record.config = self.model.config
        record.width_per_layer = [lay.length for lay in layouts]
        record.cache_width_per_layer = [lay.length for lay in (st.layer_layouts or layouts)]
        record.vision = [c.workload for c in st.calls if c.workload is not None]
        self.stats.history.append(record)
