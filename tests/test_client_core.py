"""The sans-IO core of a daemon client (``_core.ClientCore``): bytes in, actions out."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from fake_daemon import (
    snap,
)

from breakerd.clients import (
    CircuitState,
    DaemonUnavailableError,
)
from breakerd.clients._core import ClientCore, Completion, NotConnectedError, SnapshotChanged
from breakerd.protocol import (
    MAX_FRAME_SIZE,
    MAX_MSGID,
    NEED_DATA,
    Acquire,
    Admission,
    BreakerStatus,
    Connection,
    Hello,
    Outcome,
    Report,
    ReportBatch,
    StatePush,
    Status,
    StatusRequest,
    UnknownBreakerError,
    Welcome,
)

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, BaseException | None]] = []

    def __call__(self, result: Any, error: BaseException | None) -> None:
        self.calls.append((result, error))


def server_events(server: Connection, data: bytes) -> list[Any]:
    server.receive_data(data)
    events = []
    while (event := server.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def run(actions: list[Completion | SnapshotChanged]) -> None:
    for action in actions:
        if isinstance(action, Completion):
            action.run()


@pytest.fixture
def linked() -> tuple[ClientCore, Connection]:
    """A core whose hello the server side has answered."""
    core = ClientCore(socket_path="/tmp/x.sock", client="test", pid=42, request_timeout=5.0)
    server = Connection("server")
    welcome = Recorder()
    (hello,) = server_events(server, core.connect(welcome, now=100.0))
    assert isinstance(hello.message, Hello)
    assert hello.message.pid == 42
    run(core.receive_data(server.send_response(hello.msgid, Welcome(1, "fake", 7))))
    assert welcome.calls == [(Welcome(1, "fake", 7), None)]
    return core, server


def test_core_reply_completes_its_request_after_updating_the_cache(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, server = linked
    reply = Recorder()
    (request,) = server_events(server, core.request(Acquire("svc"), reply, now=100.0))
    assert request.message == Acquire("svc")
    admission = Admission(True, 3, 0, snap("svc", generation=3))
    actions = core.receive_data(server.send_response(request.msgid, admission))
    # The snapshot lands before the completion: a woken caller reads its own write.
    assert actions == [
        SnapshotChanged(snap("svc", generation=3), None),
        Completion(reply, admission, None),
    ]
    assert core.snapshots["svc"] == snap("svc", generation=3)
    assert core.pending == 0


def test_core_out_of_order_replies_reach_their_own_callers(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, server = linked
    first, second = Recorder(), Recorder()
    (r1,) = server_events(server, core.request(StatusRequest("a"), first, now=100.0))
    (r2,) = server_events(server, core.request(StatusRequest("b"), second, now=100.0))
    assert r1.msgid != r2.msgid
    status_b = Status((BreakerStatus(snap("b"), 2, 0, 0, 0),))
    status_a = Status((BreakerStatus(snap("a"), 1, 0, 0, 0),))
    run(core.receive_data(server.send_response(r2.msgid, status_b)))
    assert (first.calls, second.calls) == ([], [(status_b, None)])
    run(core.receive_data(server.send_response(r1.msgid, status_a)))
    assert first.calls == [(status_a, None)]


def test_core_error_replies_become_the_daemons_exception(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, server = linked
    reply = Recorder()
    (request,) = server_events(server, core.request(Acquire("nope"), reply, now=100.0))
    run(core.receive_data(server.send_error(request.msgid, UnknownBreakerError("no 'nope'"))))
    ((result, error),) = reply.calls
    assert result is None
    assert isinstance(error, UnknownBreakerError)
    assert "no 'nope'" in str(error)


def test_core_pushes_update_the_cache_and_stale_ones_are_ignored(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, server = linked
    opened = snap("svc", CircuitState.OPEN, 2)
    data = server.send_notification(StatePush(opened))
    data += server.send_notification(StatePush(snap("svc", CircuitState.CLOSED, 1)))
    data += server.send_notification(StatePush(opened))
    assert core.receive_data(data) == [SnapshotChanged(opened, None)]
    assert core.snapshots["svc"] is not None
    assert core.snapshots["svc"].state is CircuitState.OPEN


def test_core_batches_many_outcomes_into_one_notification(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, server = linked
    for _ in range(500):
        assert core.post(("svc", 0, Outcome.SUCCESS, 0.0, 0, None))
    assert core.post(("svc", 0, Outcome.IGNORED, 0.25, 0, None))
    assert core.post_rejection("svc")
    assert core.post_rejection("svc")
    counts, others = server_events(server, core.take_batch())
    assert isinstance(counts.message, ReportBatch)
    assert counts.message.successes == (("svc", 0, 500),)
    assert counts.message.rejections == (("svc", 2),)
    assert counts.message.items == ()
    assert isinstance(others.message, ReportBatch)
    assert others.message.items == (Report("svc", 0, Outcome.IGNORED, 0.25),)
    assert core.take_batch() == b""


def test_core_splits_a_huge_batch_below_the_frame_limit(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, server = linked
    name = "n" * 2000
    count = 800  # ~1.6 MB of names: more than one frame can hold
    for _ in range(count):
        core.post((name, 0, Outcome.IGNORED, 0.0, 0, None))
    data = core.take_batch()
    events = server_events(server, data)
    assert len(events) >= 2
    assert sum(len(e.message.items) for e in events) == count
    assert len(data) < len(events) * MAX_FRAME_SIZE


def test_core_request_sends_queued_outcomes_first(linked: tuple[ClientCore, Connection]) -> None:
    core, server = linked
    core.post(("svc", 0, Outcome.SUCCESS, 0.0, 0, None))
    events = server_events(server, core.request(Report("svc", 0, Outcome.FAILURE), Recorder(), 1.0))
    assert [type(e.message) for e in events] == [ReportBatch, Report]
    assert core.queued_reports == 0


def test_core_queue_is_bounded() -> None:
    core = ClientCore(socket_path="/tmp/x", client="t", pid=1, max_queued_reports=2)
    item = ("svc", 0, Outcome.SUCCESS, 0.0, 0, None)
    assert core.post(item)
    assert core.post(item)
    assert not core.post(item)


def test_core_connection_lost_fails_every_pending_request(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, _ = linked
    replies = [Recorder(), Recorder()]
    for reply in replies:
        core.request(Acquire("svc"), reply, now=100.0)
    core.post(("svc", 0, Outcome.SUCCESS, 0.0, 0, None))
    run(core.connection_lost("the daemon closed the connection"))
    for reply in replies:
        ((result, error),) = reply.calls
        assert result is None
        assert isinstance(error, DaemonUnavailableError)
        assert "/tmp/x.sock" in str(error)
        assert "closed the connection" in str(error)
    assert core.pending == 0
    assert core.queued_reports == 0
    assert not core.connected
    with pytest.raises(NotConnectedError):
        core.request(Acquire("svc"), Recorder(), now=100.0)


def test_core_deadline_is_the_oldest_requests(linked: tuple[ClientCore, Connection]) -> None:
    core, _ = linked  # the hello was answered: nothing pending
    assert core.next_deadline() is None
    core.request(Acquire("a"), Recorder(), now=200.0)
    core.request(Acquire("b"), Recorder(), now=201.0)
    assert core.next_deadline() == 205.0
    assert not core.timed_out(204.9)
    assert core.timed_out(205.0)


def test_core_msgids_wrap_and_skip_pending_ones(linked: tuple[ClientCore, Connection]) -> None:
    core, server = linked
    core._next_msgid = MAX_MSGID
    ids = [server_events(server, core.request(Acquire("a"), Recorder(), 1.0))[0].msgid]
    ids.append(server_events(server, core.request(Acquire("a"), Recorder(), 1.0))[0].msgid)
    assert ids == [MAX_MSGID, 1]
    core._next_msgid = MAX_MSGID  # both still pending: the next free one is 2
    (event,) = server_events(server, core.request(Acquire("a"), Recorder(), 1.0))
    assert event.msgid == 2


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00\x00\x03abc", struct.pack(">I", MAX_FRAME_SIZE + 1)],
    ids=["garbage", "huge frame"],
)
def test_core_protocol_violations_mark_the_connection_failed(
    linked: tuple[ClientCore, Connection], data: bytes
) -> None:
    core, _ = linked
    assert core.receive_data(data) == []
    assert core.failure is not None
    assert "protocol error" in core.failure


def test_core_a_reply_to_nothing_pending_is_a_protocol_error(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, server = linked
    assert core.receive_data(server.send_response(77, snap("svc"))) == []
    assert core.failure is not None
    assert "msgid 77" in core.failure


def test_core_connect_drops_outcomes_meant_for_the_last_connection(
    linked: tuple[ClientCore, Connection],
) -> None:
    core, _ = linked
    core.post(("svc", 0, Outcome.SUCCESS, 0.0, 0, None))
    core.snapshots["svc"] = snap("svc", CircuitState.OPEN, 4)
    core.connection_lost("gone")
    core.connect(Recorder(), now=1.0)
    assert core.queued_reports == 0
    assert core.snapshots == {}
