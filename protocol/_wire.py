"""How a message field travels: the vocabulary ``_messages`` annotates with.

A message's codec is derived from its dataclass (see ``_derive``): the field's
type says which values are valid, and these annotations say the rest.

* A field without a default is required, and always sent.
* A field with a default may be left out by the peer (it then takes the
  default) and is sent only when it differs from the default, so adding a
  field is one line in ``_messages`` and costs older peers nothing.
* ``ALWAYS``: sent even at its default (fields older peers expect to see).
* ``wire(group=...)``: the fields of one group are sent together, all of them
  once any differs from its default, and a peer that sends one sends all.
* ``wire(sent_with=...)``: sent exactly when that other field is sent,
  whatever its own value.
* ``wire(arrays=N)`` on a ``tuple[Message, ...]``: each message travels as
  the array of its first ``N`` fields rather than a map (the hot path, where
  key strings would triple the size); all ``N`` are required, and trailing
  entries a later version appends are ignored.
* ``wire(required=True)``: the peer must send it, though Python callers may
  leave it out.
* ``wire(nil=True)``: nil from the peer means the default.
* ``wire(zero=True)``: 0 from the peer means the default (an integer field).
* ``wire(as_map=True)`` on a ``tuple[tuple[K, V], ...]`` of pairs: it travels
  as a map of ``K`` to ``V``, and comes back as pairs in the map's order.
* ``NonNegative`` and ``Count`` (``typing.Annotated`` integers) bound a value;
  ``Finite`` (``NonNegativeFloat``, ``FiniteFloat``) bounds a float and refuses
  NaN and the infinities; ``OneOf`` limits a string to a few names.

Pure data: importing this module derives nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Final, TypeAlias

__all__ = [
    "ALWAYS",
    "MAX_COUNT",
    "WIRE",
    "Count",
    "Finite",
    "FiniteFloat",
    "NonNegative",
    "NonNegativeFloat",
    "OneOf",
    "Range",
    "Wire",
    "wire",
]

#: Largest count on the wire (``ReportBatch.successes`` and ``rejections``
#: counts, ``Acquire.successes``): an unsigned 32-bit integer, like a msgid.
#: A client counts at most one batch of queued outcomes in one entry
#: (``max_queued_reports``, 100,000 by default), so no honest peer gets near
#: it; a frame past it is a protocol error, and its connection is closed.
MAX_COUNT: Final = 0xFFFF_FFFF

#: The key of ``Wire`` in a dataclass field's metadata.
WIRE: Final = "breakerd.wire"


@dataclass(frozen=True, slots=True)
class Range:
    """Bounds of an integer on the wire, inclusive (None: unbounded)."""

    minimum: int | None = None
    maximum: int | None = None


@dataclass(frozen=True, slots=True)
class Finite:
    """A float on the wire that is a number (no NaN, no infinity), and at least ``minimum``."""

    minimum: float | None = None


@dataclass(frozen=True, slots=True)
class OneOf:
    """A string on the wire that is one of ``names`` (decoded as the string itself)."""

    names: frozenset[str]


NonNegative: TypeAlias = Annotated[int, Range(minimum=0)]
Count: TypeAlias = Annotated[int, Range(minimum=0, maximum=MAX_COUNT)]
FiniteFloat: TypeAlias = Annotated[float, Finite()]
NonNegativeFloat: TypeAlias = Annotated[float, Finite(minimum=0.0)]


@dataclass(frozen=True, slots=True)
class Wire:
    """A field's travel rules beyond its type (see the module docstring)."""

    always: bool = False
    group: str | None = None
    arrays: int | None = None
    required: bool = False
    nil: bool = False
    sent_with: str | None = None
    zero: bool = False
    as_map: bool = False


def wire(
    *,
    always: bool = False,
    group: str | None = None,
    arrays: int | None = None,
    required: bool = False,
    nil: bool = False,
    sent_with: str | None = None,
    zero: bool = False,
    as_map: bool = False,
) -> Mapping[str, Wire]:
    """Field metadata: ``field(default=..., metadata=wire(group="x"))``."""
    rules = Wire(always, group, arrays, required, nil, sent_with, zero, as_map)
    return MappingProxyType({WIRE: rules})


#: Sent even when it equals its default.
ALWAYS: Final = wire(always=True)
