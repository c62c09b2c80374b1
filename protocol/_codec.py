"""Message objects <-> plain msgpack values, in MessagePack-RPC shapes.

Rules of the wire (protocol version 1)
--------------------------------------

* A request is ``[0, msgid, method, params]``, a response
  ``[1, msgid, error, result]``, a notification ``[2, method, params]``, as
  in msgpack-rpc. ``msgid`` is an unsigned 32-bit integer the client picks;
  responses may come back in any order; a notification gets no reply.
* ``params`` and ``result`` are maps with string keys, one key per field of
  the message dataclass (nested dataclasses nest as maps, tuples become
  arrays, enums travel as their string values). A field that has a default in
  ``_messages`` may be left out and takes that default, and is sent only when
  it differs from it; a field without one is required. The exceptions are
  marked on the field (``_wire``: sent always, sent with another, in groups).
  Unknown keys are ignored, so a later version can add fields without
  breaking older peers. Each message's codec is derived from its dataclass
  (``_derive``); adding a field is one line in ``_messages``.
* Every result map also carries ``"type"``, the name of its message
  (``welcome``, ``registered``, ``admission``, ``snapshot``, ``status``): the
  connection keeps no table of msgids, so a result has to say what it is.
* The hot path is the exception to "maps everywhere": an item of a
  ``reports`` batch is the array
  ``[name, generation, outcome, duration, lease, retry_after]``. Key strings
  would triple its size. A later version may only append to this array, and
  decoders ignore trailing entries they do not know.
* Counts (``reports`` successes and rejections, ``acquire`` successes)
  are at most ``MAX_COUNT``; a larger one is a protocol error.
* An error is ``[code, message, details]``: ``code`` is one of
  ``ERROR_CODES``, ``details`` a map (``BreakerError.details()``) or nil.
  Extra trailing entries are ignored, as for report items.

=========  ============  ====================  ================
method     kind          params                result
=========  ============  ====================  ================
hello      request       Hello                 Welcome
register   request       Register              Registered
acquire    request       Acquire               Admission
report     request       Report                Snapshot
admin      request       Admin                 Snapshot
status     request       StatusRequest         Status
subscribe  request       Subscribe             Subscribed
reports    notification  ReportBatch           (client to server)
state      notification  StatePush             (server to client)
transition notification  TransitionEvent       (server to client, after subscribe)
=========  ============  ====================  ================

``subscribe`` and ``transition`` are additions within version 1: a client
that never subscribes never receives a ``transition``, and a daemon too old
to know ``subscribe`` closes the connection as for any unknown method.

Decoding raises ``RemoteProtocolError`` naming the message and field at fault
(``"acquire params: field 'name' must be a string, got an integer"``), and
nothing else; the decoders assume their input came from the peer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

from ._derive import MISSING, MapCodec, bad, derive, wire_type
from ._errors import BreakerError, RemoteProtocolError, error_from_code
from ._make import constructor
from ._messages import (
    Acquire,
    Admin,
    Admission,
    BudgetGrant,
    BudgetRequest,
    CircuitState,
    Hello,
    Outcome,
    Register,
    Registered,
    Report,
    ReportBatch,
    Snapshot,
    StatePush,
    Status,
    StatusRequest,
    Subscribe,
    Subscribed,
    TransitionEvent,
    Welcome,
)
from ._wire import MAX_COUNT as MAX_COUNT

#: The newest protocol version this code speaks (sent in ``Hello.max_version``).
PROTOCOL_VERSION: Final = 1
#: The oldest protocol version this code still speaks.
MIN_PROTOCOL_VERSION: Final = 1
#: Largest frame body accepted or sent, in bytes (1 MiB). A frame is a 4-byte
#: big-endian length and one msgpack message; a longer announced length is
#: refused as soon as its header arrives, without waiting for its body. A
#: ``Status`` of about 4,000 breakers fits (a breaker takes some 250 bytes).
MAX_FRAME_SIZE: Final = 1 << 20

#: Largest msgid: msgpack-rpc msgids are unsigned 32-bit integers.
MAX_MSGID: Final = 0xFFFF_FFFF

REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2

RequestMessage: TypeAlias = (
    Hello | Register | Acquire | Report | Admin | StatusRequest | Subscribe | BudgetRequest
)
ResultMessage: TypeAlias = (
    Welcome | Registered | Admission | Snapshot | Status | Subscribed | BudgetGrant
)
NotificationMessage: TypeAlias = StatePush | ReportBatch | TransitionEvent

_Map: TypeAlias = dict[str, Any]


# --- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """The peer (a client) asks for something; answer with the same ``msgid``."""

    msgid: int
    message: RequestMessage


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The answer to the request ``msgid``: exactly one of ``result`` and ``error`` is set."""

    msgid: int
    result: ResultMessage | None
    error: BreakerError | None


@dataclass(frozen=True, slots=True)
class NotificationReceived:
    """A message that expects no reply."""

    message: NotificationMessage


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side cleanly, between two frames."""


Event: TypeAlias = RequestReceived | ResponseReceived | NotificationReceived | ConnectionClosed

# One of these comes out of every frame: built as the messages are (``constructor``).
_request_received: Final = constructor(RequestReceived)
_response_received: Final = constructor(ResponseReceived)
_notification_received: Final = constructor(NotificationReceived)


# --- the messages each method carries ----------------------------------------
#
# Registering a message is one line here (and one in the unions above): its
# codec is derived from its dataclass (``_derive``, rules in ``_wire``).

_REQUESTS: Final[dict[str, type[RequestMessage]]] = {
    "hello": Hello,
    "register": Register,
    "acquire": Acquire,
    "report": Report,
    "admin": Admin,
    "status": StatusRequest,
    "subscribe": Subscribe,
    "budget": BudgetRequest,
}
_RESULTS: Final[dict[str, type[ResultMessage]]] = {
    "welcome": Welcome,
    "registered": Registered,
    "admission": Admission,
    "snapshot": Snapshot,
    "status": Status,
    "subscribed": Subscribed,
    "budget_grant": BudgetGrant,
}
_NOTIFICATIONS: Final[dict[str, type[NotificationMessage]]] = {
    "reports": ReportBatch,
    "state": StatePush,
    "transition": TransitionEvent,
}


# --- hand-tuned decoders --------------------------------------------------------
#
# Every encoder and checker is derived, as fast as a hand-written one would
# be for most messages. Three decoders stay hand-tuned, where
# bench/bench_codec.py --fast-paths shows the derived checker costing more on
# the hot path (1.1-1.2x for a snapshot or an admission, 3.5x for 100
# report items): a snapshot comes with nearly every reply and push, an
# admission answers every strict acquire, a report item stands for one call.
# Each checks the usual shape in one expression and hands anything else (ints
# for floats, missing or bad fields) to its derived twin, which converts or
# names the fault; they decode exactly as the twin does (pinned by
# tests/test_protocol_props.py).

_STATES: Final[dict[str, CircuitState]] = {s.value: s for s in CircuitState}
_OUTCOMES: Final[dict[str, Outcome]] = {o.value: o for o in Outcome}


def _knows(cls: type, fields: str, where: str, *, leading: bool = False) -> None:
    # The fields a hand-tuned decoder handles, by name. One added to the
    # dataclass must be added to the decoder too, or it would be lost on the
    # way in: fail at import rather than on the wire.
    names = tuple(f.name for f in dataclasses.fields(cls))
    if (names[: len(fields.split())] if leading else names) != tuple(fields.split()):
        raise TypeError(f"{cls.__name__}'s fields changed: update {where} in _codec to match")


_knows(
    Snapshot,
    "name state generation open_until failure_rate slow_call_rate calls trials_in_flight"
    " slow_call_duration successes_safe reason error_code opened_by_pid",
    "_snapshot",
)
_knows(Admission, "admitted generation lease snapshot retry_after", "_admission")
_knows(ReportBatch, "items successes rejections", "_reports")
# A report item is the array of these, in this order (``wire(arrays=6)``).
_knows(Report, "name generation outcome duration lease retry_after", "_reports", leading=True)

_DERIVED_SNAPSHOT: Final = derive(Snapshot)
_DERIVED_ADMISSION: Final = derive(Admission, tag="admission", nested={Snapshot: _DERIVED_SNAPSHOT})
_DERIVED_REPORTS: Final = derive(ReportBatch)
_snapshot_fields: Final = _DERIVED_SNAPSHOT.decode
# Built as the derived decoders build messages (``_make``):
# each field set through its slot, faster than the frozen ``__init__``.
_new_snapshot: Final = constructor(Snapshot)
_new_admission: Final = constructor(Admission)
_new_report: Final = constructor(Report)
_new_batch: Final = constructor(ReportBatch)


def _snapshot(d: _Map, where: str) -> Snapshot:
    get = d.get
    name = get("name")
    state = get("state")
    generation = get("generation")
    open_until = get("open_until")
    failure_rate = get("failure_rate")
    slow_call_rate = get("slow_call_rate")
    calls = get("calls", 0)
    trials_in_flight = get("trials_in_flight", 0)
    slow_call_duration = get("slow_call_duration")
    successes_safe = get("successes_safe", True)
    reason = get("reason")
    error_code = get("error_code")
    opened_by_pid = get("opened_by_pid", 0)
    if (
        type(name) is str
        and type(state) is str
        and type(generation) is int
        and type(calls) is int
        and type(trials_in_flight) is int
        and (open_until is None or type(open_until) is float)
        and (failure_rate is None or type(failure_rate) is float)
        and (slow_call_rate is None or type(slow_call_rate) is float)
        and (slow_call_duration is None or type(slow_call_duration) is float)
        and type(successes_safe) is bool
        and (reason is None or type(reason) is str)
        and (error_code is None or type(error_code) is str)
        and type(opened_by_pid) is int
    ):
        member = _STATES.get(state)
        if member is not None:
            return _new_snapshot(
                name,
                member,
                generation,
                open_until,
                failure_rate,
                slow_call_rate,
                calls,
                trials_in_flight,
                slow_call_duration,
                successes_safe,
                reason,
                error_code,
                opened_by_pid,
            )
    return _snapshot_fields(d, where)


def _snapshot_result_map(s: Snapshot) -> _Map:
    # The tag comes last here, first in every other result: the bytes stay
    # what they always were.
    d = _DERIVED_SNAPSHOT.encode(s)
    d["type"] = "snapshot"
    return d


def _admission(d: _Map, where: str = "admission result") -> Admission:
    get = d.get
    admitted = get("admitted")
    generation = get("generation")
    lease = get("lease")
    snapshot = get("snapshot")
    retry_after = get("retry_after")
    if (
        type(admitted) is bool
        and type(generation) is int
        and type(lease) is int
        and type(snapshot) is dict
        and (retry_after is None or type(retry_after) is float)
    ):
        nested = _snapshot(snapshot, f"{where}.snapshot")
        return _new_admission(admitted, generation, lease, nested, retry_after)
    return _DERIVED_ADMISSION.decode(d, where)


def _admission_fields(d: _Map, where: str = "admission result") -> Admission:
    return _DERIVED_ADMISSION.decode(d, where)


_NONE: Final[list[Any]] = []


def _reports(d: _Map, where: str) -> ReportBatch:
    items = d.get("items")
    successes = d.get("successes", _NONE)
    rejections = d.get("rejections", _NONE)
    if type(items) is not list or type(successes) is not list or type(rejections) is not list:
        return _DERIVED_REPORTS.decode(d, where)
    outcomes = _OUTCOMES
    new_report = _new_report
    batch = []
    # Inline checks: this loop runs once per reported call.
    for item in items:
        if type(item) is not list or len(item) < 6:
            return _DERIVED_REPORTS.decode(d, where)
        name = item[0]
        generation = item[1]
        outcome = item[2]
        duration = item[3]
        lease = item[4]
        retry_after = item[5]
        if (
            type(name) is not str
            or type(generation) is not int
            or type(outcome) is not str
            or type(lease) is not int
            or (type(duration) is not float and type(duration) is not int)
            or not (retry_after is None or type(retry_after) is float or type(retry_after) is int)
        ):
            return _DERIVED_REPORTS.decode(d, where)
        oc = outcomes.get(outcome)
        if oc is None:
            return _DERIVED_REPORTS.decode(d, where)
        if type(duration) is int:
            duration = float(duration)
        if type(retry_after) is int:
            retry_after = float(retry_after)
        batch.append(new_report(name, generation, oc, duration, lease, retry_after, None, None, 0))
    counted = _counts(successes, 3)
    rejected = _counts(rejections, 2)
    if counted is None or rejected is None:
        return _DERIVED_REPORTS.decode(d, where)
    return _new_batch(tuple(batch), counted, rejected)


def _counts(raw: list[Any], width: int) -> tuple[Any, ...] | None:
    # Arrays of [name, (generation,) count]; None: something for the derived
    # checker to name. One of these comes with nearly every request.
    entries = []
    for entry in raw:
        if (
            type(entry) is not list
            or len(entry) < width
            or type(entry[0]) is not str
            or type(entry[1]) is not int
            or entry[1] < 0
            or (width > 2 and (type(entry[2]) is not int or entry[2] < 0))
            or entry[width - 1] > MAX_COUNT
        ):
            return None
        entries.append(tuple(entry[:width]))
    return tuple(entries)


_FAST: Final[dict[type, MapCodec[Any]]] = {
    Snapshot: MapCodec(Snapshot, _DERIVED_SNAPSHOT.encode, _snapshot)
}
_FAST_ENCODERS: Final[dict[type, Callable[[Any], _Map]]] = {Snapshot: _snapshot_result_map}
_FAST_DECODERS: Final[dict[type, Callable[[_Map, str], Any]]] = {
    Snapshot: _snapshot,
    Admission: _admission,
    ReportBatch: _reports,
}


# --- dispatch tables --------------------------------------------------------------

_M = TypeVar("_M")


# Derived once each (deriving costs about 0.2 ms a message, at every start).
_DERIVED: Final[dict[tuple[type, str | None], MapCodec[Any]]] = {
    (Snapshot, None): _DERIVED_SNAPSHOT,
    (Admission, "admission"): _DERIVED_ADMISSION,
    (ReportBatch, None): _DERIVED_REPORTS,
}


def _derived(cls: type[_M], tag: str | None) -> MapCodec[_M]:
    codec = _DERIVED.get((cls, tag))
    if codec is None:
        codec = _DERIVED[cls, tag] = derive(cls, tag=tag, nested=_FAST)
    return codec


def _encoder(cls: type[_M], tag: str | None = None) -> Callable[[_M], _Map]:
    fast = _FAST_ENCODERS.get(cls)
    return fast if fast is not None else _derived(cls, tag).encode


def _decoder(
    cls: type[_M], where: str, tag: str | None = None
) -> tuple[Callable[[_Map, str], _M], str]:
    # With the `where` its errors name ("acquire params"), made once here.
    fast = _FAST_DECODERS.get(cls)
    return (fast if fast is not None else _derived(cls, tag).decode, where)


_REQUEST_ENCODERS: Final[dict[type, tuple[str, Callable[[Any], _Map]]]] = {
    cls: (method, _encoder(cls)) for method, cls in _REQUESTS.items()
}
_REQUEST_DECODERS: Final[dict[str, tuple[Callable[[_Map, str], RequestMessage], str]]] = {
    method: _decoder(cls, f"{method} params") for method, cls in _REQUESTS.items()
}
_RESULT_ENCODERS: Final[dict[type, Callable[[Any], _Map]]] = {
    cls: _encoder(cls, tag) for tag, cls in _RESULTS.items()
}
_RESULT_DECODERS: Final[dict[str, tuple[Callable[[_Map, str], ResultMessage], str]]] = {
    tag: _decoder(cls, f"{tag} result", tag) for tag, cls in _RESULTS.items()
}
_NOTIFICATION_ENCODERS: Final[dict[type, tuple[str, Callable[[Any], _Map]]]] = {
    cls: (method, _encoder(cls)) for method, cls in _NOTIFICATIONS.items()
}
_NOTIFICATION_DECODERS: Final[dict[str, tuple[Callable[[_Map, str], NotificationMessage], str]]] = {
    method: _decoder(cls, f"{method} params") for method, cls in _NOTIFICATIONS.items()
}


def method_of(message: RequestMessage | NotificationMessage) -> str:
    """The wire method that carries ``message`` (``"hello"``, ``"reports"``...)."""
    entry = _REQUEST_ENCODERS.get(type(message)) or _NOTIFICATION_ENCODERS.get(type(message))
    if entry is None:
        raise TypeError(f"{type(message).__name__} is not a request or a notification")
    return entry[0]


# --- encoding ----------------------------------------------------------------------
#
# Encoders trust their input's types (mypy checks them) and only look up the
# method: validating every field on the way out would tax the hot path twice.


def _bad_msgid(msgid: int) -> ValueError:
    # Tested inline by the encoders: a call to test it costs 4% of a small message.
    return ValueError(f"msgid must be an unsigned 32-bit integer, got {msgid}")


def encode_request(msgid: int, message: RequestMessage) -> list[Any]:
    """``[0, msgid, method, params]`` for a request message."""
    entry = _REQUEST_ENCODERS.get(type(message))
    if entry is None:
        raise TypeError(f"{type(message).__name__} cannot be sent as a request")
    if not 0 <= msgid <= MAX_MSGID:
        raise _bad_msgid(msgid)
    return [REQUEST, msgid, entry[0], entry[1](message)]


def encode_response(msgid: int, result: ResultMessage) -> list[Any]:
    """``[1, msgid, nil, result]`` for a successful reply."""
    encoder = _RESULT_ENCODERS.get(type(result))
    if encoder is None:
        raise TypeError(f"{type(result).__name__} cannot be sent as a result")
    if not 0 <= msgid <= MAX_MSGID:
        raise _bad_msgid(msgid)
    return [RESPONSE, msgid, None, encoder(result)]


def encode_error(msgid: int, error: BreakerError) -> list[Any]:
    """``[1, msgid, [code, message, details], nil]`` for a failed reply."""
    if not 0 <= msgid <= MAX_MSGID:
        raise _bad_msgid(msgid)
    return [RESPONSE, msgid, error_to_wire(error), None]


def encode_notification(message: NotificationMessage) -> list[Any]:
    """``[2, method, params]`` for a notification message."""
    entry = _NOTIFICATION_ENCODERS.get(type(message))
    if entry is None:
        raise TypeError(f"{type(message).__name__} cannot be sent as a notification")
    return [NOTIFICATION, entry[0], entry[1](message)]


def error_to_wire(error: BreakerError) -> list[Any]:
    """The ``[code, message, details]`` triple that carries ``error``."""
    if not isinstance(error, BreakerError):
        raise TypeError(f"only BreakerError travels on the wire, not {type(error).__name__}")
    return [error.code, str(error), error.details()]


def error_from_wire(triple: object) -> BreakerError:
    """Rebuild the exception a ``[code, message, details]`` triple describes.

    An unknown code (from a newer peer) becomes a plain ``BreakerError``.
    """
    if type(triple) is not list or len(triple) < 3:
        raise RemoteProtocolError(
            f"error must be an array [code, message, details], got {wire_type(triple)}"
        )
    code, message, details = triple[0], triple[1], triple[2]
    if type(code) is not str:
        raise bad("error", "code", "a string", code)
    if type(message) is not str:
        raise bad("error", "message", "a string", message)
    if details is not None and type(details) is not dict:
        raise bad("error", "details", "a map or nil", details)
    try:
        return error_from_code(code, message, details)
    except Exception as exc:  # details from a peer are untrusted input
        raise RemoteProtocolError(f"error {code!r}: unusable details: {exc}") from exc


# --- decoding -------------------------------------------------------------------


def _msgid(value: object, where: str) -> int:
    if type(value) is int and 0 <= value <= MAX_MSGID:
        return value
    raise RemoteProtocolError(
        f"{where}: msgid must be an unsigned 32-bit integer, got {wire_type(value)}"
        + (f" {value}" if type(value) is int else "")
    )


def decode_message(obj: object) -> RequestReceived | ResponseReceived | NotificationReceived:
    """Turn one decoded msgpack value into an event.

    Raises ``RemoteProtocolError`` (and nothing else) when ``obj`` is not a
    well-formed message of this protocol.
    """
    try:
        return _decode_message(obj)
    except RemoteProtocolError:
        raise
    except Exception as exc:
        # A safety net: the checks above should leave nothing for it to catch.
        raise RemoteProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def _decode_message(obj: object) -> RequestReceived | ResponseReceived | NotificationReceived:
    if type(obj) is not list or not obj:
        raise RemoteProtocolError(
            f"a message must be a non-empty msgpack-rpc array, got {wire_type(obj)}"
        )
    kind = obj[0]
    n = len(obj)
    if type(kind) is int:
        if kind == REQUEST and n == 4:
            msgid = _msgid(obj[1], "request")
            method, params = obj[2], obj[3]
            decoder = _REQUEST_DECODERS.get(method) if type(method) is str else None
            if decoder is None:
                raise RemoteProtocolError(f"unknown request method {method!r}")
            if type(params) is not dict:
                raise RemoteProtocolError(f"{method} params must be a map, got {wire_type(params)}")
            return _request_received(msgid, decoder[0](params, decoder[1]))
        if kind == RESPONSE and n == 4:
            msgid = _msgid(obj[1], "response")
            error, result = obj[2], obj[3]
            if error is not None:
                if result is not None:
                    raise RemoteProtocolError("response has both an error and a result")
                return _response_received(msgid, None, error_from_wire(error))
            return _response_received(msgid, _decode_result(result), None)
        if kind == NOTIFICATION and n == 3:
            method, params = obj[1], obj[2]
            ndecoder = _NOTIFICATION_DECODERS.get(method) if type(method) is str else None
            if ndecoder is None:
                raise RemoteProtocolError(f"unknown notification method {method!r}")
            if type(params) is not dict:
                raise RemoteProtocolError(f"{method} params must be a map, got {wire_type(params)}")
            return _notification_received(ndecoder[0](params, ndecoder[1]))
    raise RemoteProtocolError(
        "a message must be [0, msgid, method, params], [1, msgid, error, result] "
        f"or [2, method, params]; got an array of {n} starting with {wire_type(kind)}"
        + (f" {kind}" if type(kind) is int else "")
    )


def _decode_result(result: object) -> ResultMessage:
    if type(result) is not dict:
        raise RemoteProtocolError(f"result must be a map, got {wire_type(result)}")
    tag = result.get("type", MISSING)
    decoder = _RESULT_DECODERS.get(tag) if type(tag) is str else None
    if decoder is None:
        if tag is MISSING:
            raise RemoteProtocolError("result: missing required field 'type'")
        raise RemoteProtocolError(
            f"result: field 'type' is {tag!r}, not one of: {', '.join(sorted(_RESULT_DECODERS))}"
        )
    return decoder[0](result, decoder[1])
