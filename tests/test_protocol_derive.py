"""The derived decoders' shortcuts decide as the field checkers do.

A generated decoder tests each value inline and calls the field's checker
only when that test fails; the message is built through its slots rather
than its ``__init__``. Neither may change what comes out: these tests pin
both to the slow path.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from breakerd.protocol import RemoteProtocolError
from breakerd.protocol._derive import _holds, _type_of, derive
from breakerd.protocol._make import constructor
from breakerd.protocol._wire import (
    Count,
    Finite,
    FiniteFloat,
    NonNegative,
    NonNegativeFloat,
    Range,
    wire,
)

# Every kind of field whose check a decoder may skip.
TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "opt_str": str | None,
    "opt_int": int | None,
    "opt_float": float | None,
    "count": Count,
    "non_negative": NonNegative,
    "opt_non_negative": NonNegative | None,
    "small": Annotated[int, Range(minimum=-3, maximum=3)],
    "finite": FiniteFloat,
    "opt_finite": FiniteFloat | None,
    "non_negative_float": NonNegativeFloat,
    "at_least_one": Annotated[float, Finite(minimum=1.0)],
}

EDGES: list[object] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    -3,
    4,
    2**32 - 1,
    2**32,
    2**64 - 1,
    -(2**63),
    0.0,
    -0.0,
    0.5,
    1.0,
    -1.5,
    math.nan,
    math.inf,
    -math.inf,
    1.7976931348623157e308,
    "",
    "x",
    b"x",
    [],
    {},
]
values = st.sampled_from(EDGES) | st.integers() | st.floats() | st.text(max_size=3)


def checked(check: Any, v: object, key: str = "f") -> tuple[str, object]:
    try:
        return "ok", check(v, "w", key)
    except RemoteProtocolError as exc:
        return "error", str(exc)


@pytest.mark.parametrize("kind", TYPES)
@given(v=values)
def test_a_value_the_inline_test_passes_is_one_the_checker_keeps_as_it_is(
    kind: str, v: object
) -> None:
    t = _type_of(object, "f", TYPES[kind], {}, None)
    assert t.valid is not None, kind
    outcome, value = checked(t.check, v)
    if _holds(t.valid, v):
        assert outcome == "ok"
        assert value is v


@dataclasses.dataclass(frozen=True, slots=True)
class Every:
    """One field of each kind: required ones, and ones with defaults."""

    a_str: str
    a_count: Count
    a_finite: FiniteFloat
    opt_float: float | None = None
    non_negative: NonNegative = 0
    ratio: NonNegativeFloat = 0.0
    flag: bool = True
    small: Annotated[int, Range(minimum=-3, maximum=3)] = dataclasses.field(
        default=1, metadata=wire(group="pair")
    )
    at_least_one: Annotated[float, Finite(minimum=1.0)] = dataclasses.field(
        default=1.0, metadata=wire(group="pair")
    )
    zero: Count = dataclasses.field(default=7, metadata=wire(zero=True))


CODEC = derive(Every)
GOOD: dict[str, object] = {"a_str": "x", "a_count": 3, "a_finite": -2.5}


def slow_decode(d: dict[str, object]) -> tuple[str, object]:
    """What the field checkers alone make of ``d``: the reference."""
    args = {}
    fields = dataclasses.fields(Every)
    hints = typing.get_type_hints(Every, include_extras=True)
    absent_pair = "small" not in d and "at_least_one" not in d
    for f in fields:
        rules = f.metadata.get("breakerd.wire")
        t = _type_of(Every, f.name, hints[f.name], {}, None)
        if f.name not in d:
            if f.default is dataclasses.MISSING or (rules and rules.group and not absent_pair):
                return "error", f"w: missing required field {f.name!r}"
            continue
        outcome, value = checked(t.check, d[f.name], f.name)
        if outcome == "error":
            return outcome, value
        if rules and rules.zero and value == 0:
            value = f.default
        args[f.name] = value
    return "ok", Every(**args)  # type: ignore[arg-type]


@given(
    changes=st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Every)]), values)
)
def test_a_derived_decoder_decodes_as_its_field_checkers(changes: dict[str, object]) -> None:
    d = GOOD | changes
    try:
        fast: tuple[str, object] = "ok", CODEC.decode(d, "w")
    except RemoteProtocolError as exc:
        fast = "error", str(exc)
    expected = slow_decode(d)
    assert fast[0] == expected[0], (fast, expected)
    if fast[0] == "ok":
        # Equal, and of the same types (an int sent for a float is converted).
        assert repr(fast[1]) == repr(expected[1])


def test_a_group_absent_as_a_whole_takes_its_defaults_and_half_of_one_is_refused() -> None:
    assert CODEC.decode(dict(GOOD), "w") == Every("x", 3, -2.5)
    with pytest.raises(RemoteProtocolError, match="missing required field 'at_least_one'"):
        CODEC.decode(GOOD | {"small": 2}, "w")


@dataclasses.dataclass(frozen=True)
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")


@dataclasses.dataclass(frozen=True)
class NoSlots:
    n: int = 0


def test_a_message_is_built_through_its_init_unless_that_only_sets_slots() -> None:
    make = constructor(Every)
    built = make("x", 3, -2.5, None, 0, 0.0, True, 1, 1.0, 7)
    assert built == Every("x", 3, -2.5)
    assert type(built) is Every
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.a_str = "y"  # type: ignore[misc]
    # A __post_init__ runs; a class without slots gets its __init__.
    with pytest.raises(ValueError, match="n must be >= 0"):
        constructor(Checked)(-1)
    assert constructor(NoSlots)(3) == NoSlots(3)
