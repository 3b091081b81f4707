"""The `Policy` base class: a policy plans its stages for a model and selects tokens at each one.

Options are declared, not hand-checked: a policy lists each option once in `options_spec` as an `Option`
(`Float`, `Int`, `Bool`, `Choice`, `Tuple`) with its default, the values allowed and a one-line description.
`Policy.__init__` (hence `tokenzip.apply`) checks every value against its declaration (type, range, NaN / inf,
tuple length and element types) and raises `PolicyOptionError` naming the option, the value and what is
allowed; `defaults` is derived from the declarations. Checks that relate several options stay in `validate()`,
checks that need the model (a layer index beyond its depth) in `plan()`.

    options_spec = {
        "alpha": Float(0.1, ge=0, doc="anchor share of the budget: k_a = round(K * alpha / 5)"),
        "object_layer": Int(None, ge=1, none=True, doc="1-based vision layer of the anchors; None = per family"),
        "compat": Choice(None, (None, "official", "fixed"), doc="released rules or tokenzip's fixes"),
        "p": Tuple((0.9, 0.75), Float(0.5, gt=0, le=1), min_length=1, doc="one mass per pruning layer"),
        "inner": Bool(True, doc="run the inner merge"),
    }
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..adapters.base import ModelInfo
from ..budget import Keep
from ..contexts import (
    DecodeContext,
    LLMStageContext,
    Plan,
    PreLLMItem,
    ProjectorInputContext,
    Selection,
    VisionStageContext,
)
from ..errors import PolicyOptionError
from ..items import ItemShape
from .nominal import Nominal


@dataclass(frozen=True)
class Option:
    """The declaration of one policy option: default, allowed values, description. Use the constructors
    `Float`, `Int`, `Bool`, `Choice` and `Tuple` rather than this class directly.

    kind: "float" (any real number, stored as float; NaN and +-inf always refused), "int" (an integer, bool
    refused), "bool" (True / False only), "choice" (one of `choices`, compared by type and value, so 1 is not
    True and "1" is not 1) or "tuple" (a tuple or list, stored as a tuple, each element checked by `item`).
    ge / gt / le / lt: bounds of "float" / "int" values. none: None is also allowed (typically "the policy's
    per-model default"). length / min_length / increasing: constraints of a "tuple".
    """

    default: Any
    kind: str
    doc: str = ""
    none: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()
    item: Option | None = None
    length: int | None = None
    min_length: int = 0
    increasing: bool = False

    def allowed(self) -> str:
        """What the option accepts, in words (used in error messages and `Policy.option_help`)."""
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        if self.kind == "bool":
            text = "True or False"
        elif self.kind == "tuple":
            size = f"{self.length} " if self.length is not None else ""
            text = f"a tuple of {size}{_plural(self.item.allowed())}"
            if self.length is None and self.min_length:
                text += f" (at least {self.min_length})"
            if self.increasing:
                text += ", strictly increasing"
        else:
            text = "a finite number" if self.kind == "float" else "an int"
            pairs = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
            bounds = [f"{op} {_num(v)}" for op, v in pairs if v is not None]
            if bounds:
                text += " " + " and ".join(bounds)
        if self.none:
            text += ", or None" if "," in text else " or None"
        return text

    def check(self, policy: str, name: str, value: Any) -> Any:
        """`value` normalised (floats as float, ints as int, tuples as tuple), or `PolicyOptionError`."""
        problem, normal = self._problem(value)
        if problem is not None:
            raise PolicyOptionError(
                f"{policy}: {name}={value!r} is not allowed ({problem}); {name} must be {self.allowed()} "
                f"(default {self.default!r})"
            )
        return normal

    def _problem(self, value: Any) -> tuple[str | None, Any]:
        """(None, normalised value) if `value` is allowed, else (a short reason, None)."""
        if value is None:
            if self.none or (self.kind == "choice" and any(c is None for c in self.choices)):
                return None, None
            return "None is not allowed", None
        if self.kind == "choice":
            ok = any(type(value) is type(c) and value == c for c in self.choices if c is not None)
            return (None, value) if ok else ("not a choice", None)
        if self.kind == "bool":
            return (None, value) if isinstance(value, bool) else (f"a {type(value).__name__}, not a bool", None)
        if self.kind == "tuple":
            return self._tuple_problem(value)
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                return f"a {type(value).__name__}, not an int", None
            value = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                return f"a {type(value).__name__}, not a number", None
            value = float(value)
            if not math.isfinite(value):
                return "not finite", None
        if (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        ):
            return "out of range", None
        return None, value

    def _tuple_problem(self, value: Any) -> tuple[str | None, Any]:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            return f"a {type(value).__name__}, not a tuple", None
        if self.length is not None and len(value) != self.length:
            return f"{len(value)} elements, not {self.length}", None
        if len(value) < self.min_length:
            return f"{len(value)} elements, fewer than {self.min_length}", None
        out = []
        for i, element in enumerate(value):
            problem, normal = self.item._problem(element)
            if problem is not None:
                return f"element {i} = {element!r}: {problem}", None
            out.append(normal)
        if self.increasing and any(b <= a for a, b in itertools.pairwise(out)):
            return "not strictly increasing", None
        return None, tuple(out)


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plural(text: str) -> str:
    for single, plural in (("a finite number", "finite numbers"), ("an int", "ints"), ("True or False", "bools")):
        if text.startswith(single):
            return plural + text[len(single) :]
    return f"elements each {text}"


def Float(
    default: float | None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    none: bool = False,
    doc: str = "",
) -> Option:
    """A real-number option (ints accepted and stored as float; bool, NaN and +-inf refused)."""
    return Option(default, "float", doc, none, ge, gt, le, lt)


def Int(
    default: int | None,
    *,
    ge: int | None = None,
    gt: int | None = None,
    le: int | None = None,
    lt: int | None = None,
    none: bool = False,
    doc: str = "",
) -> Option:
    """An integer option (bool and floats such as 2.0 refused)."""
    return Option(default, "int", doc, none, ge, gt, le, lt)


def Bool(default: bool, *, doc: str = "") -> Option:
    """A True / False option (1, 0, "yes" refused)."""
    return Option(default, "bool", doc)


def Choice(default: Any, choices: Sequence[Any], *, doc: str = "") -> Option:
    """One of `choices` (include None in `choices` to allow None)."""
    return Option(default, "choice", doc, choices=tuple(choices))


def Tuple(
    default: Sequence[Any] | None,
    item: Option,
    *,
    length: int | None = None,
    min_length: int = 0,
    increasing: bool = False,
    none: bool = False,
    doc: str = "",
) -> Option:
    """A tuple (a list is accepted and stored as a tuple) whose elements are each checked by `item` (e.g.
    `Float(0.5, gt=0, le=1)`; its own default is unused); length checks that need other options go in
    `Policy.validate`."""
    default = tuple(default) if default is not None else None
    return Option(default, "tuple", doc, none, item=item, length=length, min_length=min_length, increasing=increasing)


class Policy:
    """Base class of all policies.

    A subclass sets `name`, `description` and `options_spec` (every option declared as an `Option` with its
    default; `defaults` is derived from it), implements `plan` and the `select_*` method of each stage it uses.
    Options are checked at construction: an unknown name raises `PolicyOptionError` listing the allowed ones, a
    value outside its declaration one naming the option, the value and what is allowed; `validate()` then
    checks combinations of options.

    A policy object passed to `tokenzip.apply` is copied: per-model state set by `plan` (e.g. `self._info`)
    lives on that patch's private copy, so one instance may be applied to several models.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options_spec: ClassVar[dict[str, Option]] = {}
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options_spec" in cls.__dict__:
            for option, spec in cls.options_spec.items():  # a wrong declaration fails at import
                spec.check(cls.name or cls.__name__, option, spec.default)
            cls.defaults = {option: spec.default for option, spec in cls.options_spec.items()}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise PolicyOptionError(f"policy {self.name!r} has no option(s) {unknown}; its options are: {allowed}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.check_options()

    def check_options(self) -> None:
        """Check every option against its declaration (normalising the stored values), then `validate()`."""
        for option, spec in self.options_spec.items():
            self.options[option] = spec.check(self.name, option, self.options.get(option, spec.default))
        self.validate()

    def validate(self) -> None:
        """Checks that relate several options; raise `PolicyOptionError` naming them and what is allowed."""

    @classmethod
    def option_help(cls) -> dict[str, str]:
        """Option name -> "default ...; allowed ...; description" (for docs and the CLI)."""
        return {
            option: f"default {spec.default!r}; {spec.allowed()}" + (f"; {spec.doc}" if spec.doc else "")
            for option, spec in cls.options_spec.items()
        }

    def default_positions(self, info: ModelInfo) -> str:
        """Position mode used when `apply` gets no `positions`: the LLaVA convention (compact) where defined."""
        return "compact" if info.supports_compact_positions else "original"

    def decode_positions(self, info: ModelInfo) -> str:
        """With compact positions and decode-stage KV edits: "layout" (default) lets an edited layer's new
        tokens continue from the length the layer processed in prefill; "cache_length" from the number of
        entries the edit kept (official MustDrop)."""
        return "layout"

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        """The stages and signals this policy uses on a model described by `info`."""
        raise NotImplementedError

    def nominal(self, info: ModelInfo, shape: ItemShape, keep: Keep) -> Nominal:
        """Predicted tokens of one item per decoder layer on a model described by `info` (see
        `tokenzip.policies.nominal`); used to price the policy without running it."""
        raise NotImplementedError(f"policy {self.name!r} has no nominal schedule")

    def select_vision(self, ctx: VisionStageContext) -> list[Selection | torch.Tensor]:
        """Per vision row: the patches (0-based, CLS excluded; CLS always stays first) that continue through the
        tower, as a `Selection` (values = merged hidden states, `ordered` = keep this order) or a LongTensor of
        kept indices (sorted by the engine)."""
        raise NotImplementedError(f"policy {self.name!r} has no vision stage")

    def select_projector_input(self, ctx: ProjectorInputContext) -> list[Selection]:
        """Per image row: the feature-layer tokens (0 = CLS) that enter the projector, values in vision space."""
        raise NotImplementedError(f"policy {self.name!r} has no projector-input stage")

    def select_pre_llm(self, ctx: PreLLMItem) -> Selection:
        """For one item: the item-local token indices (structural tokens included) that enter the LLM."""
        raise NotImplementedError(f"policy {self.name!r} has no pre_llm stage")

    def select_llm(self, ctx: LLMStageContext) -> list[Selection]:
        """Per sample: the visual slots (of `ctx.layout`) kept from decoder layer `ctx.layer` on."""
        raise NotImplementedError(f"policy {self.name!r} has no llm stage")

    def select_decode(self, ctx: DecodeContext) -> dict[int, list[Selection]]:
        """After prefill: {layer: per-sample `Selection` of the visual slots kept in that layer's KV cache}."""
        raise NotImplementedError(f"policy {self.name!r} has no decode stage")

    def _check_choice(self, option: str, allowed: tuple) -> None:
        value = self.options[option]
        if value not in allowed:
            raise PolicyOptionError(f"{self.name}: {option}={value!r} is not allowed; choose one of {list(allowed)}")

    def _check_int(self, option: str, minimum: int = 0, allow_none: bool = False) -> None:
        value = self.options[option]
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise PolicyOptionError(f"{self.name}: {option} must be an int >= {minimum}, got {value!r}")
