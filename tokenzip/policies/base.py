"""The `Policy` base class: a policy plans its stages for a model and selects tokens at each one.

A policy is a frozen dataclass whose fields are its options. Each field is declared with one of the option
constructors `Float`, `Int`, `Bool`, `Choice` and `Tuple`, which hold the default, the values allowed and a
one-line description:

    @register
    @dataclass(frozen=True)
    class MyPolicy(Policy):
        '''What it does (help() shows it, with an Options section generated from the fields).'''

        name: ClassVar[str] = "mine"
        description: ClassVar[str] = "one line for list_policies()"

        alpha: float = Float(0.1, ge=0, doc="anchor share of the budget: k_a = round(K * alpha / 5)")
        object_layer: int | None = Int(None, ge=1, none=True, doc="1-based vision layer; None = per family")
        compat: str | None = Choice(None, (None, "official", "fixed"), doc="released rules or tokenzip's fixes")
        p: tuple[float, ...] = Tuple((0.9, 0.75), Float(0.5, gt=0, le=1), min_length=1, doc="one mass per layer")

Construction checks every value against its declaration (type, range, NaN / inf, tuple length and element
types), normalises it (ints given for floats become floats, lists become tuples) and raises `PolicyOptionError`
naming the option, the value and what is allowed; an unknown option or a positional argument is refused the same
way. Checks that relate several options go in `validate()`, checks that need the model in `plan()`.

A policy object holds its options only: it is frozen, and everything it derives for one model (layers, signals,
compat mode) is returned by `plan()` in `Plan.state` and handed back to every stage as `ctx.state`. So one
instance may be applied to any number of models at once; `repr`, `==` and `hash` follow the options.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
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

OPTION = "tokenzip.option"  # the dataclass field metadata key holding an option's `Option` declaration


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
    refused: tuple[tuple[Any, str], ...] = ()  # (value, why it is refused)

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
        for refused, why in self.refused:
            if type(value) is type(refused) and value == refused:
                raise PolicyOptionError(f"{policy}: {name}={value!r} is not available: {why}")
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


def _field(option: Option) -> Any:
    """A dataclass field declaring `option` (its default, with the declaration in the metadata)."""
    return dataclasses.field(default=option.default, metadata={OPTION: option})


def option_of(item: Any) -> Option:
    """The `Option` of a tuple's element declaration (given as an option field or an `Option`)."""
    if isinstance(item, Option):
        return item
    option = getattr(item, "metadata", {}).get(OPTION)
    if option is None:
        raise TypeError(f"a Tuple's item must be declared with Float, Int, Bool or Choice, got {item!r}")
    return option


def Float(
    default: float | None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    none: bool = False,
    doc: str = "",
) -> Any:
    """A real-number option (ints accepted and stored as float; bool, NaN and +-inf refused)."""
    return _field(Option(default, "float", doc, none, ge, gt, le, lt))


def Int(
    default: int | None,
    *,
    ge: int | None = None,
    gt: int | None = None,
    le: int | None = None,
    lt: int | None = None,
    none: bool = False,
    doc: str = "",
) -> Any:
    """An integer option (bool and floats such as 2.0 refused)."""
    return _field(Option(default, "int", doc, none, ge, gt, le, lt))


def Bool(default: bool, *, doc: str = "") -> Any:
    """A True / False option (1, 0, "yes" refused)."""
    return _field(Option(default, "bool", doc))


def Choice(default: Any, choices: Sequence[Any], *, doc: str = "", refused: Mapping[Any, str] | None = None) -> Any:
    """One of `choices` (include None in `choices` to allow None). `refused`: values that are not choices but
    deserve their own explanation (e.g. a published variant tokenzip cannot reproduce), value -> why."""
    return _field(Option(default, "choice", doc, choices=tuple(choices), refused=tuple((refused or {}).items())))


def Tuple(
    default: Sequence[Any] | None,
    item: Any,
    *,
    length: int | None = None,
    min_length: int = 0,
    increasing: bool = False,
    none: bool = False,
    doc: str = "",
) -> Any:
    """A tuple (a list is accepted and stored as a tuple) whose elements are each checked by `item` (e.g.
    `Float(0.5, gt=0, le=1)`; its own default is unused); length checks that need other options go in
    `Policy.validate`."""
    default = tuple(default) if default is not None else None
    item_option = option_of(item)
    return _field(
        Option(
            default, "tuple", doc, none, item=item_option, length=length, min_length=min_length, increasing=increasing
        )
    )


class _PolicyType(type):
    """Refuses positional arguments and unknown option names with a `PolicyOptionError` listing the options
    (the dataclass `__init__` would raise a bare TypeError). Only for policy dataclasses: a plain subclass that
    defines its own `__init__` is constructed as it says."""

    def __call__(cls, *args: Any, **options: Any) -> Any:
        if "__dataclass_params__" not in cls.__dict__:  # a subclass with an __init__ of its own (test probes)
            return super().__call__(*args, **options)
        known = cls.option_specs()
        if args:
            raise PolicyOptionError(
                f"policy {cls.name!r} takes its options by keyword, got positional {args!r}; its options are: "
                f"{', '.join(known) or 'none'}"
            )
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise PolicyOptionError(
                f"policy {cls.name!r} has no option(s) {unknown}; its options are: {', '.join(sorted(known)) or 'none'}"
            )
        return super().__call__(**options)


@dataclass(frozen=True)
class Policy(metaclass=_PolicyType):
    """Base class of all policies (see the module docstring for how to declare one).

    A subclass is a `@dataclass(frozen=True)` with `name` and `description` class variables and one field per
    option; it implements `plan` and the `select_*` method of each stage it uses (or subclasses
    `tokenzip.policies.scorer.ScorerPolicy` and implements `score` only). Register it with `@register`, or for a
    package of its own with an entry point in the `tokenzip.policies` group.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for option, spec in self.option_specs().items():
            object.__setattr__(self, option, spec.check(self.name, option, getattr(self, option)))
        self.validate()

    # ------------------------------------------------------------------------------------------ options
    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        """Option name -> its declaration, in declaration order."""
        return {f.name: f.metadata[OPTION] for f in dataclasses.fields(cls) if OPTION in f.metadata}

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Option name -> default."""
        return {option: spec.default for option, spec in cls.option_specs().items()}

    @classmethod
    def option_help(cls) -> dict[str, str]:
        """Option name -> "default ...; allowed ...; description" (for docs, help() and the CLI)."""
        return {
            option: f"default {spec.default!r}; {spec.allowed()}" + (f"; {spec.doc}" if spec.doc else "")
            for option, spec in cls.option_specs().items()
        }

    @property
    def options(self) -> Mapping[str, Any]:
        """The option values (read-only; `dataclasses.replace(policy, name=value)` makes a changed copy)."""
        return MappingProxyType({option: getattr(self, option) for option in self.option_specs()})

    def validate(self) -> None:
        """Checks that relate several options; raise `PolicyOptionError` naming them and what is allowed. May
        normalise values with `self._normalise(option=value)` (e.g. a preset filling in other options)."""

    def _normalise(self, **values: Any) -> None:
        """Set options during `validate` (the dataclass is frozen afterwards)."""
        for option, value in values.items():
            object.__setattr__(self, option, value)

    # ------------------------------------------------------------------------------------------ model side
    def default_positions(self, info: ModelInfo) -> str:
        """Position mode used when `apply` gets no `positions`: the LLaVA convention (compact) where defined."""
        return "compact" if info.supports_compact_positions else "original"

    def decode_positions(self, info: ModelInfo) -> str:
        """With compact positions and decode-stage KV edits: "layout" (default) lets an edited layer's new
        tokens continue from the length the layer processed in prefill; "cache_length" from the number of
        entries the edit kept (official MustDrop)."""
        return "layout"

    def plan(self, info: ModelInfo, keep: Keep) -> Plan:
        """The stages and signals this policy uses on a model described by `info`, and in `Plan.state` what it
        derived for that model (handed back to every stage as `ctx.state`)."""
        raise NotImplementedError

    def nominal(self, info: ModelInfo, shape: ItemShape, keep: Keep) -> Nominal:
        """Predicted tokens of one item per decoder layer on a model described by `info` (see
        `tokenzip.policies.nominal`); used to price the policy without running it (`tokenzip flops`,
        `benchmarks/flops_table.py`). Every registered policy implements it."""
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


def check_policy_class(cls: type) -> None:
    """Refuse a policy class that cannot be constructed or priced safely (raises TypeError at registration): not a
    Policy, no name, not a frozen dataclass of its own, no `nominal`, a field without an option declaration, a
    default its own declaration refuses."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"{cls!r} is not a tokenzip Policy subclass")
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name (set name: ClassVar[str] = '...')")
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} must be declared with @dataclass(frozen=True) (its fields are its options)")
    for f in dataclasses.fields(cls):
        if OPTION not in f.metadata:
            raise TypeError(
                f"{cls.__name__}.{f.name} is a field without an option declaration; declare it with Float, Int, "
                "Bool, Choice or Tuple (derived per-model values belong in Plan.state)"
            )
        spec = f.metadata[OPTION]
        spec.check(cls.name, f.name, spec.default)
    if cls.nominal is Policy.nominal:
        raise TypeError(
            f"{cls.__name__} must implement nominal(info, shape, keep): `tokenzip flops` and "
            "benchmarks/flops_table.py price every registered policy with it (the scorer bases implement it)"
        )


def options_doc(cls: type[Policy]) -> str:
    """An 'Options' section for the class docstring: one entry per option with its default and what is allowed."""
    lines = ["", "Options:"]
    for option, text in cls.option_help().items():
        lines.append(f"    {option}: {text}")
    return "\n".join(lines) if len(lines) > 2 else ""
