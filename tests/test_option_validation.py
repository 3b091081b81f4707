"""r13: every option of every policy is checked at `apply` (type, range, NaN / inf) against its declaration."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import get_tiny

import tokenzip
from tokenzip.errors import PolicyOptionError, UnknownPolicyError
from tokenzip.policies.base import Bool, Choice, Float, Int, Option, Policy, Tuple, option_of
from tokenzip.policies.registry import get_policy_class, register

POLICIES = (
    "atp", "dart", "divprune", "fastv", "hiprune", "holitom", "holov", "mustdrop", "none", "oracle",
    "pdrop", "pool", "random", "sparsevlm", "visiondrop", "visionzip",
)  # fmt: skip


class _NotAChoice:
    def __repr__(self) -> str:
        return "<not a choice>"


def bad_scalars(spec: Option) -> list:
    """Values a scalar declaration must refuse: wrong types, NaN / inf, just outside each bound, None."""
    out: list = [] if spec.none or (spec.kind == "choice" and None in spec.choices) else [None]
    if spec.kind == "choice":
        return [*out, _NotAChoice(), "__no_such_choice__", 3.5]
    if spec.kind == "bool":
        return [*out, "no", 1, 0.0]
    if spec.kind == "int":
        out += ["3", 1.5, 2.0, True]
        step = 1
    else:
        out += ["0.5", True, float("nan"), float("inf"), float("-inf")]
        step = 0.5
    if spec.ge is not None:
        out.append(spec.ge - step)
    if spec.gt is not None:
        out.append(spec.gt)
    if spec.le is not None:
        out.append(spec.le + step)
    if spec.lt is not None:
        out.append(spec.lt)
    return out


def good_tuple(spec: Option) -> tuple:
    """A tuple the declaration accepts (its default, or elements built from the item declaration)."""
    if spec.default is not None:
        return spec.default
    n = spec.length or max(1, spec.min_length)
    item = spec.item
    start = item.default if item.default is not None else (item.ge if item.ge is not None else 1)
    return tuple(start + i for i in range(n)) if spec.increasing else (start,) * n


def bad_values(spec: Option) -> list:
    if spec.kind != "tuple":
        return bad_scalars(spec)
    out: list = [] if spec.none else [None]
    good = good_tuple(spec)
    out += ["x", 5, {"a": 1}]
    out += [(*good[:i], bad, *good[i + 1 :]) for i in range(len(good)) for bad in bad_scalars(spec.item)]
    if spec.length is not None:
        out += [(*good, good[-1]), good[:-1]]
    if spec.min_length:
        out.append(good[: spec.min_length - 1])
    if spec.increasing and len(good) > 1:
        out.append(tuple(reversed(good)))
    return out


def option_cases() -> list:
    cases = []
    for name in POLICIES:
        for option, spec in get_policy_class(name).option_specs().items():
            for value in bad_values(spec):
                cases.append(pytest.param(name, option, value, id=f"{name}-{option}-{value!r}"))
    return cases


def default_cases() -> list:
    return [
        pytest.param(name, option, id=f"{name}-{option}")
        for name in POLICIES
        for option in get_policy_class(name).option_specs()
    ]


def test_the_list_covers_every_registered_policy():
    assert set(POLICIES) == set(tokenzip.list_policies())


@pytest.mark.parametrize("policy", POLICIES)
def test_every_option_is_declared(policy):
    cls = get_policy_class(policy)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(cls.option_specs()) == fields, "fields without a declaration are not checked"
    assert cls.__dataclass_params__.frozen, "a policy must be frozen (per-model state goes in Plan.state)"
    for option, spec in cls.option_specs().items():
        assert isinstance(spec, Option), option
        assert spec.kind != "tuple" or isinstance(spec.item, Option), option
        assert option in (cls.__doc__ or ""), f"help({cls.__name__}) does not list {option}"
    assert repr(cls()).startswith(f"{cls.__name__}("), "the repr shows the options"


@pytest.mark.parametrize(("policy", "option", "value"), option_cases())
def test_a_bad_option_value_is_refused_at_apply(policy, option, value):
    vlm = get_tiny("llava", "sdpa")
    with pytest.raises(PolicyOptionError) as err:
        tokenzip.apply(vlm.model, policy, 0.5, **{option: value})
    message = str(err.value)
    assert f"{option}={value!r}" in message and "must be" in message  # names the option, the value, what's allowed
    assert tokenzip.current_patch(vlm.model) is None


@pytest.mark.parametrize(("policy", "option"), default_cases())
def test_the_default_of_every_option_is_accepted(policy, option):
    vlm = get_tiny("llava", "sdpa")
    spec = get_policy_class(policy).option_specs()[option]
    with tokenzip.apply(vlm.model, policy, 0.5, **{option: spec.default}) as patch:
        assert patch.policy.options[option] == spec.default
    assert tokenzip.current_patch(vlm.model) is None


@pytest.mark.parametrize("policy", [None, 3, 0.5, ["pool"], get_policy_class("pool")])
def test_a_policy_that_is_neither_a_name_nor_an_instance_is_refused(policy):
    vlm = get_tiny("llava", "sdpa")
    with pytest.raises(UnknownPolicyError, match="policy"):
        tokenzip.apply(vlm.model, policy, 0.5)
    assert tokenzip.current_patch(vlm.model) is None


def test_unknown_option_names_list_the_allowed_ones():
    with pytest.raises(PolicyOptionError, match="alpha"):
        get_policy_class("hiprune")(alhpa=0.2)


def test_declarations_normalise_values():
    def check(field, value, name="x"):
        return option_of(field).check("p", name, value)

    assert check(Float(0.5, ge=0), 1) == 1.0 and isinstance(check(Float(0.5), 1), float)
    assert check(Tuple((1, 2), Int(1, ge=1), increasing=True), [1, 3]) == (1, 3)
    assert check(Tuple((0.5,), Float(0.5, gt=0, le=1)), [1]) == (1.0,)
    assert check(Int(None, ge=1, none=True), None) is None
    assert check(Float(0.5, gt=0, le=1), 1.0) == 1.0  # bounds are inclusive / exclusive as declared
    with pytest.raises(PolicyOptionError, match="> 0"):
        check(Float(0.5, gt=0, le=1), 0.0)
    assert check(Choice("a", ("a", "b")), "b") == "b"
    with pytest.raises(PolicyOptionError):
        check(Choice(1, (1, 2)), True)  # compared by type too: True is not 1
    assert check(Bool(True), False) is False
    assert math.isclose(check(Float(0.1, ge=0), 0.25), 0.25)
    with pytest.raises(PolicyOptionError, match="not available: because"):
        check(Choice("a", ("a",), refused={"b": "because"}), "b")


def test_a_wrong_declaration_fails_at_registration():
    @dataclasses.dataclass(frozen=True)
    class Broken(Policy):
        name = "broken"
        alpha: float = Float(-1.0, ge=0)

    with pytest.raises(PolicyOptionError, match="alpha"):
        register(Broken)


def test_a_policy_class_that_is_not_a_frozen_dataclass_of_options_is_refused_at_registration():
    class NoDataclass(Policy):
        name = "no_dataclass"

    with pytest.raises(TypeError, match="non-frozen"):  # a mutable policy dataclass: dataclasses refuse it

        @dataclasses.dataclass
        class NotFrozen(Policy):
            name = "not_frozen"

    @dataclasses.dataclass(frozen=True)
    class Undeclared(Policy):
        name = "undeclared"
        alpha: float = 0.1  # no Float(...): its values would not be checked

    @dataclasses.dataclass(frozen=True)
    class Unpriced(Policy):
        name = "unpriced"
        alpha: float = Float(0.1, ge=0)

    cases = ((NoDataclass, "@dataclass"), (Undeclared, "without an option declaration"), (Unpriced, "nominal"))
    for cls, match in cases:
        with pytest.raises(TypeError, match=match):
            register(cls)
    assert not {"no_dataclass", "undeclared", "unpriced"} & set(tokenzip.list_policies())


def test_defaults_are_derived_from_the_declarations():
    cls = get_policy_class("hiprune")
    assert cls.option_defaults() == {option: spec.default for option, spec in cls.option_specs().items()}
    assert cls().options == cls.option_defaults()
    assert "alpha" in cls.option_help() and "finite number" in cls.option_help()["alpha"]


def test_options_are_keyword_only_and_frozen():
    cls = get_policy_class("hiprune")
    with pytest.raises(PolicyOptionError, match="by keyword"):
        cls(0.2)
    policy = cls(alpha=0.2)
    assert policy.alpha == 0.2 and policy == cls(alpha=0.2) and hash(policy) == hash(cls(alpha=0.2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.alpha = 0.3
    with pytest.raises(TypeError):
        policy.options["alpha"] = 0.3  # a read-only view
    with pytest.raises(PolicyOptionError, match="alpha=inf"):
        dataclasses.replace(policy, alpha=float("inf"))  # a changed copy is checked again


@pytest.mark.parametrize(
    ("policy", "options", "match"),
    [
        ("random", {"layer": 3}, "not used with stage='pre_llm'"),  # would silently be ignored
        ("random", {"stage": "llm", "layer": 0}, "layer >= 1"),
        ("random", {"stage": "llm", "newlines": "drop"}, "only used with stage='pre_llm'"),
        ("holov", {"newlines": "keep_nonempty_rows", "shortfall": "zeros"}, "shortfall"),
    ],
)
def test_option_combinations_that_would_be_ignored_are_refused(policy, options, match):
    with pytest.raises(PolicyOptionError, match=match):
        get_policy_class(policy)(**options)


def test_holov_raster_order_is_refused_where_the_official_path_ignores_it():
    vlm = get_tiny("qwen2_5_vl", "sdpa")
    with pytest.raises(PolicyOptionError, match="order='raster'"):
        tokenzip.apply(vlm.model, "holov", 0.5, compat="official", order="raster")
    assert tokenzip.current_patch(vlm.model) is None
