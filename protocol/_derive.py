"""Wire codecs derived from the message dataclasses, once, at import time.

``derive(cls)`` reads a message's fields (their types, defaults and ``_wire``
metadata) and builds two functions: an encoder, message to map, and a
checker, map to message. Each field gets a small checker closure picked by
its type. Both functions are generated source, compiled once, as
dataclasses generates ``__init__`` (``MapCodec.source`` shows the
encoder's): the encoder is one dict display and an ``if`` per optional
field, the checker one lookup and one inline test per field (its type, and
its bounds if it has any), calling the field's checker only for anything
else, and setting the message's slots directly; that is what hand-written
code would be, where a loop over the fields cost 3 to 6 times as much.

Types a field may have, and what the checker accepts for them:

=============================  ==============================================
``str``, ``bool``, ``int``     exactly that msgpack type (a boolean is not an
                               integer)
``float``                      a float, or an integer (converted)
``Annotated[int, Range(..)]``  an integer within the range (``NonNegative``,
                               ``Count``)
``Annotated[float, Finite()]`` a float or an integer (converted), not NaN nor
                               infinite, at least its minimum if it has one
``Annotated[str, OneOf(..)]``  one of those strings
a ``StrEnum``, a ``Literal``   one of its string values (decoded to the member)
``X | None``                   nil, or what ``X`` accepts
``dict[str, Any]``             a map with string keys (values as they come)
``tuple[X, ...]``              an array of what ``X`` accepts, as a tuple
``tuple[X, Y]``                an array of at least that many entries; later
                               ones are ignored
a message dataclass            a map, checked by that message's own codec
``tuple[tuple[K, V], ...]``    with ``wire(as_map=True)``: a map whose keys
                               ``K`` accepts and values ``V`` accepts, as pairs
=============================  ==============================================

Any other type fails at import, naming the field: a message that cannot be
derived never ships. Bad input raises ``RemoteProtocolError`` naming the
message, the field and what was wrong, and nothing else; encoders trust their
input's types (mypy checks them) and never validate.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Final, Generic, NamedTuple, TypeAlias, TypeVar

from ._errors import RemoteProtocolError
from ._make import construct_lines
from ._wire import WIRE, Finite, OneOf, Range, Wire

__all__ = [
    "MISSING",
    "Check",
    "MapCodec",
    "WireMap",
    "bad",
    "derive",
    "wire_type",
]

_M = TypeVar("_M")

#: One msgpack map as msgpack gives it or takes it.
WireMap: TypeAlias = dict[str, object]
#: Check one wire value: ``(value, where, key) -> value``, raising
#: ``RemoteProtocolError`` that names ``where`` and ``key``.
Check: TypeAlias = Callable[[object, str, str], object]
_Encode: TypeAlias = Callable[[Any], object]

#: What ``dict.get`` returns for a key that is not there.
MISSING: Final[Any] = object()

_WIRE_TYPE_NAMES: Final[dict[type, str]] = {
    type(None): "nil",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    bytes: "binary",
    list: "an array",
    dict: "a map",
}


def wire_type(value: object) -> str:
    """``value``'s msgpack type, as an error message names it."""
    return _WIRE_TYPE_NAMES.get(type(value), type(value).__name__)


def _subject(key: str) -> str:
    # An array entry ("items[3]") or a map's key is named as it is, a field by its key.
    return key if key.endswith("]") or " " in key else f"field {key!r}"


def bad(where: str, key: str, expected: str, value: object) -> RemoteProtocolError:
    """The error for field (or array entry) ``key`` of ``where``, holding ``value``."""
    if value is MISSING:
        return RemoteProtocolError(f"{where}: missing required field {key!r}")
    got = wire_type(value)
    if type(value) is list:
        got += f" of {len(value)}"
    return RemoteProtocolError(f"{where}: {_subject(key)} must be {expected}, got {got}")


@dataclasses.dataclass(frozen=True, slots=True)
class MapCodec(Generic[_M]):
    """A message's encoder and checker: ``decode(map, where)`` names ``where`` in errors."""

    cls: type[_M]
    encode: Callable[[_M], WireMap]
    decode: Callable[[WireMap, str], _M]
    #: The encoder's generated source, for a reader ("" when written by hand).
    source: str = ""


class _NoShortcut:
    """No wire value has this type: the field always goes through its checker."""


class _Type(NamedTuple):
    """How values of one field type are checked and encoded."""

    check: Check
    #: None: the value goes to msgpack as it is (enum members are str).
    encode: _Encode | None
    #: What the checker wants, for error messages ("a string").
    expected: str
    #: A value of exactly this type is valid as it is (``str`` for a string
    #: field); ``_NoShortcut`` when every value needs the checker.
    exact: type = _NoShortcut
    #: An expression true of a value ``{v}`` that is valid as it is, for the
    #: generated decoder to test inline; None: always call the checker.
    valid: str | None = None


#: The largest finite float: ``lo <= v <= _MAX_FLOAT`` is false for NaN and infinities.
_MAX_FLOAT: Final = 1.7976931348623157e308


def _or_nil(valid: str, nil: bool) -> str:
    return f"{{v}} is None or ({valid})" if nil else valid


# --- one type --------------------------------------------------------------------

_SCALARS: Final[dict[type, str]] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
}


def _scalar(kind: type, nil: bool) -> _Type:
    # `type(v) is int` rather than isinstance: bool is an int subclass and a
    # boolean is no integer on the wire.
    expected = _SCALARS[kind] + (" or nil" if nil else "")
    if kind is float:

        def check_float(v: object, where: str, key: str) -> object:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            if nil and v is None:
                return None
            raise bad(where, key, expected, v)

        return _Type(check_float, None, expected, float, _or_nil("type({v}) is float", nil))

    def check(v: object, where: str, key: str) -> object:
        if type(v) is kind or (nil and v is None):
            return v
        raise bad(where, key, expected, v)

    return _Type(check, None, expected, kind, _or_nil(f"type({{v}}) is {kind.__name__}", nil))


def _bounded(bounds: Range, nil: bool, group: str | None) -> _Type:
    lo, hi = bounds.minimum, bounds.maximum
    expected = "an integer" + (" or nil" if nil else "")
    # Fields sent together are bounded together: name them all.
    subject = f"{group} must be" if group else "must be"

    def check(v: object, where: str, key: str) -> object:
        if type(v) is not int:
            if nil and v is None:
                return None
            raise bad(where, key, expected, v)
        if lo is not None and v < lo:
            if group:
                raise RemoteProtocolError(f"{where}: {subject} >= {lo}; {_subject(key)} is {v}")
            raise RemoteProtocolError(f"{where}: {_subject(key)} {subject} >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise RemoteProtocolError(f"{where}: {_subject(key)} is {v}, past the limit of {hi}")
        return v

    valid = "type({v}) is int" + "".join(
        f" and {{v}} {op} {bound}" for op, bound in ((">=", lo), ("<=", hi)) if bound is not None
    )
    return _Type(check, None, expected, valid=_or_nil(valid, nil))


def _finite(bounds: Finite, nil: bool) -> _Type:
    lo = bounds.minimum
    expected = ("a finite number" if lo is None else f"a finite number >= {lo:g}") + (
        " or nil" if nil else ""
    )

    def check(v: object, where: str, key: str) -> object:
        if type(v) is float:
            x = v
        elif type(v) is int:
            x = float(v)  # msgpack integers are within 64 bits: never overflows
        elif nil and v is None:
            return None
        else:
            raise bad(where, key, expected, v)
        if not math.isfinite(x) or (lo is not None and x < lo):
            raise RemoteProtocolError(f"{where}: {_subject(key)} must be {expected}, got {v!r}")
        return x

    valid = (
        f"type({{v}}) is float and {-_MAX_FLOAT if lo is None else lo!r} <= {{v}} <= {_MAX_FLOAT!r}"
    )
    return _Type(check, None, expected, valid=_or_nil(valid, nil))


def _choice(table: Mapping[str, object], nil: bool) -> _Type:
    allowed = ", ".join(sorted(table))
    expected = "a string" + (" or nil" if nil else "")

    def check(v: object, where: str, key: str) -> object:
        # Check the type first: an array is unhashable and would raise TypeError.
        if type(v) is str:
            member = table.get(v)
            if member is not None:
                return member
            raise RemoteProtocolError(f"{where}: {_subject(key)} is {v!r}, not one of: {allowed}")
        if nil and v is None:
            return None
        raise bad(where, key, expected, v)

    return _Type(check, None, expected)


def _check_str_map(v: object, where: str, key: str) -> object:
    if type(v) is not dict:
        raise bad(where, key, "a map", v)
    for k in v:
        # msgpack's strict_map_key lets binary keys through; these keys are names.
        if type(k) is not str:
            raise RemoteProtocolError(f"{where}: {_subject(key)} has a non-string key")
    return v


def _pairs_as_map(key: _Type, value: _Type) -> _Type:
    """A ``tuple[tuple[K, V], ...]`` that travels as a map of ``K`` to ``V``."""
    check_key, check_value = key.check, value.check
    expected = "a map"

    def check_map(v: object, where: str, name: str) -> object:
        if type(v) is not dict:
            raise bad(where, name, expected, v)
        label = f"a key of field {name!r}"
        pairs = []
        for k, x in v.items():
            k = check_key(k, where, label)
            pairs.append((k, check_value(x, where, f"{name}[{k!r}]")))
        return tuple(pairs)

    return _Type(check_map, dict, expected)


def _optional(inner: _Type) -> _Type:
    check = inner.check
    encode = inner.encode

    def check_optional(v: object, where: str, key: str) -> object:
        return None if v is None else check(v, where, key)

    encode_optional = None if encode is None else (lambda v: None if v is None else encode(v))
    valid = None if inner.valid is None else _or_nil(inner.valid, True)
    return _Type(check_optional, encode_optional, inner.expected + " or nil", valid=valid)


def _nil_is_default(inner: _Type, default: object, factory: Callable[[], object] | None) -> _Type:
    check = inner.check

    def check_or_default(v: object, where: str, key: str) -> object:
        if v is None:
            return default if factory is None else factory()
        return check(v, where, key)

    return _Type(check_or_default, inner.encode, inner.expected + " or nil", valid=inner.valid)


def _zero_is_default(inner: _Type, default: object) -> _Type:
    check = inner.check

    def check_or_default(v: object, where: str, key: str) -> object:
        v = check(v, where, key)
        return default if v == 0 and type(v) is int else v

    valid = None if inner.valid is None else f"({inner.valid}) and {{v}} != 0"
    return _Type(check_or_default, inner.encode, inner.expected, valid=valid)


def _array(item: _Type) -> _Type:
    check = item.check
    encode = item.encode
    expected = "an array"

    exact = item.exact

    def check_array(v: object, where: str, key: str) -> object:
        if type(v) is not list:
            raise bad(where, key, expected, v)
        for x in v:
            if type(x) is not exact:
                return tuple([check(x, where, f"{key}[{i}]") for i, x in enumerate(v)])
        return tuple(v)  # every entry as it is: no label to build

    if encode is None:
        return _Type(check_array, None, expected)
    return _Type(check_array, lambda v: [encode(x) for x in v], expected)


def _fixed(items: tuple[_Type, ...]) -> _Type:
    n = len(items)
    checks = tuple(t.check for t in items)
    expected = f"an array [{', '.join(t.expected for t in items)}]"

    def check_fixed(v: object, where: str, key: str) -> object:
        # A later version may append entries: ignore what follows.
        if type(v) is not list or len(v) < n:
            raise bad(where, key, expected, v)
        return tuple(
            [c(x, where, f"{key}[{j}]") for j, (c, x) in enumerate(zip(checks, v, strict=False))]
        )

    return _Type(check_fixed, None, expected)


def _nested(codec: MapCodec[Any]) -> _Type:
    decode = codec.decode

    def check_nested(v: object, where: str, key: str) -> object:
        if type(v) is not dict:
            raise bad(where, key, "a map", v)
        return decode(v, f"{where}.{key}")

    return _Type(check_nested, codec.encode, "a map")


def _array_of(codec: MapCodec[Any]) -> _Type:
    """An array of maps, each a message ``codec`` encodes and checks."""
    t = _array(_nested(codec))
    head, _, rest = codec.source.partition("\n")
    body, _, _ = rest.rpartition("    return d\n")
    if head != "def encode(m):" or not body:
        return t  # a hand-written encoder: called once an item
    # The item's encoder inlined in the loop, in its own namespace: one
    # Python call the less per item (a status page encodes 100 breakers).
    namespace = dict(getattr(codec.encode, "__globals__", {}))
    loop = "\n".join("    " + line for line in body.splitlines())
    source = "def encode(items):\n    out = []\n    for m in items:\n"
    exec(f"{source}{loop}\n        out.append(d)\n    return out\n", namespace)
    return _Type(t.check, namespace["encode"], t.expected, t.exact, t.valid)


def _as_arrays(cls: type[Any], n: int, nested: Mapping[type, MapCodec[Any]]) -> _Type:
    """An array of messages, each as the array of its first ``n`` fields, all required."""
    fields = dataclasses.fields(cls)[:n]
    hints = typing.get_type_hints(cls, include_extras=True)
    keys = tuple(f.name for f in fields)
    checks = tuple(_type_of(cls, f.name, hints[f.name], nested, None).check for f in fields)
    expected = f"an array [{', '.join(keys)}]"

    def check_item(v: object, where: str, key: str) -> object:
        if type(v) is not list or len(v) < n:
            raise bad(where, key, expected, v)
        at = f"{where}.{key}"
        return cls(*[c(x, at, k) for c, x, k in zip(checks, v, keys, strict=False)])

    array = _array(_Type(check_item, None, expected))
    # Generated, as the encoders are: attribute loads in a comprehension run
    # twice as fast as operator.attrgetter here.
    item = ", ".join(f"x.{k}" for k in keys)
    namespace: dict[str, Any] = {}
    exec(f"def encode(v):\n    return [[{item}] for x in v]\n", namespace)
    return _Type(array.check, namespace["encode"], "an array")


def _as_map(cls: type[Any], name: str, tp: Any, nested: Mapping[type, MapCodec[Any]]) -> _Type:
    """Field ``name``, a ``tuple[tuple[K, V], ...]``, as the map of its pairs."""
    pair = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
    kv = typing.get_args(pair) if typing.get_origin(pair) is tuple else ()
    if len(typing.get_args(tp)) != 2 or typing.get_args(tp)[1] is not Ellipsis or len(kv) != 2:
        raise TypeError(f"{cls.__name__}.{name}: as_map needs a tuple[tuple[K, V], ...]")
    key, value = (_type_of(cls, name, t, nested, None) for t in kv)
    if key.encode is not None or value.encode is not None:
        raise TypeError(f"{cls.__name__}.{name}: as_map keys and values must travel as they are")
    return _pairs_as_map(key, value)


def _type_of(
    cls: type[Any], name: str, tp: Any, nested: Mapping[type, MapCodec[Any]], group: str | None
) -> _Type:
    """The checker and encoder of field ``name`` of ``cls``, whose type is ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    nil = False
    if origin in (types.UnionType, typing.Union) and type(None) in args and len(args) == 2:
        nil = True
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return _scalar(tp, nil)
    if origin is typing.Annotated and args[0] is int:
        bounds = next((a for a in tp.__metadata__ if isinstance(a, Range)), None)
        if bounds is not None:
            return _bounded(bounds, nil, group)
    if origin is typing.Annotated and args[0] is float:
        finite = next((a for a in tp.__metadata__ if isinstance(a, Finite)), None)
        if finite is not None:
            return _finite(finite, nil)
    if origin is typing.Annotated and args[0] is str:
        names = next((a for a in tp.__metadata__ if isinstance(a, OneOf)), None)
        if names is not None:
            return _choice({n: n for n in names.names}, nil)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return _choice({str(m.value): m for m in tp}, nil)
    if origin is typing.Literal and all(type(a) is str for a in args):
        return _choice({a: a for a in args}, nil)
    inner: _Type | None = None
    if origin is dict and args == (str, Any):
        inner = _Type(_check_str_map, None, "a map")
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = args[0]
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            inner = _array_of(nested.get(item) or derive(item, nested=nested))
        else:
            inner = _array(_type_of(cls, name, item, nested, None))
    elif origin is tuple and args and Ellipsis not in args:
        inner = _fixed(tuple(_type_of(cls, name, a, nested, None) for a in args))
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        inner = _nested(nested.get(tp) or derive(tp, nested=nested))
    if inner is None:
        raise TypeError(f"{cls.__name__}.{name}: no wire codec for the type {tp!r}")
    return _optional(inner) if nil else inner


# --- one message -----------------------------------------------------------------

_ALWAYS, _UNLESS_DEFAULT, _WITH_GROUP, _WITH_FIELD = 0, 1, 2, 3


class _Field(NamedTuple):
    key: str
    check: Check
    encode: _Encode | None
    #: When the encoder sends it: _ALWAYS, _UNLESS_DEFAULT, _WITH_GROUP, or
    #: _WITH_FIELD (when ``leader`` is sent).
    send: int
    required: bool
    default: object
    factory: Callable[[], object] | None
    #: The keys of its group (itself included); () when in none.
    group: tuple[str, ...]
    leader: str | None
    valid: str | None


def derive(
    cls: type[_M], *, tag: str | None = None, nested: Mapping[type, MapCodec[Any]] | None = None
) -> MapCodec[_M]:
    """Build ``cls``'s codec from its fields (rules in ``_wire``).

    ``tag``: the encoder puts ``"type": tag`` first in every map (results do).
    ``nested``: the codecs to use for messages inside this one (a hand-tuned
    one, say); others are derived as they come.
    """
    message: type[_M] = cls  # as given: is_dataclass() below narrows `cls`
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    nested = nested or {}
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(cls)
    plain = Wire()
    groups: dict[str, list[str]] = {}
    for f in fields:
        group = f.metadata.get(WIRE, plain).group
        if group is not None:
            groups.setdefault(group, []).append(f.name)
    specs: list[_Field] = []
    for f in fields:
        rules: Wire = f.metadata.get(WIRE, plain)
        if not f.init:
            raise TypeError(f"{cls.__name__}.{f.name}: every field must be an __init__ argument")
        group = tuple(groups[rules.group]) if rules.group is not None else ()
        if rules.arrays is not None:
            item = typing.get_args(hints[f.name])[0]
            t = _as_arrays(item, rules.arrays, nested)
        elif rules.as_map:
            t = _as_map(cls, f.name, hints[f.name], nested)
        else:
            t = _type_of(cls, f.name, hints[f.name], nested, " and ".join(group) or None)
        factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
        default = factory() if factory is not None else f.default
        required = rules.required or (f.default is dataclasses.MISSING and factory is None)
        if rules.nil:
            t = _nil_is_default(t, default, factory)
        if rules.zero:
            t = _zero_is_default(t, default)
        if required or rules.always:
            send = _ALWAYS
        elif rules.sent_with is not None:
            if rules.sent_with not in {s.key for s in specs}:
                raise TypeError(f"{cls.__name__}.{f.name}: sent_with must name an earlier field")
            send = _WITH_FIELD
        else:
            send = _WITH_GROUP if group else _UNLESS_DEFAULT
        specs.append(
            _Field(
                f.name,
                t.check,
                t.encode,
                send,
                required,
                default,
                factory,
                group,
                rules.sent_with,
                t.valid,
            )
        )
    encode, source = _encoder(message, tuple(specs), tag)
    return MapCodec(message, encode, _decoder(message, tuple(specs)), source)


def _encoder(
    cls: type[_M], specs: tuple[_Field, ...], tag: str | None
) -> tuple[Callable[[_M], WireMap], str]:
    source, namespace = _encoder_source(cls, specs, tag)
    # Safe to exec: the only names in it are the dataclass's fields (checked
    # identifiers) and the namespace's own.
    exec(source, namespace)
    encode: Callable[[_M], WireMap] = namespace["encode"]
    return encode, source


def _differs(i: int, default: object, namespace: dict[str, Any], v: str = "v") -> str:
    """The test that ``v`` is not ``default``: identity and truth where they say it."""
    if default is None:
        return f"{v} is not None"
    if default is True:
        return f"{v} is not True"
    if type(default) in (int, float, bool, str, tuple) and not default:
        return v  # 0, 0.0, False, "", (): what the hand-written encoders tested
    namespace[f"default_{i}"] = default
    return f"{v} != default_{i}"


def _encoder_source(
    cls: type[Any], specs: tuple[_Field, ...], tag: str | None
) -> tuple[str, dict[str, Any]]:
    """The source of ``cls``'s encoder and the names it uses."""
    namespace: dict[str, Any] = {}

    def value(i: int, s: _Field, v: str) -> str:
        if s.encode is None:
            return v
        namespace[f"encode_{i}"] = s.encode
        return f"encode_{i}({v})"

    head = [] if tag is None else [f"{'type'!r}: {tag!r}"]
    body: list[str] = []
    i = 0
    while i < len(specs):
        s = specs[i]
        if not s.key.isidentifier():
            raise TypeError(f"{cls.__name__}: {s.key!r} is no identifier")
        if s.send == _ALWAYS and not body:
            # Sent always, before anything conditional: in the display.
            head.append(f"{s.key!r}: {value(i, s, 'm.' + s.key)}")
        elif s.send == _ALWAYS:
            body.append(f"d[{s.key!r}] = {value(i, s, 'm.' + s.key)}")
        elif s.send == _WITH_GROUP:
            # A group is sent whole, its fields in order: they must be adjacent.
            n = len(s.group)
            if tuple(f.key for f in specs[i : i + n]) != s.group:
                raise TypeError(f"{cls.__name__}.{s.key}: the fields of a group must be adjacent")
            members = list(enumerate(specs[i : i + n]))
            body += [f"g{j} = m.{f.key}" for j, f in members]
            differs = [_differs(i + j, f.default, namespace, f"g{j}") for j, f in members]
            body.append(f"if {' or '.join(differs)}:")
            body += [f"    d[{f.key!r}] = {value(i + j, f, f'g{j}')}" for j, f in members]
            i += n
            continue
        elif s.send == _WITH_FIELD:
            if specs[i - 1].key != s.leader or specs[i - 1].send != _UNLESS_DEFAULT:
                body.append(f"if {s.leader!r} in d:")
            # else: right after its leader's own test, inside it
            body.append(f"    d[{s.key!r}] = {value(i, s, 'm.' + s.key)}")
        else:
            body.append(f"v = m.{s.key}")
            body.append(f"if {_differs(i, s.default, namespace)}:")
            body.append(f"    d[{s.key!r}] = {value(i, s, 'v')}")
        i += 1
    lines = ["def encode(m):", f"    d = {{{', '.join(head)}}}"]
    lines += [f"    {line}" for line in body]
    lines.append("    return d")
    return "\n".join(lines) + "\n", namespace


def _decoder(cls: type[_M], specs: tuple[_Field, ...]) -> Callable[[WireMap, str], _M]:
    # Generated as the encoder is, for the same reason: each field is one
    # lookup and one inline test of a value valid as it is, its default
    # inline when absent; anything else (a conversion, an enum, a nested
    # message, a fault) goes to the field's checker, and a missing required
    # field to `field_i`.
    namespace: dict[str, Any] = {"MISSING": MISSING}
    lines = ["def decode(d, where):", "    get = d.get"]
    for i, s in enumerate(specs):
        namespace[f"field_{i}"] = _field_reader(s)
        namespace[f"check_{i}"] = s.check
        namespace[f"default_{i}"] = s.default
        valid = None if s.valid is None else s.valid.format(v=f"v{i}")
        check = f"v{i} = check_{i}(v{i}, where, {s.key!r})"
        if s.group and s.key != s.group[0]:
            continue  # read with the group's first field
        if s.group:
            # A group is absent as a whole (one test), or each of it is checked.
            members = [(i + j, specs[i + j]) for j in range(len(s.group))]
            lines += [f"    v{j} = get({f.key!r}, MISSING)" for j, f in members]
            lines.append(f"    if {' and '.join(f'v{j} is MISSING' for j, _ in members)}:")
            lines += [f"        v{j} = default_{j}" for j, _ in members]
            lines.append("    else:")
            for j, f in members:
                lines.append(f"        if v{j} is MISSING:")
                lines.append(f"            v{j} = field_{j}(d, v{j}, where)")  # raises
                test = "else" if f.valid is None else f"elif not ({f.valid.format(v=f'v{j}')})"
                lines += [
                    f"        {test}:",
                    f"            v{j} = check_{j}(v{j}, where, {f.key!r})",
                ]
            continue
        if not s.required and s.factory is None and s.valid and _holds(s.valid, s.default):
            # The default is valid as it is: an absent field needs no branch of its own.
            lines += [f"    v{i} = get({s.key!r}, default_{i})", f"    if not ({valid}):"]
            lines.append(f"        {check}")
            continue
        lines += [f"    v{i} = get({s.key!r}, MISSING)", f"    if v{i} is MISSING:"]
        if s.required:
            lines.append(f"        v{i} = field_{i}(d, v{i}, where)")  # raises
        elif s.factory is not None:
            namespace[f"factory_{i}"] = s.factory
            lines.append(f"        v{i} = factory_{i}()")
        else:
            lines.append(f"        v{i} = default_{i}")
        lines.append("    else:" if valid is None else f"    elif not ({valid}):")
        lines.append(f"        {check}")
    lines += construct_lines(cls, [f"v{i}" for i in range(len(specs))], namespace)
    exec("\n".join(lines) + "\n", namespace)
    decode: Callable[[WireMap, str], _M] = namespace["decode"]
    return decode


def _holds(valid: str, value: object) -> bool:
    """Whether ``value`` passes the inline test ``valid``."""
    return bool(eval(valid.format(v="v"), {}, {"v": value}))


def _field_reader(s: _Field) -> Callable[[WireMap, object, str], object]:
    """Field ``s`` from its value ``v`` in map ``d`` (``MISSING`` when absent)."""
    key, check, required, default, factory, group = (
        s.key,
        s.check,
        s.required,
        s.default,
        s.factory,
        s.group,
    )

    def read(d: WireMap, v: object, where: str) -> object:
        if v is not MISSING:
            return check(v, where, key)
        if required or (group and not d.keys().isdisjoint(group)):
            raise bad(where, key, "", v)
        return default if factory is None else factory()

    return read
