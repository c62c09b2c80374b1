"""The wire protocol: codec, framing, handshake and error rules.

Client and server ``Connection``s are paired over a fake link: the bytes one
``send_*`` returns are fed straight into the other's ``receive_data``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import pytest

from breakerd.protocol import (
    MAX_FRAME_SIZE,
    MAX_MSGID,
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PROTOCOL_VERSION,
    Acquire,
    ActorStoppedError,
    Admin,
    Admission,
    BreakerError,
    BreakerStatus,
    CircuitBreakerOpenError,
    CircuitState,
    Connection,
    ConnectionClosed,
    DaemonUnavailableError,
    Hello,
    InboxFullError,
    InvalidRequestError,
    NotificationReceived,
    Outcome,
    ProtocolError,
    Register,
    Registered,
    RemoteProtocolError,
    Report,
    ReportBatch,
    RequestMessage,
    RequestReceived,
    ResponseReceived,
    Snapshot,
    StatePush,
    Status,
    StatusRequest,
    UnknownBreakerError,
    VersionMismatchError,
    Welcome,
    _codec,
    frame_notification,
    negotiate_version,
    new_packer,
)
from breakerd.protocol._codec import (
    MAX_COUNT,
    Event,
    ResultMessage,
    error_from_wire,
    error_to_wire,
)
from breakerd.protocol._derive import derive
from breakerd.protocol._errors import LocalProtocolError
from breakerd.protocol._wire import Count, NonNegative

HELLO = Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, "breakerd-test", 4242)
WELCOME = Welcome(PROTOCOL_VERSION, "breakerd-daemon", 1, state_table=65_536)

# Every field away from its default, so a codec that drops one is caught.
SNAP = Snapshot(
    "llm",
    CircuitState.HALF_OPEN,
    7,
    open_until=1234.5,
    failure_rate=0.25,
    slow_call_rate=0.125,
    calls=40,
    trials_in_flight=1,
    slow_call_duration=2.5,
)
SNAP_OPEN = Snapshot("llm", CircuitState.OPEN, 8, open_until=99.75, failure_rate=1.0, calls=5)
SNAP_BARE = Snapshot("db", CircuitState.CLOSED, 0)

EXCHANGES: list[tuple[RequestMessage, ResultMessage]] = [
    (
        Register("llm", {"failure_threshold": 0.5, "timeout": 30, "tags": ["a", {"b": None}]}),
        Registered(SNAP, ("timeout", "min_calls"), slot=17),
    ),
    (Register("db"), Registered(SNAP_BARE)),
    (Acquire("llm"), Admission(True, 7, 42, SNAP)),
    (Acquire("llm", successes=3, successes_generation=7), Admission(True, 7, 0, SNAP)),
    (Acquire("llm"), Admission(False, 8, 0, SNAP_OPEN, retry_after=3.5)),
    (Report("llm", 7, Outcome.FAILURE, 0.75, 42), SNAP_OPEN),
    (Report("llm", 7, Outcome.RATE_LIMITED, 0.1, 0, retry_after=30.0), SNAP_OPEN),
    (Admin("llm", "force_open"), Snapshot("llm", CircuitState.FORCED_OPEN, 9)),
    (Admin("llm", "disable"), Snapshot("llm", CircuitState.DISABLED, 10)),
    (Admin("llm", "reset"), Snapshot("llm", CircuitState.CLOSED, 11)),
    (
        StatusRequest(),
        Status(
            (
                BreakerStatus(SNAP, successes=10, failures=3, rejections=5, ignored=2, clients=4),
                BreakerStatus(SNAP_BARE, successes=0, failures=0, rejections=0, ignored=0),
            )
        ),
    ),
    (StatusRequest("nope"), Status(())),
]

BATCH = ReportBatch(
    tuple(
        Report("llm", 3, outcome, 0.5 + i, lease=i, retry_after=2.0 if i % 2 else None)
        for i, outcome in enumerate(Outcome)
    )
)

ERRORS: list[BreakerError] = [
    BreakerError("actor crashed"),
    CircuitBreakerOpenError("llm", 12.5, "forced_open"),
    CircuitBreakerOpenError("llm"),
    ActorStoppedError("daemon is shutting down"),
    InboxFullError("inbox of 'llm' is full"),
    InvalidRequestError("timeout must be positive"),
    UnknownBreakerError("no breaker 'x'"),
    VersionMismatchError("no common version"),
    DaemonUnavailableError("no daemon"),
    ProtocolError("bad frame"),
]


# --- helpers -----------------------------------------------------------------


def drain(conn: Connection, data: bytes = b"") -> list[Event]:
    """Feed ``data`` (if any) and collect events until NEED_DATA or the close."""
    if data:
        conn.receive_data(data)
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def greeted_pair() -> tuple[Connection, Connection]:
    client, server = Connection("client"), Connection("server")
    assert drain(server, client.send_request(0, HELLO)) == [RequestReceived(0, HELLO)]
    [welcome] = drain(client, server.send_response(0, WELCOME))
    assert welcome == ResponseReceived(0, WELCOME, None)
    return client, server


def frame(value: Any) -> bytes:
    body = msgpack.packb(value)
    return struct.pack(">I", len(body)) + body


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def hello_frame() -> bytes:
    return frame([0, 0, "hello", {"min_version": 1, "max_version": 1, "client": "c", "pid": 1}])


def comparable(event: Event) -> Any:
    """Exceptions compare by identity: compare an error event by its content."""
    if isinstance(event, ResponseReceived) and event.error is not None:
        e = event.error
        return ("error", event.msgid, type(e), str(e), e.details())
    return event


# --- round trips -----------------------------------------------------------------


def test_handshake_sets_the_version_on_both_sides() -> None:
    client, server = Connection("client"), Connection("server")
    assert client.version is None
    assert server.version is None
    [event] = drain(server, client.send_request(0, HELLO))
    assert isinstance(event, RequestReceived)
    assert isinstance(event.message, Hello)
    welcome = Welcome(negotiate_version(event.message), "d", 1)
    drain(client, server.send_response(event.msgid, welcome))
    assert client.version == server.version == PROTOCOL_VERSION


@pytest.mark.parametrize(("request_message", "result"), EXCHANGES)
def test_request_and_result_round_trip(
    request_message: RequestMessage, result: ResultMessage
) -> None:
    client, server = greeted_pair()
    assert drain(server, client.send_request(MAX_MSGID, request_message)) == [
        RequestReceived(MAX_MSGID, request_message)
    ]
    assert drain(client, server.send_response(MAX_MSGID, result)) == [
        ResponseReceived(MAX_MSGID, result, None)
    ]


def test_decoded_enums_are_enum_members() -> None:
    client, server = greeted_pair()
    [event] = drain(server, client.send_notification(BATCH))
    assert isinstance(event, NotificationReceived)
    assert isinstance(event.message, ReportBatch)
    assert [type(r.outcome) for r in event.message.items] == [Outcome] * len(Outcome)
    [push] = drain(client, server.send_notification(StatePush(SNAP)))
    assert isinstance(push, NotificationReceived)
    assert isinstance(push.message, StatePush)
    assert type(push.message.snapshot.state) is CircuitState


COUNTS = ReportBatch((), (("llm", 3, 500), ("db", 0, 1)), (("llm", 7),))


@pytest.mark.parametrize(
    "batch", [BATCH, ReportBatch(()), COUNTS], ids=["every-outcome", "empty", "counts"]
)
def test_report_batch_round_trips(batch: ReportBatch) -> None:
    client, server = greeted_pair()
    assert drain(server, client.send_notification(batch)) == [NotificationReceived(batch)]


@pytest.mark.parametrize("snapshot", [SNAP, SNAP_OPEN, SNAP_BARE])
def test_state_push_round_trips(snapshot: Snapshot) -> None:
    client, server = greeted_pair()
    push = StatePush(snapshot)
    assert drain(client, server.send_notification(push)) == [NotificationReceived(push)]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_error_response_round_trips_to_the_same_class(error: BreakerError) -> None:
    client, server = greeted_pair()
    [event] = drain(client, server.send_error(17, error))
    assert isinstance(event, ResponseReceived)
    assert event.msgid == 17
    assert event.result is None
    assert type(event.error) is type(error)
    assert str(event.error) == str(error)
    assert event.error.details() == error.details()


def test_pipelined_requests_behind_hello_are_accepted() -> None:
    client, server = Connection("client"), Connection("server")
    data = client.send_request(1, HELLO) + client.send_request(2, Acquire("llm"))
    assert drain(server, data) == [RequestReceived(1, HELLO), RequestReceived(2, Acquire("llm"))]


# --- the exact wire shapes ------------------------------------------------------


def unframe(data: bytes) -> Any:
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    return msgpack.unpackb(data[4:])


def test_wire_shape_of_requests_and_notifications() -> None:
    client, _ = greeted_pair()
    assert unframe(client.send_request(3, Report("llm", 7, Outcome.FAILURE, 0.5, 2))) == [
        0,
        3,
        "report",
        {
            "name": "llm",
            "generation": 7,
            "outcome": "failure",
            "duration": 0.5,
            "lease": 2,
            "retry_after": None,
        },
    ]
    batch = ReportBatch((Report("llm", 7, Outcome.SUCCESS, 0.25), Report("db", 1, Outcome.IGNORED)))
    assert unframe(client.send_notification(batch)) == [
        2,
        "reports",
        {"items": [["llm", 7, "success", 0.25, 0, None], ["db", 1, "ignored", 0.0, 0, None]]},
    ]
    assert unframe(client.send_request(4, Admin("llm", "reset"))) == [
        0,
        4,
        "admin",
        {"name": "llm", "op": "reset"},
    ]


def test_wire_shape_of_responses_and_errors() -> None:
    _, server = greeted_pair()
    assert unframe(server.send_response(9, Admission(False, 8, 0, SNAP_BARE, 1.5))) == [
        1,
        9,
        None,
        {
            "type": "admission",
            "admitted": False,
            "generation": 8,
            "lease": 0,
            "retry_after": 1.5,
            "snapshot": {
                "name": "db",
                "state": "closed",
                "generation": 0,
                "open_until": None,
                "failure_rate": None,
                "slow_call_rate": None,
                "calls": 0,
                "trials_in_flight": 0,
                "slow_call_duration": None,
            },
        },
    ]
    assert unframe(server.send_error(10, CircuitBreakerOpenError("llm", 2.0))) == [
        1,
        10,
        [
            "open",
            "circuit breaker 'llm' is open; retry after 2.000s",
            {
                "name": "llm",
                "retry_after": 2.0,
                "state": "open",
            },
        ],
        None,
    ]


# --- framing: splitting, limits, EOF -----------------------------------------------


def client_stream() -> bytes:
    client = Connection("client")
    parts = [client.send_request(0, HELLO)]
    parts += [client.send_request(i, req) for i, (req, _) in enumerate(EXCHANGES, start=1)]
    parts.append(client.send_notification(BATCH))
    return b"".join(parts)


def server_stream() -> bytes:
    client, server = Connection("client"), Connection("server")
    drain(server, client.send_request(0, HELLO))
    parts = [server.send_response(0, WELCOME)]
    parts += [server.send_response(i, res) for i, (_, res) in enumerate(EXCHANGES, start=1)]
    parts.append(server.send_notification(StatePush(SNAP)))
    parts += [server.send_error(100 + i, err) for i, err in enumerate(ERRORS)]
    return b"".join(parts)


@pytest.mark.parametrize(
    ("role", "stream"), [("server", client_stream()), ("client", server_stream())]
)
def test_every_split_point_gives_the_same_events(role: str, stream: bytes) -> None:
    def events(chunks: list[bytes]) -> list[Any]:
        conn = Connection("server" if role == "server" else "client")
        if role == "client":
            conn.send_request(0, HELLO)  # so the Welcome is expected
        out: list[Any] = []
        for chunk in chunks:
            out += [comparable(e) for e in drain(conn, chunk)]
        conn.receive_data(b"")
        out += [comparable(e) for e in drain(conn)]
        return out

    whole = events([stream])
    assert len(whole) > len(EXCHANGES) + 2  # every message, then ConnectionClosed
    assert whole[-1] == ConnectionClosed()
    for i in range(len(stream) + 1):
        assert events([stream[:i], stream[i:]]) == whole, f"split at byte {i}"
    assert events([stream[i : i + 1] for i in range(len(stream))]) == whole


def test_absurd_length_is_refused_from_the_header_alone() -> None:
    server = Connection("server")
    server.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError, match="4294967295 bytes; the limit is 1048576"):
        server.next_event()


def test_absurd_length_is_refused_before_its_body_is_fed() -> None:
    server = Connection("server")
    server.receive_data(struct.pack(">I", MAX_FRAME_SIZE + 1))
    # The refusal already happened: the body is not accepted for buffering.
    with pytest.raises(RemoteProtocolError, match="limit"):
        server.receive_data(b"\x00" * 1024)


def test_frame_size_limit_is_inclusive() -> None:
    limit = 64
    # Grow a name until the frame body is exactly at the limit.
    for k in range(1, limit):
        data = Connection("client").send_request(0, Hello(1, 1, "x" * k, 1))
        if len(data) - 4 == limit:
            break
    else:
        pytest.fail("no name length gives a body of exactly the limit")
    at_limit = Connection("server", max_frame_size=limit)
    assert drain(at_limit, data) == [RequestReceived(0, Hello(1, 1, "x" * k, 1))]
    under_limit = Connection("server", max_frame_size=limit - 1)
    with pytest.raises(RemoteProtocolError, match="the limit is 63"):
        drain(under_limit, data)


def test_sending_a_frame_over_the_limit_is_a_local_error() -> None:
    client = Connection("client", max_frame_size=64)
    client.send_request(0, HELLO)
    with pytest.raises(LocalProtocolError, match="'register' request takes"):
        client.send_request(1, Register("x" * 100))


def test_clean_eof_between_frames_is_connection_closed_every_time() -> None:
    server = Connection("server")
    server.receive_data(hello_frame())
    server.receive_data(b"")
    assert isinstance(server.next_event(), RequestReceived)
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() == ConnectionClosed()


@pytest.mark.parametrize(
    ("cut", "match"),
    [(2, "inside a frame header \\(2 of 4 bytes\\)"), (10, "inside a frame \\(6 of ")],
)
def test_eof_inside_a_frame_is_a_protocol_error(cut: int, match: str) -> None:
    server = Connection("server")
    server.receive_data(hello_frame()[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=match):
        server.next_event()


def test_data_after_eof_is_a_local_error() -> None:
    server = Connection("server")
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after the EOF"):
        server.receive_data(hello_frame())


# --- bad frames -----------------------------------------------------------------

BAD_FRAMES: dict[str, tuple[bytes, str]] = {
    "empty frame": (raw_frame(b""), "empty frame"),
    "two values in one frame": (raw_frame(msgpack.packb(1) + msgpack.packb(2)), "exactly one"),
    "value longer than frame": (raw_frame(msgpack.packb([1, 2, 3])[:2]), "ends inside"),
    "reserved byte 0xc1": (raw_frame(b"\xc1"), "undecodable"),
    "extension type": (raw_frame(b"\xd4\x01\x00"), "max_ext_len"),
    "timestamp": (raw_frame(msgpack.packb(msgpack.Timestamp(1))), "max_ext_len"),
    "nesting too deep": (raw_frame(b"\x91" * 5000 + b"\xc0"), "undecodable"),
    "integer map key": (frame({1: 2}), "undecodable"),
    "huge array header": (raw_frame(b"\xdd\xff\xff\xff\xff"), "max_array_len"),
    "not an array": (frame({"a": 1}), "msgpack-rpc array"),
    "unknown message type": (frame([3, 0, "hello", {}]), "starting with an integer 3"),
    "request of 3 entries": (frame([0, 0, "hello"]), "array of 3"),
    "boolean message type": (frame([False, 0, "hello", {}]), "starting with a boolean"),
    "negative msgid": (frame([0, -1, "hello", {}]), "msgid must be an unsigned 32-bit"),
    "msgid over 32 bits": (frame([0, 1 << 32, "hello", {}]), "msgid must be an unsigned 32-bit"),
    "boolean msgid": (frame([0, True, "hello", {}]), "got a boolean"),
    "unknown method": (frame([0, 0, "frobnicate", {}]), "unknown request method 'frobnicate'"),
    "binary method": (frame([0, 0, b"hello", {}]), "unknown request method b'hello'"),
    "params as array": (frame([0, 0, "hello", [1, 1, "c", 1]]), "hello params must be a map"),
}


@pytest.mark.parametrize(("data", "match"), BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_bad_frames_raise_protocol_error(data: bytes, match: str) -> None:
    server = Connection("server")
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        server.next_event()


BAD_FROM_SERVER: dict[str, tuple[Any, str]] = {
    "error and result": (
        [1, 0, ["busy", "full", None], {"type": "welcome"}],
        "both an error and a result",
    ),
    "result without type": ([1, 0, None, {"version": 1}], "missing required field 'type'"),
    "result of unknown type": ([1, 0, None, {"type": "gift"}], "'type' is 'gift'"),
    "result as array": ([1, 0, None, [1, "s", 2]], "result must be a map"),
    "error not a triple": ([1, 0, "boom", None], "error must be an array"),
    "error code not a string": ([1, 0, [3, "m", None], None], "field 'code' must be a string"),
    "error details not a map": ([1, 0, ["busy", "m", [1]], None], "field 'details' must be a map"),
    "unknown notification": ([2, "gossip", {}], "unknown notification method 'gossip'"),
}


@pytest.mark.parametrize(("value", "match"), BAD_FROM_SERVER.values(), ids=BAD_FROM_SERVER.keys())
def test_bad_responses_raise_protocol_error(value: Any, match: str) -> None:
    client = Connection("client")
    client.send_request(0, HELLO)
    client.receive_data(frame(value))
    with pytest.raises(RemoteProtocolError, match=match):
        client.next_event()


# --- fields: required, optional, unknown, wrong types -----------------------------


def test_unknown_keys_are_ignored_at_every_level() -> None:
    _, server = greeted_pair()
    params = {"name": "llm", "generation": 7, "outcome": "success", "from_the_future": [1, {}]}
    batch = {"items": [["llm", 7, "failure", 0.5, 0, None, "future", {"x": 1}]], "more": True}
    data = frame([0, 5, "report", params]) + frame([2, "reports", batch])
    assert drain(server, data) == [
        RequestReceived(5, Report("llm", 7, Outcome.SUCCESS)),
        NotificationReceived(ReportBatch((Report("llm", 7, Outcome.FAILURE, 0.5),))),
    ]

    client, _ = greeted_pair()
    snap = {"name": "db", "state": "open", "generation": 2, "new_gauge": 0.5}
    result = {"type": "admission", "admitted": False, "generation": 2, "lease": 0}
    result |= {"snapshot": snap, "hint": "later"}
    assert drain(client, frame([1, 6, None, result])) == [
        ResponseReceived(6, Admission(False, 2, 0, Snapshot("db", CircuitState.OPEN, 2)), None)
    ]


def test_integers_are_accepted_where_floats_are_expected() -> None:
    _, server = greeted_pair()
    params = {"name": "llm", "generation": 1, "outcome": "rate_limited", "duration": 2}
    params["retry_after"] = 30
    [event] = drain(server, frame([0, 1, "report", params]))
    assert isinstance(event, RequestReceived)
    assert isinstance(event.message, Report)
    assert event.message == Report("llm", 1, Outcome.RATE_LIMITED, 2.0, 0, 30.0)
    assert type(event.message.duration) is float
    assert type(event.message.retry_after) is float


REPORT_OK = {"name": "llm", "generation": 1, "outcome": "success"}

BAD_FIELDS: dict[str, tuple[str, dict[str, Any], str]] = {
    "missing name": ("acquire", {}, "acquire params: missing required field 'name'"),
    "name not a string": ("acquire", {"name": 5}, "field 'name' must be a string, got an integer"),
    "negative successes": (
        "acquire",
        {"name": "x", "successes": -1, "successes_generation": 0},
        "acquire params: successes and successes_generation must be >= 0",
    ),
    "successes without their generation": (
        "acquire",
        {"name": "x", "successes": 2},
        "acquire params: missing required field 'successes_generation'",
    ),
    "boolean generation": (
        "report",
        REPORT_OK | {"generation": True},
        "report params: field 'generation' must be an integer, got a boolean",
    ),
    "unknown outcome": (
        "report",
        REPORT_OK | {"outcome": "meh"},
        "field 'outcome' is 'meh', not one of: cancelled, failure",
    ),
    "outcome as array": (
        "report",
        REPORT_OK | {"outcome": ["success"]},
        "field 'outcome' must be a string, got an array",
    ),
    "duration as string": (
        "report",
        REPORT_OK | {"duration": "1s"},
        "field 'duration' must be a number, got a string",
    ),
    "unknown admin op": ("admin", {"name": "x", "op": "explode"}, "field 'op' is 'explode'"),
    "config with binary key": (
        "register",
        {"name": "x", "config": {b"k": 1}},
        "non-string key",
    ),
    "hello without pid": (
        "hello",
        {"min_version": 1, "max_version": 1, "client": "c"},
        "hello params: missing required field 'pid'",
    ),
    "status name as integer": ("status", {"name": 3}, "field 'name' must be a string or nil"),
}


@pytest.mark.parametrize(("method", "params", "match"), BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_fields_are_named_in_the_error(method: str, params: dict[str, Any], match: str) -> None:
    server = Connection("server")
    if method != "hello":
        drain(server, hello_frame())
    server.receive_data(frame([0, 1, method, params]))
    with pytest.raises(RemoteProtocolError, match=match):
        server.next_event()


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("llm", "items\\[1\\] must be an array \\[name, generation, outcome, duration"),
        (["llm", 1, "success", 0.0, 0], "items\\[1\\] must be an array .* got an array of 5"),
        (["llm", 1, "success", 0.0, 1.5, None], "items\\[1\\]: field 'lease' must be an integer"),
        (["llm", 1, "bogus", 0.0, 0, None], "items\\[1\\]: field 'outcome' is 'bogus'"),
        (["llm", 1, "success", None, 0, None], "items\\[1\\]: field 'duration' must be a number"),
        (["llm", 1, "success", 0.0, 0, "x"], "field 'retry_after' must be a number or nil"),
        ([None, 1, "success", 0.0, 0, None], "items\\[1\\]: field 'name' must be a string"),
    ],
)
def test_bad_report_items_are_named_in_the_error(item: Any, match: str) -> None:
    _, server = greeted_pair()
    good = ["llm", 1, "success", 0.0, 0, None]
    server.receive_data(frame([2, "reports", {"items": [good, item]}]))
    with pytest.raises(RemoteProtocolError, match=match):
        server.next_event()


def test_missing_optional_fields_take_their_defaults() -> None:
    client, _ = greeted_pair()
    result = {"type": "registered", "snapshot": {"name": "db", "state": "closed", "generation": 3}}
    assert drain(client, frame([1, 2, None, result])) == [
        ResponseReceived(2, Registered(Snapshot("db", CircuitState.CLOSED, 3)), None)
    ]


# --- handshake and roles -------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_range", "server_range", "expected"),
    [((1, 1), (1, 1), 1), ((1, 5), (2, 3), 3), ((2, 3), (1, 2), 2), ((1, 9), (4, 4), 4)],
)
def test_negotiate_picks_the_highest_common_version(
    client_range: tuple[int, int], server_range: tuple[int, int], expected: int
) -> None:
    hello = Hello(*client_range, "c", 1)
    assert negotiate_version(hello, min_version=server_range[0], max_version=server_range[1]) == (
        expected
    )


@pytest.mark.parametrize(("client_range", "server_range"), [((3, 4), (1, 2)), ((1, 1), (2, 3))])
def test_negotiate_without_common_version_raises(
    client_range: tuple[int, int], server_range: tuple[int, int]
) -> None:
    hello = Hello(*client_range, "app", 77)
    expected = (
        f"client 'app' \\(pid 77\\) speaks versions {client_range[0]} to {client_range[1]}, "
        f"this side speaks {server_range[0]} to {server_range[1]}"
    )
    with pytest.raises(VersionMismatchError, match=expected):
        negotiate_version(hello, min_version=server_range[0], max_version=server_range[1])


def test_negotiate_refuses_an_empty_client_range() -> None:
    with pytest.raises(VersionMismatchError):
        negotiate_version(Hello(2, 1, "c", 1), min_version=1, max_version=3)


def test_version_mismatch_travels_back_as_the_answer_to_hello() -> None:
    client, server = Connection("client"), Connection("server")
    [event] = drain(server, client.send_request(0, Hello(7, 9, "future", 1)))
    assert isinstance(event, RequestReceived)
    assert isinstance(event.message, Hello)
    with pytest.raises(VersionMismatchError) as info:
        negotiate_version(event.message)
    [answer] = drain(client, server.send_error(event.msgid, info.value))
    assert isinstance(answer, ResponseReceived)
    assert isinstance(answer.error, VersionMismatchError)
    assert "speaks versions 7 to 9" in str(answer.error)
    assert client.version is None


def test_client_refuses_a_welcome_outside_its_offer() -> None:
    client = Connection("client")
    client.send_request(0, HELLO)
    result = {"type": "welcome", "version": PROTOCOL_VERSION + 1, "server": "s", "pid": 1}
    client.receive_data(frame([1, 0, None, result]))
    with pytest.raises(RemoteProtocolError, match="outside the range 1 to 1"):
        client.next_event()


def test_server_refuses_to_send_a_welcome_outside_the_offer() -> None:
    server = Connection("server")
    drain(server, hello_frame())
    with pytest.raises(LocalProtocolError, match="outside the range"):
        server.send_response(0, Welcome(2, "s", 1))


def test_server_refuses_a_first_request_other_than_hello() -> None:
    server = Connection("server")
    server.receive_data(frame([0, 0, "acquire", {"name": "llm"}]))
    with pytest.raises(RemoteProtocolError, match="first request must be 'hello', got 'acquire'"):
        server.next_event()


def test_server_refuses_a_notification_before_hello() -> None:
    server = Connection("server")
    server.receive_data(frame([2, "reports", {"items": []}]))
    with pytest.raises(RemoteProtocolError, match="first message must be a 'hello' request"):
        server.next_event()


def test_server_refuses_a_second_hello() -> None:
    server = Connection("server")
    with pytest.raises(RemoteProtocolError, match="'hello' sent twice"):
        drain(server, hello_frame() + hello_frame())


def test_client_must_send_hello_first() -> None:
    client = Connection("client")
    with pytest.raises(LocalProtocolError, match="first request must be 'hello', not 'acquire'"):
        client.send_request(0, Acquire("llm"))
    with pytest.raises(LocalProtocolError, match="first message must be a 'hello'"):
        Connection("client").send_notification(BATCH)


def test_server_pushes_no_state_before_its_welcome() -> None:
    server = Connection("server")
    drain(server, hello_frame())
    with pytest.raises(LocalProtocolError, match="before the Welcome"):
        server.send_notification(StatePush(SNAP))


@pytest.mark.parametrize(
    ("role", "value", "match"),
    [
        (
            "server",
            [1, 0, None, {"type": "snapshot", "name": "x", "state": "open", "generation": 1}],
            "a client sent a response \\(msgid 0\\)",
        ),
        (
            "server",
            [2, "state", {"snapshot": {"name": "x", "state": "open", "generation": 1}}],
            "a client sent a 'state' notification",
        ),
        ("client", [0, 1, "acquire", {"name": "x"}], "a server sent a 'acquire' request"),
        ("client", [2, "reports", {"items": []}], "a server sent a 'reports' notification"),
    ],
)
def test_messages_in_the_wrong_direction_are_refused(role: str, value: Any, match: str) -> None:
    if role == "server":
        conn = Connection("server")
        drain(conn, hello_frame())
    else:
        conn = Connection("client")
        conn.send_request(0, HELLO)
    conn.receive_data(frame(value))
    with pytest.raises(RemoteProtocolError, match=match):
        conn.next_event()


def test_sending_in_the_wrong_direction_is_a_local_error() -> None:
    client, server = greeted_pair()
    with pytest.raises(LocalProtocolError, match="server does not send requests"):
        server.send_request(1, Acquire("x"))
    with pytest.raises(LocalProtocolError, match="client does not send responses"):
        client.send_response(1, SNAP)
    with pytest.raises(LocalProtocolError, match="client does not send responses"):
        Connection("client").send_error(1, InboxFullError("full"))
    with pytest.raises(LocalProtocolError, match="server sends no 'reports'"):
        greeted_pair()[1].send_notification(BATCH)
    with pytest.raises(LocalProtocolError, match="client sends no 'state'"):
        greeted_pair()[0].send_notification(StatePush(SNAP))


# --- the dead connection and programming errors --------------------------------------


def test_a_protocol_error_kills_the_connection_for_good() -> None:
    client, server = greeted_pair()
    server.receive_data(raw_frame(b"\xc1"))
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    # A valid frame after the bad one changes nothing.
    with pytest.raises(LocalProtocolError, match="dead after a protocol error"):
        server.receive_data(client.send_request(1, Acquire("llm")))
    with pytest.raises(LocalProtocolError, match="dead"):
        server.next_event()
    with pytest.raises(LocalProtocolError, match="dead"):
        server.send_response(1, SNAP)
    with pytest.raises(LocalProtocolError, match="dead"):
        server.send_notification(StatePush(SNAP))


def test_an_unencodable_value_is_a_local_error_and_kills_the_connection() -> None:
    client, _ = greeted_pair()
    with pytest.raises(LocalProtocolError, match="cannot encode the 'register' request"):
        client.send_request(1, Register("x", {"classifier": object()}))
    with pytest.raises(LocalProtocolError, match="dead"):
        client.send_request(2, Acquire("x"))


def test_a_non_message_or_bad_msgid_leaves_the_connection_usable() -> None:
    client, server = greeted_pair()
    with pytest.raises(TypeError, match="Welcome cannot be sent as a request"):
        client.send_request(1, WELCOME)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="msgid must be an unsigned 32-bit integer"):
        client.send_request(MAX_MSGID + 1, Acquire("x"))
    with pytest.raises(ValueError, match="msgid must be an unsigned 32-bit integer"):
        server.send_error(-1, InboxFullError("x"))
    assert drain(server, client.send_request(1, Acquire("x"))) == [RequestReceived(1, Acquire("x"))]


def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="role must be"):
        Connection("peer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_frame_size"):
        Connection("server", max_frame_size=0)
    with pytest.raises(ValueError, match="max_frame_size"):
        Connection("server", max_frame_size=1 << 32)


# --- error triples ----------------------------------------------------------------------


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_error_triple_round_trips(error: BreakerError) -> None:
    triple = error_to_wire(error)
    assert triple[0] == error.code
    back = error_from_wire(msgpack.unpackb(msgpack.packb(triple)))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.details() == error.details()


def test_open_error_keeps_its_fields() -> None:
    back = error_from_wire(error_to_wire(CircuitBreakerOpenError("llm", 1.25, "half_open")))
    assert isinstance(back, CircuitBreakerOpenError)
    assert (back.name, back.retry_after, back.state) == ("llm", 1.25, "half_open")


def test_local_and_remote_protocol_errors_travel_as_protocol_error() -> None:
    for error in (LocalProtocolError("ours"), RemoteProtocolError("theirs")):
        back = error_from_wire(error_to_wire(error))
        assert type(back) is ProtocolError
        assert str(back) == str(error)


def test_an_unknown_error_code_becomes_a_plain_breaker_error() -> None:
    back = error_from_wire(["from_the_future", "new kind of failure", {"x": 1}, "extra"])
    assert type(back) is BreakerError
    assert str(back) == "new kind of failure"


def test_only_breaker_errors_go_on_the_wire() -> None:
    with pytest.raises(TypeError, match="only BreakerError"):
        error_to_wire(ValueError("x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "entry"),
    [
        ("successes", ["llm", 1]),
        ("successes", ["llm", 1, -5]),
        ("successes", [7, 1, 5]),
        ("rejections", ["llm", "many"]),
        ("rejections", "llm"),
    ],
)
def test_bad_counts_are_refused(key: str, entry: Any) -> None:
    _, server = greeted_pair()
    params = {"items": [], key: entry if isinstance(entry, str) else [entry]}
    server.receive_data(frame([2, "reports", params]))
    with pytest.raises(RemoteProtocolError, match=key):
        server.next_event()


def test_a_notification_framed_once_reads_like_a_connections_own() -> None:
    client, server = greeted_pair()
    push = StatePush(SNAP)
    shared = frame_notification(push)
    assert shared == server.send_notification(push)
    assert drain(client, shared) == [NotificationReceived(push)]


_IDLE_CONNECTIONS_RSS = """
import sys
from breakerd.protocol import Connection, Hello, NEED_DATA

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

hello = Connection("client").send_request(0, Hello(1, 1, "idle", 1))
warm = Connection("server")
warm.receive_data(hello)
warm.next_event()
before = rss_kib()
servers = [Connection("server") for _ in range(1000)]
for server in servers:
    server.receive_data(hello)
    assert server.next_event() is not NEED_DATA
    assert server.next_event() is NEED_DATA
print(rss_kib() - before)
"""


def test_an_idle_connection_holds_no_decoder() -> None:
    # A daemon keeps a Connection per client, most of them idle: what one
    # holds between messages is what 1,000 clients cost. A msgpack Unpacker
    # alone is ~44 KiB of memory (its decoding stack is inside it). Measured
    # as resident memory in a fresh process (tracemalloc would count the
    # Packer's buffer, which is allocated but never touched).
    import subprocess
    import sys

    grown_kib = int(
        subprocess.run(
            [sys.executable, "-c", _IDLE_CONNECTIONS_RSS],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert grown_kib / 1000 < 16
    # A frame split across reads still decodes: the decoder lives while bytes wait.
    hello = Connection("client").send_request(0, Hello(1, 1, "idle", 1))
    server = Connection("server")
    assert drain(server, hello[:3]) == []
    [event] = drain(server, hello[3:])
    assert isinstance(event, RequestReceived)


def test_connections_of_one_thread_can_share_one_packer() -> None:
    # The daemon serves every connection from its loop thread with one
    # Packer: 1,000 connections with a Packer each cost it ~40 MiB more.
    shared = new_packer()
    first, second = Connection("server", packer=shared), Connection("server", packer=shared)
    clients = [Connection("client"), Connection("client")]
    for server, client in zip((first, second), clients, strict=True):
        drain(server, client.send_request(0, HELLO))
    welcomes = [
        server.send_response(0, Welcome(1, f"server-{i}", 1))
        for i, server in enumerate((first, second))
    ]
    for i, (client, data) in enumerate(zip(clients, welcomes, strict=True)):
        [event] = drain(client, data)
        assert isinstance(event, ResponseReceived)
        assert event.result == Welcome(1, f"server-{i}", 1)


# --- codecs derived from dataclasses ------------------------------------------------
#
# A message's codec comes from its fields: a test-only message gets one with no
# codec code, and a field added to it is one line.


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    state: CircuitState
    count: Count = 0
    ratio: float | None = None
    tags: tuple[str, ...] = ()
    snapshot: Snapshot | None = None
    pairs: tuple[tuple[str, NonNegative], ...] = ()


@dataclass(frozen=True, slots=True)
class ProbeV2(Probe):
    region: str | None = None


PROBES = [
    Probe("a", CircuitState.OPEN),
    Probe("b", CircuitState.CLOSED, 3, 0.5, ("x", "y"), SNAP, (("p", 1),)),
]


def wire_trip(value: object) -> Any:
    """What msgpack hands the peer: enums as their strings, tuples as lists."""
    return msgpack.unpackb(msgpack.packb(value))


@pytest.mark.parametrize("probe", PROBES)
def test_a_test_only_message_gets_a_derived_codec(probe: Probe) -> None:
    codec = derive(Probe)
    assert codec.decode(wire_trip(codec.encode(probe)), "probe") == probe


def test_fields_at_their_default_stay_off_the_wire() -> None:
    assert derive(Probe).encode(Probe("a", CircuitState.OPEN)) == {"name": "a", "state": "open"}


def test_a_field_added_in_one_line_costs_older_peers_nothing() -> None:
    v1, v2 = derive(Probe), derive(ProbeV2)
    old, new = Probe("a", CircuitState.OPEN, 2), ProbeV2("a", CircuitState.OPEN, 2)
    # At its default the new field adds no byte; set, an older peer skips it.
    assert msgpack.packb(v2.encode(new)) == msgpack.packb(v1.encode(old))
    set_region = wire_trip(v2.encode(ProbeV2("a", CircuitState.OPEN, 2, region="eu")))
    assert set_region["region"] == "eu"
    assert v1.decode(set_region, "probe") == old
    assert v2.decode(wire_trip(v1.encode(old)), "probe") == new


PROBE_OK: dict[str, Any] = {"name": "a", "state": "open"}
BAD_PROBES: dict[str, tuple[dict[str, Any], str]] = {
    "missing": ({"state": "open"}, "^probe: missing required field 'name'$"),
    "wrong type": (
        PROBE_OK | {"name": 1},
        "^probe: field 'name' must be a string, got an integer$",
    ),
    "unknown enum": (PROBE_OK | {"state": "ajar"}, "^probe: field 'state' is 'ajar', not one of: "),
    "below range": (PROBE_OK | {"count": -1}, "^probe: field 'count' must be >= 0, got -1$"),
    "past the limit": (
        PROBE_OK | {"count": MAX_COUNT + 1},
        f"^probe: field 'count' is {MAX_COUNT + 1}, past the limit of {MAX_COUNT}$",
    ),
    "float as string": (PROBE_OK | {"ratio": "1"}, "field 'ratio' must be a number or nil"),
    "array entry": (PROBE_OK | {"tags": ["x", 2]}, "^probe: tags\\[1\\] must be a string, got an"),
    "nested": (
        PROBE_OK | {"snapshot": {"name": "x", "state": "open"}},
        "^probe.snapshot: missing required field 'generation'$",
    ),
    "short pair": (PROBE_OK | {"pairs": [["p"]]}, "^probe: pairs\\[0\\] must be an array \\[a"),
    "pair out of range": (PROBE_OK | {"pairs": [["p", -2]]}, "pairs\\[0\\]\\[1\\] must be >= 0"),
}


@pytest.mark.parametrize(("value", "match"), BAD_PROBES.values(), ids=BAD_PROBES.keys())
def test_a_derived_checker_names_the_field_at_fault(value: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        derive(Probe).decode(value, "probe")


def test_ints_become_floats_and_unknown_keys_are_ignored() -> None:
    decoded = derive(Probe).decode(PROBE_OK | {"ratio": 2, "from_the_future": [1]}, "probe")
    assert decoded == Probe("a", CircuitState.OPEN, ratio=2.0)
    assert type(decoded.ratio) is float


def test_a_field_type_without_a_wire_form_fails_when_derived() -> None:
    @dataclass(frozen=True)
    class Odd:
        when: complex

    with pytest.raises(TypeError, match=r"Odd\.when: no wire codec for the type"):
        derive(Odd)


def test_a_fast_path_refuses_to_load_when_its_message_gains_a_field() -> None:
    with pytest.raises(TypeError, match="ProbeV2's fields changed: update the probe codec"):
        _codec._knows(ProbeV2, "name state count ratio tags snapshot pairs", "the probe codec")
    _codec._knows(Probe, "name state count ratio tags snapshot pairs", "the probe codec")
    _codec._knows(ProbeV2, "name state count", "the probe codec", leading=True)


def test_a_failed_encode_on_one_connection_leaves_the_shared_packer_clean() -> None:
    # One bad message must not corrupt another connection's next frame.
    shared = new_packer()
    bad, good = Connection("server", packer=shared), Connection("server", packer=shared)
    client = Connection("client")
    hello = client.send_request(0, HELLO)
    for server in (bad, good):
        drain(server, hello)
    with pytest.raises(ProtocolError, match="cannot encode"):
        bad.send_response(0, Welcome(1, "x" * 64, cast(int, object())))
    [event] = drain(client, good.send_response(0, Welcome(1, "server", 1)))
    assert isinstance(event, ResponseReceived)
    assert event.result == Welcome(1, "server", 1)
