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
  ``_messages`` may be left out and takes that default; a field without one is
  required. Unknown keys are ignored, so a later version can add fields
  without breaking older peers.
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

Decoding raises ``RemoteProtocolError`` naming the message and field at fault;
the decoders assume their input came from the peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar, cast

from ._budget_wire import budget_grant, budget_grant_map, budget_request, budget_request_map
from ._errors import BreakerError, RemoteProtocolError, error_from_code
from ._messages import (
    ADMIN_OPS,
    Acquire,
    Admin,
    AdminOp,
    Admission,
    BreakerStatus,
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

#: Largest count on the wire (``ReportBatch.successes`` and ``rejections``
#: counts, ``Acquire.successes``): an unsigned 32-bit integer, like a msgid.
#: A client counts at most one batch of queued outcomes in one entry
#: (``max_queued_reports``, 100,000 by default), so no honest peer gets near
#: it; a frame past it is a protocol error, and its connection is closed.
MAX_COUNT: Final = 0xFFFF_FFFF

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


# --- field checks ----------------------------------------------------------------

_MISSING: Final[Any] = object()

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


def _wire_type(value: object) -> str:
    return _WIRE_TYPE_NAMES.get(type(value), type(value).__name__)


def _bad(where: str, key: str, expected: str, value: object) -> RemoteProtocolError:
    if value is _MISSING:
        return RemoteProtocolError(f"{where}: missing required field {key!r}")
    return RemoteProtocolError(
        f"{where}: field {key!r} must be {expected}, got {_wire_type(value)}"
    )


# `type(v) is int` rather than isinstance: bool is an int subclass and a
# boolean is not a number on this wire.


def _str(d: _Map, key: str, where: str) -> str:
    v = d.get(key, _MISSING)
    if type(v) is str:
        return v
    raise _bad(where, key, "a string", v)


def _opt_str(d: _Map, key: str, where: str) -> str | None:
    v = d.get(key)
    if v is None or type(v) is str:
        return v
    raise _bad(where, key, "a string or nil", v)


def _int(d: _Map, key: str, where: str, default: int | None = None) -> int:
    v = d.get(key, _MISSING)
    if type(v) is int:
        return v
    if v is _MISSING and default is not None:
        return default
    raise _bad(where, key, "an integer", v)


def _bool(d: _Map, key: str, where: str, default: bool | None = None) -> bool:
    v = d.get(key, _MISSING)
    if type(v) is bool:
        return v
    if v is _MISSING and default is not None:
        return default
    raise _bad(where, key, "a boolean", v)


def _float(d: _Map, key: str, where: str, default: float) -> float:
    v = d.get(key, _MISSING)
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    if v is _MISSING:
        return default
    raise _bad(where, key, "a number", v)


def _opt_float(d: _Map, key: str, where: str) -> float | None:
    v = d.get(key)
    if type(v) is float or v is None:
        return v
    if type(v) is int:
        return float(v)
    raise _bad(where, key, "a number or nil", v)


def _map(d: _Map, key: str, where: str) -> _Map:
    v = d.get(key, _MISSING)
    if type(v) is dict:
        return v
    raise _bad(where, key, "a map", v)


def _array(d: _Map, key: str, where: str) -> list[Any]:
    v = d.get(key, _MISSING)
    if type(v) is list:
        return v
    raise _bad(where, key, "an array", v)


_E = TypeVar("_E")


def _enum(d: _Map, key: str, where: str, table: dict[str, _E]) -> _E:
    v = d.get(key, _MISSING)
    # Check the type first: an array is unhashable and would raise TypeError.
    if type(v) is str:
        member = table.get(v)
        if member is not None:
            return member
        raise _unknown_value(where, key, v, table)
    raise _bad(where, key, "a string", v)


def _unknown_value(where: str, key: str, value: str, table: dict[str, Any]) -> RemoteProtocolError:
    allowed = ", ".join(sorted(table))
    return RemoteProtocolError(f"{where}: field {key!r} is {value!r}, not one of: {allowed}")


_STATES: Final[dict[str, CircuitState]] = {s.value: s for s in CircuitState}
_OUTCOMES: Final[dict[str, Outcome]] = {o.value: o for o in Outcome}
_ADMIN_OPS: Final[dict[str, AdminOp]] = {op: cast(AdminOp, op) for op in ADMIN_OPS}


# --- message <-> map ----------------------------------------------------------
#
# Enum members go to msgpack as they are: they are str subclasses, which
# msgpack packs as plain strings, and skipping `.value` saves a descriptor call.


def _snapshot_map(s: Snapshot) -> _Map:
    d: _Map = {
        "name": s.name,
        "state": s.state,
        "generation": s.generation,
        "open_until": s.open_until,
        "failure_rate": s.failure_rate,
        "slow_call_rate": s.slow_call_rate,
        "calls": s.calls,
        "trials_in_flight": s.trials_in_flight,
        "slow_call_duration": s.slow_call_duration,
    }
    if not s.successes_safe:
        d["successes_safe"] = False  # the usual True stays off the wire
    # Why it is open: optional keys, off the wire while closed (and for old peers).
    if s.reason is not None:
        d["reason"] = s.reason
    if s.error_code is not None:
        d["error_code"] = s.error_code
    if s.opened_by_pid:
        d["opened_by_pid"] = s.opened_by_pid
    return d


def _snapshot(d: _Map, where: str) -> Snapshot:
    # Every reply carries one: check the usual shape in one expression, and
    # leave anything else (ints for floats, missing or bad fields) to the
    # field-by-field decoder, which converts or names the fault.
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
            return Snapshot(
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


def _snapshot_fields(d: _Map, where: str) -> Snapshot:
    return Snapshot(
        name=_str(d, "name", where),
        state=_enum(d, "state", where, _STATES),
        generation=_int(d, "generation", where),
        open_until=_opt_float(d, "open_until", where),
        failure_rate=_opt_float(d, "failure_rate", where),
        slow_call_rate=_opt_float(d, "slow_call_rate", where),
        calls=_int(d, "calls", where, 0),
        trials_in_flight=_int(d, "trials_in_flight", where, 0),
        slow_call_duration=_opt_float(d, "slow_call_duration", where),
        successes_safe=_bool(d, "successes_safe", where, True),
        reason=_opt_str(d, "reason", where),
        error_code=_opt_str(d, "error_code", where),
        opened_by_pid=_int(d, "opened_by_pid", where, 0),
    )


def _nested_snapshot(d: _Map, where: str) -> Snapshot:
    return _snapshot(_map(d, "snapshot", where), f"{where}.snapshot")


# hello


def _hello_map(m: Hello) -> _Map:
    return {
        "min_version": m.min_version,
        "max_version": m.max_version,
        "client": m.client,
        "pid": m.pid,
    }


def _hello(d: _Map) -> Hello:
    w = "hello params"
    return Hello(
        _int(d, "min_version", w),
        _int(d, "max_version", w),
        _str(d, "client", w),
        _int(d, "pid", w),
    )


def _welcome_map(m: Welcome) -> _Map:
    out: _Map = {"type": "welcome", "version": m.version, "server": m.server, "pid": m.pid}
    if m.state_table:
        out["state_table"] = m.state_table
    return out


def _welcome(d: _Map) -> Welcome:
    w = "welcome result"
    return Welcome(
        _int(d, "version", w),
        _str(d, "server", w),
        _int(d, "pid", w),
        _int(d, "state_table", w, 0),
    )


# register


def _register_map(m: Register) -> _Map:
    return {"name": m.name, "config": m.config}


def _register(d: _Map) -> Register:
    w = "register params"
    name = _str(d, "name", w)
    if "config" not in d:
        return Register(name)
    config = _map(d, "config", w)
    for key in config:
        # strict_map_key lets binary keys through; config keys are names.
        if type(key) is not str:
            raise RemoteProtocolError(f"{w}: field 'config' has a non-string key")
    return Register(name, config)


def _registered_map(m: Registered) -> _Map:
    out: _Map = {
        "type": "registered",
        "snapshot": _snapshot_map(m.snapshot),
        "conflicts": m.conflicts,
    }
    if m.slot:
        out["slot"] = m.slot
    return out


def _registered(d: _Map) -> Registered:
    w = "registered result"
    snapshot = _nested_snapshot(d, w)
    slot = _int(d, "slot", w, 0)
    if "conflicts" not in d:
        return Registered(snapshot, (), slot)
    conflicts = _array(d, "conflicts", w)
    for item in conflicts:
        if type(item) is not str:
            raise RemoteProtocolError(
                f"{w}: field 'conflicts' must hold strings, not {_wire_type(item)}"
            )
    return Registered(snapshot, tuple(conflicts), slot)


# acquire


def _acquire_map(m: Acquire) -> _Map:
    if not m.successes and not m.successes_generation:
        return {"name": m.name}
    return {
        "name": m.name,
        "successes": m.successes,
        "successes_generation": m.successes_generation,
    }


def _acquire(d: _Map) -> Acquire:
    w = "acquire params"
    name = _str(d, "name", w)
    if "successes" not in d and "successes_generation" not in d:
        return Acquire(name)
    successes = _int(d, "successes", w)
    generation = _int(d, "successes_generation", w)
    if successes < 0 or generation < 0:
        raise RemoteProtocolError(f"{w}: successes and successes_generation must be >= 0")
    if successes > MAX_COUNT:
        raise _count_too_large(f"{w}: field 'successes'", successes)
    return Acquire(name, successes, generation)


def _count_too_large(where: str, count: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"{where}: count {count} is past the limit of {MAX_COUNT} (MAX_COUNT)"
    )


def _admission_map(m: Admission) -> _Map:
    return {
        "type": "admission",
        "admitted": m.admitted,
        "generation": m.generation,
        "lease": m.lease,
        "snapshot": _snapshot_map(m.snapshot),
        "retry_after": m.retry_after,
    }


def _admission(d: _Map) -> Admission:
    # The strict caller's hot path: the usual shape first, as for snapshots.
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
        nested = _snapshot(snapshot, "admission result.snapshot")
        return Admission(admitted, generation, lease, nested, retry_after)
    return _admission_fields(d)


def _admission_fields(d: _Map) -> Admission:
    w = "admission result"
    return Admission(
        admitted=_bool(d, "admitted", w),
        generation=_int(d, "generation", w),
        lease=_int(d, "lease", w),
        snapshot=_nested_snapshot(d, w),
        retry_after=_opt_float(d, "retry_after", w),
    )


# report (request form) and reports (batched notification)


def _report_map(m: Report) -> _Map:
    d: _Map = {
        "name": m.name,
        "generation": m.generation,
        "outcome": m.outcome,
        "duration": m.duration,
        "lease": m.lease,
        "retry_after": m.retry_after,
    }
    # Optional keys: a plain report stays the size it was.
    if m.reason is not None:
        d["reason"] = m.reason
    if m.error_code is not None:
        d["error_code"] = m.error_code
    if m.pid:
        d["pid"] = m.pid
    return d


def _report(d: _Map) -> Report:
    w = "report params"
    return Report(
        name=_str(d, "name", w),
        generation=_int(d, "generation", w),
        outcome=_enum(d, "outcome", w, _OUTCOMES),
        duration=_float(d, "duration", w, 0.0),
        lease=_int(d, "lease", w, 0),
        retry_after=_opt_float(d, "retry_after", w),
        reason=_opt_str(d, "reason", w),
        error_code=_opt_str(d, "error_code", w),
        pid=_int(d, "pid", w, 0),
    )


_REPORT_ITEM_FIELDS: Final = ("name", "generation", "outcome", "duration", "lease", "retry_after")


def _reports_map(m: ReportBatch) -> _Map:
    params: _Map = {
        "items": [
            [r.name, r.generation, r.outcome, r.duration, r.lease, r.retry_after] for r in m.items
        ]
    }
    if m.successes:
        params["successes"] = [list(entry) for entry in m.successes]
    if m.rejections:
        params["rejections"] = [list(entry) for entry in m.rejections]
    return params


def _counts(d: _Map, key: str, width: int) -> list[tuple[Any, ...]]:
    # Optional arrays of [name, (generation,) count]: absent means none.
    raw = d.get(key)
    if raw is None:
        return []
    if type(raw) is not list:
        raise _bad("reports params", key, "an array", raw)
    entries = []
    for i, entry in enumerate(raw):
        # Inline checks for both widths (2: name, count; 3: name, generation,
        # count): one of these comes with nearly every request.
        if (
            type(entry) is not list
            or len(entry) < width
            or type(entry[0]) is not str
            or type(entry[1]) is not int
            or entry[1] < 0
            or (width > 2 and (type(entry[2]) is not int or entry[2] < 0))
        ):
            raise RemoteProtocolError(
                f"reports params: {key}[{i}] must be an array of a name and "
                f"{width - 1} non-negative integer(s), got {_wire_type(entry)}"
            )
        if entry[width - 1] > MAX_COUNT:
            raise _count_too_large(f"reports params: {key}[{i}]", entry[width - 1])
        entries.append(tuple(entry[:width]))
    return entries


def _reports(d: _Map) -> ReportBatch:
    items = _array(d, "items", "reports params")
    outcomes = _OUTCOMES
    batch = []
    # Inline checks: this loop runs once per reported call.
    for i, item in enumerate(items):
        if type(item) is not list or len(item) < 6:
            raise RemoteProtocolError(
                f"reports params: items[{i}] must be an array "
                f"[{', '.join(_REPORT_ITEM_FIELDS)}], got {_wire_type(item)}"
                + (f" of {len(item)}" if type(item) is list else "")
            )
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
        ):
            raise _bad_report_item(i, item)
        oc = outcomes.get(outcome)
        if oc is None:
            raise _unknown_value(f"reports params: items[{i}]", "outcome", outcome, outcomes)
        if type(duration) is not float:
            if type(duration) is not int:
                raise _bad_report_item(i, item)
            duration = float(duration)
        if retry_after is not None and type(retry_after) is not float:
            if type(retry_after) is not int:
                raise _bad_report_item(i, item)
            retry_after = float(retry_after)
        batch.append(Report(name, generation, oc, duration, lease, retry_after))
    successes = _counts(d, "successes", 3)
    rejections = _counts(d, "rejections", 2)
    return ReportBatch(tuple(batch), tuple(successes), tuple(rejections))


def _bad_report_item(i: int, item: list[Any]) -> RemoteProtocolError:
    # Off the hot path: work out which field was wrong only once we know one is.
    d = dict(zip(_REPORT_ITEM_FIELDS, item, strict=False))
    where = f"reports params: items[{i}]"
    _str(d, "name", where)
    _int(d, "generation", where)
    _enum(d, "outcome", where, _OUTCOMES)
    _float(d, "duration", where, 0.0)
    _int(d, "lease", where)
    _opt_float(d, "retry_after", where)
    return RemoteProtocolError(f"{where}: malformed")  # the checks above raise first


# admin


def _admin_map(m: Admin) -> _Map:
    if m.fleet:
        return {"name": m.name, "op": m.op, "fleet": True}
    return {"name": m.name, "op": m.op}


def _admin(d: _Map) -> Admin:
    w = "admin params"
    return Admin(_str(d, "name", w), _enum(d, "op", w, _ADMIN_OPS), _bool(d, "fleet", w, False))


# snapshot (the result of report and admin)


def _snapshot_result_map(m: Snapshot) -> _Map:
    d = _snapshot_map(m)
    d["type"] = "snapshot"
    return d


def _snapshot_result(d: _Map) -> Snapshot:
    return _snapshot(d, "snapshot result")


# status


def _status_request_map(m: StatusRequest) -> _Map:
    params: _Map = {"name": m.name}
    if m.offset:
        params["offset"] = m.offset
    if m.limit:
        params["limit"] = m.limit
    return params


def _status_request(d: _Map) -> StatusRequest:
    where = "status params"
    offset = _int(d, "offset", where, 0)
    limit = _int(d, "limit", where, 0)
    if offset < 0 or limit < 0:
        raise RemoteProtocolError(f"{where}: offset and limit must be >= 0")
    return StatusRequest(_opt_str(d, "name", where), offset, limit)


def _status_map(m: Status) -> _Map:
    breakers = []
    for b in m.breakers:
        item: _Map = {
            "snapshot": _snapshot_map(b.snapshot),
            "successes": b.successes,
            "failures": b.failures,
            "rejections": b.rejections,
            "ignored": b.ignored,
            "clients": b.clients,
        }
        if b.share is not None:
            # Optional keys: a daemon in no fleet sends what it always sent.
            item["share"] = b.share
            item["hosts_open"] = list(b.hosts_open)
        breakers.append(item)
    d: _Map = {"type": "status", "breakers": breakers, "next_offset": m.next_offset}
    if m.fleet is not None:
        d["fleet"] = m.fleet
    return d


def _status(d: _Map) -> Status:
    breakers = []
    for i, b in enumerate(_array(d, "breakers", "status result")):
        w = f"status result: breakers[{i}]"
        if type(b) is not dict:
            raise RemoteProtocolError(f"{w} must be a map, got {_wire_type(b)}")
        breakers.append(
            BreakerStatus(
                snapshot=_nested_snapshot(b, w),
                successes=_int(b, "successes", w),
                failures=_int(b, "failures", w),
                rejections=_int(b, "rejections", w),
                ignored=_int(b, "ignored", w),
                clients=_int(b, "clients", w, 0),
                share=_opt_str(b, "share", w),
                hosts_open=_hosts(b, w),
            )
        )
    next_offset = d.get("next_offset")
    if next_offset is not None and (type(next_offset) is not int or next_offset < 0):
        raise _bad("status result", "next_offset", "a non-negative integer or nil", next_offset)
    return Status(tuple(breakers), next_offset, _opt_str(d, "fleet", "status result"))


def _hosts(d: _Map, where: str) -> tuple[str, ...]:
    if "hosts_open" not in d:
        return ()
    hosts = _array(d, "hosts_open", where)
    if not all(type(host) is str for host in hosts):
        raise _bad(where, "hosts_open", "an array of strings", hosts)
    return tuple(hosts)


# state push


def _state_push_map(m: StatePush) -> _Map:
    return {"snapshot": _snapshot_map(m.snapshot)}


def _state_push(d: _Map) -> StatePush:
    return StatePush(_nested_snapshot(d, "state params"))


# subscribe and transition events


def _subscribe_map(m: Subscribe) -> _Map:
    return {"names": m.names}


def _subscribe(d: _Map) -> Subscribe:
    w = "subscribe params"
    if "names" not in d:
        return Subscribe()
    names = _array(d, "names", w)
    for item in names:
        if type(item) is not str:
            raise RemoteProtocolError(
                f"{w}: field 'names' must hold strings, not {_wire_type(item)}"
            )
    return Subscribe(tuple(names))


def _subscribed_map(m: Subscribed) -> _Map:
    return {"type": "subscribed"}


def _subscribed(d: _Map) -> Subscribed:
    return Subscribed()


def _transition_map(m: TransitionEvent) -> _Map:
    return {
        "name": m.name,
        "from_state": m.from_state,
        "to_state": m.to_state,
        "generation": m.generation,
        "reason": m.reason,
        "at": m.at,
        "failure_rate": m.failure_rate,
        "slow_call_rate": m.slow_call_rate,
        "open_until": m.open_until,
    }


def _transition(d: _Map) -> TransitionEvent:
    w = "transition params"
    at = d.get("at", _MISSING)
    if type(at) is not float and type(at) is not int:
        raise _bad(w, "at", "a number", at)
    return TransitionEvent(
        name=_str(d, "name", w),
        from_state=_enum(d, "from_state", w, _STATES),
        to_state=_enum(d, "to_state", w, _STATES),
        generation=_int(d, "generation", w),
        reason=_str(d, "reason", w),
        at=float(at),
        failure_rate=_opt_float(d, "failure_rate", w),
        slow_call_rate=_opt_float(d, "slow_call_rate", w),
        open_until=_opt_float(d, "open_until", w),
    )


# --- dispatch tables --------------------------------------------------------------

_REQUEST_ENCODERS: Final[dict[type, tuple[str, Callable[[Any], _Map]]]] = {
    Hello: ("hello", _hello_map),
    Register: ("register", _register_map),
    Acquire: ("acquire", _acquire_map),
    Report: ("report", _report_map),
    Admin: ("admin", _admin_map),
    StatusRequest: ("status", _status_request_map),
    Subscribe: ("subscribe", _subscribe_map),
    BudgetRequest: ("budget", budget_request_map),
}
_REQUEST_DECODERS: Final[dict[str, Callable[[_Map], RequestMessage]]] = {
    "hello": _hello,
    "register": _register,
    "acquire": _acquire,
    "report": _report,
    "admin": _admin,
    "status": _status_request,
    "subscribe": _subscribe,
    "budget": budget_request,
}
_RESULT_ENCODERS: Final[dict[type, Callable[[Any], _Map]]] = {
    Welcome: _welcome_map,
    Registered: _registered_map,
    Admission: _admission_map,
    Snapshot: _snapshot_result_map,
    Status: _status_map,
    Subscribed: _subscribed_map,
    BudgetGrant: budget_grant_map,
}
_RESULT_DECODERS: Final[dict[str, Callable[[_Map], ResultMessage]]] = {
    "welcome": _welcome,
    "registered": _registered,
    "admission": _admission,
    "snapshot": _snapshot_result,
    "status": _status,
    "subscribed": _subscribed,
    "budget_grant": budget_grant,
}
_NOTIFICATION_ENCODERS: Final[dict[type, tuple[str, Callable[[Any], _Map]]]] = {
    ReportBatch: ("reports", _reports_map),
    StatePush: ("state", _state_push_map),
    TransitionEvent: ("transition", _transition_map),
}
_NOTIFICATION_DECODERS: Final[dict[str, Callable[[_Map], NotificationMessage]]] = {
    "reports": _reports,
    "state": _state_push,
    "transition": _transition,
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


def _check_msgid(msgid: int) -> None:
    if not 0 <= msgid <= MAX_MSGID:
        raise ValueError(f"msgid must be an unsigned 32-bit integer, got {msgid}")


def encode_request(msgid: int, message: RequestMessage) -> list[Any]:
    """``[0, msgid, method, params]`` for a request message."""
    entry = _REQUEST_ENCODERS.get(type(message))
    if entry is None:
        raise TypeError(f"{type(message).__name__} cannot be sent as a request")
    _check_msgid(msgid)
    return [REQUEST, msgid, entry[0], entry[1](message)]


def encode_response(msgid: int, result: ResultMessage) -> list[Any]:
    """``[1, msgid, nil, result]`` for a successful reply."""
    encoder = _RESULT_ENCODERS.get(type(result))
    if encoder is None:
        raise TypeError(f"{type(result).__name__} cannot be sent as a result")
    _check_msgid(msgid)
    return [RESPONSE, msgid, None, encoder(result)]


def encode_error(msgid: int, error: BreakerError) -> list[Any]:
    """``[1, msgid, [code, message, details], nil]`` for a failed reply."""
    _check_msgid(msgid)
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
            f"error must be an array [code, message, details], got {_wire_type(triple)}"
        )
    code, message, details = triple[0], triple[1], triple[2]
    if type(code) is not str:
        raise _bad("error", "code", "a string", code)
    if type(message) is not str:
        raise _bad("error", "message", "a string", message)
    if details is not None and type(details) is not dict:
        raise _bad("error", "details", "a map or nil", details)
    try:
        return error_from_code(code, message, details)
    except Exception as exc:  # details from a peer are untrusted input
        raise RemoteProtocolError(f"error {code!r}: unusable details: {exc}") from exc


# --- decoding -------------------------------------------------------------------


def _msgid(value: object, where: str) -> int:
    if type(value) is int and 0 <= value <= MAX_MSGID:
        return value
    raise RemoteProtocolError(
        f"{where}: msgid must be an unsigned 32-bit integer, got {_wire_type(value)}"
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
            f"a message must be a non-empty msgpack-rpc array, got {_wire_type(obj)}"
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
                raise RemoteProtocolError(
                    f"{method} params must be a map, got {_wire_type(params)}"
                )
            return RequestReceived(msgid, decoder(params))
        if kind == RESPONSE and n == 4:
            msgid = _msgid(obj[1], "response")
            error, result = obj[2], obj[3]
            if error is not None:
                if result is not None:
                    raise RemoteProtocolError("response has both an error and a result")
                return ResponseReceived(msgid, None, error_from_wire(error))
            return ResponseReceived(msgid, _decode_result(result), None)
        if kind == NOTIFICATION and n == 3:
            method, params = obj[1], obj[2]
            ndecoder = _NOTIFICATION_DECODERS.get(method) if type(method) is str else None
            if ndecoder is None:
                raise RemoteProtocolError(f"unknown notification method {method!r}")
            if type(params) is not dict:
                raise RemoteProtocolError(
                    f"{method} params must be a map, got {_wire_type(params)}"
                )
            return NotificationReceived(ndecoder(params))
    raise RemoteProtocolError(
        "a message must be [0, msgid, method, params], [1, msgid, error, result] "
        f"or [2, method, params]; got an array of {n} starting with {_wire_type(kind)}"
        + (f" {kind}" if type(kind) is int else "")
    )


def _decode_result(result: object) -> ResultMessage:
    if type(result) is not dict:
        raise RemoteProtocolError(f"result must be a map, got {_wire_type(result)}")
    tag = result.get("type", _MISSING)
    decoder = _RESULT_DECODERS.get(tag) if type(tag) is str else None
    if decoder is None:
        if tag is _MISSING:
            raise RemoteProtocolError("result: missing required field 'type'")
        raise RemoteProtocolError(
            f"result: field 'type' is {tag!r}, not one of: {', '.join(sorted(_RESULT_DECODERS))}"
        )
    return decoder(result)
