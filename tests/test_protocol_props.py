"""Property tests of the wire protocol.

The decoder's promise: whatever bytes arrive, ``next_event`` returns events or
raises ``ProtocolError``, nothing else. And the codec's: any message survives
the trip through a client and a server connection unchanged, however the
bytes are cut up on the way.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from breakerd.protocol import (
    ADMIN_OPS,
    MAX_MSGID,
    NEED_DATA,
    PROTOCOL_VERSION,
    Acquire,
    Admin,
    Admission,
    BreakerStatus,
    CircuitState,
    Connection,
    ConnectionClosed,
    Hello,
    NotificationReceived,
    Outcome,
    ProtocolError,
    Register,
    Registered,
    Report,
    ReportBatch,
    RequestMessage,
    RequestReceived,
    ResponseReceived,
    Snapshot,
    StatePush,
    Status,
    StatusRequest,
    Subscribe,
    Subscribed,
    TransitionEvent,
    Welcome,
    _codec,
)
from breakerd.protocol._codec import MAX_COUNT, Event, ResultMessage

HELLO = Hello(1, PROTOCOL_VERSION, "props", 1)
WELCOME = Welcome(PROTOCOL_VERSION, "daemon", 2)


def drain_or_error(conn: Connection, chunks: list[bytes]) -> tuple[list[Event], bool]:
    """Feed every chunk and collect events; True if a ProtocolError was raised."""
    events: list[Event] = []
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
                if isinstance(event, ConnectionClosed):
                    return events, False
    except ProtocolError:
        return events, True
    return events, False


def fresh(role: str, greeted: bool) -> Connection:
    """A connection, optionally past the handshake so later rules get exercised."""
    if role == "server":
        server = Connection("server")
        if greeted:
            server.receive_data(Connection("client").send_request(0, HELLO))
            assert isinstance(server.next_event(), RequestReceived)
            server.send_response(0, WELCOME)
        return server
    client = Connection("client")
    if greeted:
        client.send_request(0, HELLO)
    return client


# --- arbitrary bytes --------------------------------------------------------------

roles = st.sampled_from(["server", "client"])


@given(data=st.binary(), role=roles, greeted=st.booleans())
@example(data=b"\x00\x00\x00\x01\xc1", role="server", greeted=True)
@example(data=b"\xff\xff\xff\xff", role="client", greeted=False)
def test_random_bytes_raise_only_protocol_error(data: bytes, role: str, greeted: bool) -> None:
    conn = fresh(role, greeted)
    drain_or_error(conn, [data, b""])


@given(chunks=st.lists(st.binary(max_size=64), max_size=8), role=roles)
def test_random_chunks_raise_only_protocol_error(chunks: list[bytes], role: str) -> None:
    events, failed = drain_or_error(fresh(role, True), [*chunks, b""])
    # Without a failure the stream ended cleanly, and said so.
    assert failed or events[-1] == ConnectionClosed()


# Any msgpack value, to get past framing and into the message decoder.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=12) | st.binary(max_size=4), inner, max_size=6)
    ),
    max_leaves=30,
)
methods = st.sampled_from(
    [
        "hello",
        "register",
        "acquire",
        "report",
        "admin",
        "status",
        "subscribe",
        "reports",
        "state",
        "transition",
        "x",
    ]
)
# Values shaped like messages, so that the field checks get reached.
message_like = st.one_of(
    msgpack_values,
    st.tuples(st.just(0), st.integers(-1, 2**33), methods, msgpack_values).map(list),
    st.tuples(st.just(1), st.integers(-1, 2**33), msgpack_values, msgpack_values).map(list),
    st.tuples(st.just(2), methods, msgpack_values).map(list),
    st.tuples(
        st.just(2),
        st.just("transition"),
        st.fixed_dictionaries(
            {},
            optional={
                "name": msgpack_values,
                "from_state": st.sampled_from(["open", "closed", "nope"]) | msgpack_values,
                "to_state": st.sampled_from(["open", "half_open"]) | msgpack_values,
                "generation": msgpack_values,
                "reason": msgpack_values,
                "at": msgpack_values,
                "failure_rate": msgpack_values,
                "open_until": msgpack_values,
            },
        ),
    ).map(list),
    st.tuples(
        st.just(2),
        st.just("reports"),
        st.fixed_dictionaries({"items": st.lists(st.lists(msgpack_values, max_size=8))}),
    ).map(list),
    st.tuples(
        st.just(1),
        st.integers(0, 10),
        st.none(),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(
                    ["welcome", "registered", "admission", "snapshot", "subscribed"]
                )
            },
            optional={
                "snapshot": msgpack_values,
                "name": msgpack_values,
                "state": st.sampled_from(["open", "closed", "nope"]) | msgpack_values,
                "generation": msgpack_values,
                "admitted": msgpack_values,
                "lease": msgpack_values,
                "version": msgpack_values,
                "conflicts": msgpack_values,
            },
        ),
    ).map(list),
)


def framed(value: Any) -> bytes:
    body = msgpack.packb(value)
    return struct.pack(">I", len(body)) + body


@given(value=message_like, role=roles)
def test_framed_msgpack_values_raise_only_protocol_error(value: Any, role: str) -> None:
    events, failed = drain_or_error(fresh(role, True), [framed(value), b""])
    if not failed:
        assert events[-1] == ConnectionClosed()
        assert len(events) == 2


# --- valid messages -------------------------------------------------------------------

names = st.text(max_size=20)
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
counts = st.integers(min_value=0, max_value=2**32)
floats = st.floats(allow_nan=False)  # NaN != NaN would fail equality, not the codec
opt_floats = st.none() | floats
msgids = st.integers(min_value=0, max_value=MAX_MSGID)

snapshots = st.builds(
    Snapshot,
    name=names,
    state=st.sampled_from(CircuitState),
    generation=ints,
    open_until=opt_floats,
    failure_rate=opt_floats,
    slow_call_rate=opt_floats,
    calls=counts,
    trials_in_flight=counts,
    slow_call_duration=opt_floats,
    successes_safe=st.booleans(),
    reason=st.none() | names,
    error_code=st.none() | names,
    opened_by_pid=ints,
)
reports = st.builds(
    Report,
    name=names,
    generation=ints,
    outcome=st.sampled_from(Outcome),
    duration=floats,
    lease=ints,
    retry_after=opt_floats,
)
# The request form also carries why (its class), the provider's code and the pid;
# the batched form never does (those reports are acknowledged requests).
report_requests = st.builds(
    Report,
    name=names,
    generation=ints,
    outcome=st.sampled_from(Outcome),
    duration=floats,
    lease=ints,
    retry_after=opt_floats,
    reason=st.none() | names,
    error_code=st.none() | names,
    pid=ints,
)
# Config values come back as msgpack gives them: lists, not tuples; no NaN.
config_values = st.recursive(
    st.none() | st.booleans() | ints | floats | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
requests: st.SearchStrategy[RequestMessage] = st.one_of(
    st.builds(Register, name=names, config=st.dictionaries(st.text(max_size=8), config_values)),
    st.builds(
        Acquire,
        name=names,
        successes=st.integers(0, MAX_COUNT),
        successes_generation=st.integers(0, 2**63),
    ),
    report_requests,
    st.builds(Admin, name=names, op=st.sampled_from(sorted(ADMIN_OPS))),
    st.builds(StatusRequest, name=st.none() | names),
    st.builds(Subscribe, names=st.lists(names, max_size=4).map(tuple)),
)
results: st.SearchStrategy[ResultMessage] = st.one_of(
    st.builds(
        Registered,
        snapshot=snapshots,
        conflicts=st.lists(names).map(tuple),
        slot=st.integers(0, 2**32),
    ),
    st.builds(
        Admission,
        admitted=st.booleans(),
        generation=ints,
        lease=ints,
        snapshot=snapshots,
        retry_after=opt_floats,
    ),
    snapshots,
    st.just(Subscribed()),
    st.builds(
        Status,
        st.lists(
            st.builds(
                BreakerStatus,
                snapshot=snapshots,
                successes=counts,
                failures=counts,
                rejections=counts,
                ignored=counts,
                clients=counts,
            ),
            max_size=4,
        ).map(tuple),
    ),
)


@given(msgid=msgids, request=requests, result=results)
def test_any_request_and_result_round_trip(
    msgid: int, request: RequestMessage, result: ResultMessage
) -> None:
    client, server = fresh("client", True), fresh("server", True)
    server.receive_data(client.send_request(msgid, request))
    assert server.next_event() == RequestReceived(msgid, request)
    assert server.next_event() is NEED_DATA
    client.receive_data(server.send_response(msgid, result))
    assert client.next_event() == ResponseReceived(msgid, result, None)
    assert client.next_event() is NEED_DATA


@given(batch=st.lists(reports, max_size=20).map(tuple), snapshot=snapshots)
def test_any_notification_round_trips(batch: tuple[Report, ...], snapshot: Snapshot) -> None:
    client, server = fresh("client", True), fresh("server", True)
    server.receive_data(client.send_notification(ReportBatch(batch)))
    assert server.next_event() == NotificationReceived(ReportBatch(batch))
    client.receive_data(server.send_notification(StatePush(snapshot)))
    assert client.next_event() == NotificationReceived(StatePush(snapshot))


transition_events = st.builds(
    TransitionEvent,
    name=names,
    from_state=st.sampled_from(CircuitState),
    to_state=st.sampled_from(CircuitState),
    generation=ints,
    reason=names,
    at=floats,
    failure_rate=opt_floats,
    slow_call_rate=opt_floats,
    open_until=opt_floats,
)


@given(event=transition_events)
def test_any_transition_event_round_trips(event: TransitionEvent) -> None:
    client, server = fresh("client", True), fresh("server", True)
    client.receive_data(server.send_notification(event))
    assert client.next_event() == NotificationReceived(event)
    assert client.next_event() is NEED_DATA


@st.composite
def streams_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[Event], list[int]]:
    """A client's byte stream, the events it should give, and cut points into it."""
    client = Connection("client")
    parts = [client.send_request(0, HELLO)]
    expected: list[Event] = [RequestReceived(0, HELLO)]
    for msgid, request in enumerate(draw(st.lists(requests, max_size=5)), start=1):
        parts.append(client.send_request(msgid, request))
        expected.append(RequestReceived(msgid, request))
    if draw(st.booleans()):
        batch = ReportBatch(tuple(draw(st.lists(reports, max_size=5))))
        parts.append(client.send_notification(batch))
        expected.append(NotificationReceived(batch))
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    return stream, expected, cuts


@given(streams_and_cuts())
def test_any_chunking_gives_the_same_events(case: tuple[bytes, list[Event], list[int]]) -> None:
    stream, expected, cuts = case
    bounds = [0, *cuts, len(stream)]
    # b"" would mean EOF: a transport never passes an empty read otherwise.
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds) if a != b]
    events, failed = drain_or_error(Connection("server"), [*chunks, b""])
    assert not failed
    assert events == [*expected, ConnectionClosed()]


@given(streams_and_cuts(), st.data())
def test_truncated_stream_gives_a_prefix_then_protocol_error(
    case: tuple[bytes, list[Event], list[int]], data: st.DataObject
) -> None:
    stream, expected, _ = case
    cut = data.draw(st.integers(0, len(stream) - 1))
    events, failed = drain_or_error(Connection("server"), [stream[:cut], b""])
    assert events[: len(events) - (not failed)] == expected[: len(events) - (not failed)]
    # Cut between frames the close is clean; cut inside one it is an error.
    boundaries = frame_boundaries(stream)
    if cut in boundaries:
        assert not failed
        assert events[-1] == ConnectionClosed()
    else:
        assert failed


def frame_boundaries(stream: bytes) -> set[int]:
    boundaries, pos = {0}, 0
    while pos < len(stream):
        (n,) = struct.unpack_from(">I", stream, pos)
        pos += 4 + n
        boundaries.add(pos)
    return boundaries


@given(streams_and_cuts(), st.data())
def test_corrupted_stream_raises_only_protocol_error(
    case: tuple[bytes, list[Event], list[int]], data: st.DataObject
) -> None:
    stream, _, _ = case
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    drain_or_error(Connection("server"), [bytes(buf), b""])


# The decoders' fast paths (the usual shape of a snapshot, of an admission)
# must decode exactly as the field-by-field checks do: the same message, or
# the same error.

wire_values = (
    st.none()
    | st.booleans()
    | ints
    | floats
    | st.text(max_size=4)
    | st.sampled_from([s.value for s in CircuitState])
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)
)


def _decoded(decode: Any, *args: Any) -> object:
    try:
        return decode(*args)
    except ProtocolError as exc:
        return (type(exc), str(exc))


def _wire_map(message: object) -> dict[str, Any]:
    # What msgpack hands the decoder: enums as their strings, tuples as lists.
    packed = msgpack.packb(_codec._RESULT_ENCODERS[type(message)](message))
    result: dict[str, Any] = msgpack.unpackb(packed)
    return result


_SNAPSHOT_KEYS = [f.name for f in dataclasses.fields(Snapshot)]


def _mutate(data: st.DataObject, d: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    d = dict(d)
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3)):
        if data.draw(st.booleans()):
            d.pop(key, None)
        else:
            d[key] = data.draw(wire_values)
    return d


@given(snapshot=snapshots, data=st.data())
def test_the_snapshot_fast_path_decodes_as_the_field_checks(
    snapshot: Snapshot, data: st.DataObject
) -> None:
    d = _mutate(data, _wire_map(snapshot), [*_SNAPSHOT_KEYS, "type", "extra"])
    fast = _decoded(_codec._snapshot, d, "w")
    assert fast == _decoded(_codec._snapshot_fields, d, "w")
    if isinstance(fast, Snapshot) and d == _wire_map(snapshot):
        assert fast == snapshot


@given(
    admission=st.builds(
        Admission,
        admitted=st.booleans(),
        generation=ints,
        lease=ints,
        snapshot=snapshots,
        retry_after=opt_floats,
    ),
    data=st.data(),
)
def test_the_admission_fast_path_decodes_as_the_field_checks(
    admission: Admission, data: st.DataObject
) -> None:
    d = _mutate(data, _wire_map(admission), [*_wire_map(admission)])
    if "snapshot" in d and type(d["snapshot"]) is dict and data.draw(st.booleans()):
        d["snapshot"] = _mutate(data, d["snapshot"], _SNAPSHOT_KEYS)
    assert _decoded(_codec._admission, d) == _decoded(_codec._admission_fields, d)


# -- counts on the wire are bounded ----------------------------------------------------

wire_counts = st.integers(0, MAX_COUNT)
past_the_bound = st.integers(MAX_COUNT + 1, 2**64 - 1)


@given(
    successes=st.lists(st.tuples(st.text(max_size=8), st.integers(0, 2**63), wire_counts)),
    rejections=st.lists(st.tuples(st.text(max_size=8), wire_counts)),
)
def test_counts_up_to_max_count_round_trip(
    successes: list[tuple[str, int, int]], rejections: list[tuple[str, int]]
) -> None:
    batch = ReportBatch((), tuple(successes), tuple(rejections))
    server = fresh("server", True)
    server.receive_data(fresh("client", True).send_notification(batch))
    assert server.next_event() == NotificationReceived(batch)


@given(data=st.data(), count=past_the_bound, where=st.sampled_from(["successes", "rejections"]))
def test_a_count_past_max_count_is_a_protocol_error(
    data: st.DataObject, count: int, where: str
) -> None:
    good = data.draw(st.lists(wire_counts, max_size=3))
    entries: list[list[Any]] = [["svc", 1, n] if where == "successes" else ["svc", n] for n in good]
    bad = ["svc", 1, count] if where == "successes" else ["svc", count]
    entries.insert(data.draw(st.integers(0, len(entries))), bad)
    body = msgpack.packb([2, "reports", {"items": [], where: entries}])
    events, failed = drain_or_error(fresh("server", True), [struct.pack(">I", len(body)) + body])
    assert failed
    assert events == []
    with pytest.raises(ProtocolError, match=f"{where}.*past the limit of {MAX_COUNT}"):
        _codec.decode_message([2, "reports", {"items": [], where: entries}])


@given(count=past_the_bound)
def test_an_acquire_carrying_too_many_successes_is_a_protocol_error(count: int) -> None:
    with pytest.raises(ProtocolError, match=f"successes.*past the limit of {MAX_COUNT}"):
        _codec.decode_message(
            [0, 7, "acquire", {"name": "svc", "successes": count, "successes_generation": 1}]
        )
