# Tests read `breaker.state` before and after calls that change it on another
# thread; mypy narrows the property after one assert and flags the next.
# mypy: disable-error-code="comparison-overlap"
"""The daemon-mode client: the sans-IO core, and the shells against a fake daemon.

The fake daemon speaks the real protocol (``Connection("server")``) over real
Unix sockets under /tmp, one thread per peer. Nothing here sleeps to let time
pass: tests wait for socket events (a frame arriving, a connection closing)
with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog.testing
from daemon_helpers import poll_until

from breakerd.actor import ActorSystem, BreakerConfig, Transition
from breakerd.actor.daemon._state_table import SharedStateTable
from breakerd.actor.testing import FakeClock
from breakerd.clients import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    DaemonClient,
    DaemonUnavailableError,
    RemoteBreaker,
)
from breakerd.clients._core import ClientCore, Completion, NotConnectedError, SnapshotChanged
from breakerd.clients._remote import LOCAL_GENERATION_OFFSET, close_all_clients, get_client
from breakerd.protocol import (
    MAX_FRAME_SIZE,
    MAX_MSGID,
    NEED_DATA,
    Acquire,
    Admin,
    Admission,
    BreakerError,
    BreakerStatus,
    Connection,
    Hello,
    InvalidRequestError,
    NotificationReceived,
    Outcome,
    ProtocolError,
    Register,
    Registered,
    Report,
    ReportBatch,
    RequestMessage,
    RequestReceived,
    ResultMessage,
    Snapshot,
    StatePush,
    Status,
    StatusRequest,
    UnknownBreakerError,
    Welcome,
    negotiate_version,
)

pytestmark = pytest.mark.anyio

T = TypeVar("T")
WAIT = 10.0  # generous bound on a socket event; tests finish far sooner


def ok_sync(value: int = 1) -> int:
    return value


class Boom(Exception):
    pass


def fail_sync() -> int:
    raise Boom("upstream failed")


def wait_until(predicate: Callable[[], T], timeout: float = WAIT) -> T:
    """Wait for a condition another thread or process makes true (not for time to pass)."""
    value = poll_until(predicate, timeout)
    if value is None:
        raise AssertionError("condition not reached in time")
    return value


# -- the fake daemon -------------------------------------------------------------------


class Peer:
    """One client connection as the fake daemon sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = Connection("server")
        self.lock = threading.Lock()
        self.hello: Hello | None = None
        self.names: set[str] = set()
        self.closed = False
        size = struct.calcsize("3i")
        self.cred_pid, _, _ = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
        )

    def respond(self, msgid: int, result: ResultMessage, *, fds: tuple[int, ...] = ()) -> None:
        with self.lock:
            data = self.conn.send_response(msgid, result)
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self._send(data)

    def fail(self, msgid: int, error: BreakerError) -> None:
        with self.lock:
            self._send(self.conn.send_error(msgid, error))

    def push(self, snapshot: Snapshot) -> None:
        with self.lock:
            self._send(self.conn.send_notification(StatePush(snapshot)))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def kill(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FakeDaemon:
    """Just enough of ``breakerd serve`` to test clients against real sockets.

    Breakers start ``closed``; a ``failure`` report opens one (generation + 1,
    pushed to every peer that registered it). Requests whose type is in
    ``hold`` are kept in ``held`` for the test to answer with ``reply``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.cond = threading.Condition()
        self.peers: list[Peer] = []
        self.requests: list[tuple[Peer, RequestMessage]] = []
        self.batches: list[tuple[Peer, ReportBatch]] = []
        self.states: dict[str, Snapshot] = {}
        self.conflicts: dict[str, tuple[str, ...]] = {}
        self.hold: set[type] = set()
        self.held: list[tuple[Peer, int, RequestMessage]] = []
        #: Offered with every welcome when set (as ``breakerd serve`` does).
        self.table: SharedStateTable | None = None
        #: Send this descriptor with the welcome instead of the table's (-1: none at all).
        self.table_fd_override: int | None = None
        self._lease = 0
        self._stopping = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._threads: list[threading.Thread] = []

    def start(self) -> FakeDaemon:
        self._spawn(self._accept)
        return self

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self.table is not None:
            self.table.close()
        # Accepting ends first, so every peer is in the list that is killed next.
        self._threads[0].join(WAIT)
        self._listener.close()
        os.unlink(self.path)
        self.kill_peers()
        for thread in self._threads:
            thread.join(WAIT)
            assert not thread.is_alive()

    def kill_peers(self) -> None:
        with self.cond:
            peers = list(self.peers)
        for peer in peers:
            peer.kill()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            peer = Peer(sock)
            with self.cond:
                self.peers.append(peer)
                self.cond.notify_all()
            self._spawn(self._serve, peer)

    def _serve(self, peer: Peer) -> None:
        try:
            while True:
                data = peer.sock.recv(65536)
                if not data:
                    return
                peer.conn.receive_data(data)
                while (event := peer.conn.next_event()) is not NEED_DATA:
                    if isinstance(event, RequestReceived):
                        self._request(peer, event.msgid, event.message)
                    elif isinstance(event, NotificationReceived):
                        assert isinstance(event.message, ReportBatch)
                        with self.cond:
                            self.batches.append((peer, event.message))
                            self.cond.notify_all()
        except (OSError, ProtocolError):
            return
        finally:
            peer.sock.close()
            with self.cond:
                peer.closed = True
                self.cond.notify_all()

    def _request(self, peer: Peer, msgid: int, message: RequestMessage) -> None:
        with self.cond:
            self.requests.append((peer, message))
            self.cond.notify_all()
            held = type(message) in self.hold
            if held:
                self.held.append((peer, msgid, message))
        if isinstance(message, Hello):
            peer.hello = message
            version = negotiate_version(message)
            table = self.table
            if table is None:
                peer.respond(msgid, Welcome(version, "fake", os.getpid()))
                return
            fd = table.reader_fd if self.table_fd_override is None else self.table_fd_override
            peer.respond(
                msgid,
                Welcome(version, "fake", os.getpid(), table.slots),
                fds=(fd,) if fd >= 0 else (),
            )
            return
        if held:
            return
        try:
            result = self.answer(peer, message)
        except BreakerError as exc:
            peer.fail(msgid, exc)
        else:
            peer.respond(msgid, result)

    def answer(self, peer: Peer, message: RequestMessage) -> ResultMessage:
        with self.cond:
            if isinstance(message, Register):
                peer.names.add(message.name)
                snapshot = self.states.setdefault(
                    message.name, Snapshot(message.name, CircuitState.CLOSED, 0)
                )
                slot = 0
                if self.table is not None:
                    slot = self.table.slot_for(message.name)
                    self.table.publish(snapshot)
                return Registered(snapshot, self.conflicts.get(message.name, ()), slot)
            if isinstance(message, StatusRequest):
                return Status(
                    tuple(
                        BreakerStatus(s, self.count(s.name, Outcome.SUCCESS), 0, 0, 0)
                        for s in self.states.values()
                        if message.name in (None, s.name)
                    )
                )
            assert isinstance(message, (Acquire, Report, Admin))
            found = self.states.get(message.name)
            if found is None:
                raise UnknownBreakerError(f"no breaker {message.name!r}")
            snapshot = found
            if isinstance(message, Acquire):
                admitted = snapshot.state in (CircuitState.CLOSED, CircuitState.HALF_OPEN)
                lease = 0
                if admitted and snapshot.state is CircuitState.HALF_OPEN:
                    self._lease += 1
                    lease = self._lease
                return Admission(admitted, snapshot.generation, lease, snapshot)
            if isinstance(message, Admin):
                state = {"force_open": CircuitState.FORCED_OPEN, "reset": CircuitState.CLOSED}
                opened = Snapshot(message.name, state.get(message.op, CircuitState.DISABLED), 9)
                self._set(opened)
                return opened
            if message.outcome is Outcome.FAILURE and snapshot.generation == message.generation:
                snapshot = Snapshot(
                    message.name,
                    CircuitState.OPEN,
                    snapshot.generation + 1,
                    open_until=time.monotonic() + 30.0,
                )
                self._set(snapshot)
            return snapshot

    def push(self, snapshot: Snapshot) -> None:
        with self.cond:
            self._set(snapshot)

    def write_table(self, snapshot: Snapshot) -> None:
        """Change a breaker's state in the shared table only: no push, no reply."""
        assert self.table is not None
        with self.cond:
            self.states[snapshot.name] = snapshot
            self.table.publish(snapshot)

    def _set(self, snapshot: Snapshot) -> None:
        self.states[snapshot.name] = snapshot
        if self.table is not None:
            self.table.publish(snapshot)  # the table first, as the real daemon does
        for peer in self.peers:
            if snapshot.name in peer.names and not peer.closed:
                peer.push(snapshot)

    def wait_for(self, predicate: Callable[[], T], timeout: float = WAIT) -> T:
        with self.cond:
            result = self.cond.wait_for(predicate, timeout)
        assert result, "the fake daemon did not see what the test waited for"
        return result

    # -- what the daemon saw ----------------------------------------------------------

    def received(self, kind: type[T]) -> list[T]:
        with self.cond:
            return [m for _, m in self.requests if isinstance(m, kind)]

    def reported(self) -> list[Report]:
        with self.cond:
            return [r for _, b in self.batches for r in b.items]

    def count(self, name: str, outcome: Outcome) -> int:
        batched = sum(
            1 for _, b in self.batches for r in b.items if (r.name, r.outcome) == (name, outcome)
        )
        if outcome is Outcome.SUCCESS:
            # Plain successes travel as counts per (name, generation).
            batched += sum(n for _, b in self.batches for nm, _, n in b.successes if nm == name)
        asked = sum(
            1
            for _, m in self.requests
            if isinstance(m, Report) and (m.name, m.outcome) == (name, outcome)
        )
        if outcome is Outcome.SUCCESS:
            # A strict caller's last success rides on its next acquire.
            asked += sum(
                m.successes for _, m in self.requests if isinstance(m, Acquire) and m.name == name
            )
        return batched + asked

    def live_peers(self) -> list[Peer]:
        with self.cond:
            return [p for p in self.peers if not p.closed]


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="bd")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "d.sock")


@pytest.fixture
def daemon(sock_path: str) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(sock_path).start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    close_all_clients()


@pytest.fixture
def system() -> Iterator[ActorSystem]:
    with ActorSystem().running_in_thread() as running:
        yield running


@pytest.fixture
def make_client(sock_path: str) -> Iterator[Callable[..., DaemonClient]]:
    clients: list[DaemonClient] = []

    def make(**kwargs: Any) -> DaemonClient:
        client = DaemonClient(sock_path, **kwargs).start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def ask(link: RemoteBreaker, message: object) -> Any:
    """A blocking request through a link, as the facade's ``_request_sync`` does it."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def reply(result: Any, error: BaseException | None) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    link.ask(message, reply)
    return future.result(WAIT)


# -- the sans-IO core ------------------------------------------------------------------


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


def snap(name: str, state: CircuitState = CircuitState.CLOSED, generation: int = 0) -> Snapshot:
    return Snapshot(name, state, generation)


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


# -- DaemonClient and RemoteBreaker over a real socket ----------------------------------------


def test_link_registers_and_answers_requests(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    daemon.states["svc"] = snap("svc", CircuitState.CLOSED, 5)
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(min_calls=3), client=client)
    assert link.remote
    assert link.snapshot == snap("svc", CircuitState.CLOSED, 5)
    (register,) = daemon.received(Register)
    assert register.config["min_calls"] == 3
    assert register.config == BreakerConfig(min_calls=3).as_dict()
    admission = ask(link, Acquire("svc"))
    assert admission == Admission(True, 5, 0, snap("svc", CircuitState.CLOSED, 5))
    # The facade asks its actor for one breaker's status; the daemon answers with a list.
    status = ask(link, StatusRequest("svc"))
    assert isinstance(status, BreakerStatus)
    assert status.snapshot.name == "svc"
    (peer,) = daemon.live_peers()
    assert peer.hello is not None
    assert peer.hello.pid == os.getpid()


def test_replies_out_of_order_over_the_socket(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    daemon.states["svc"] = snap("svc", CircuitState.HALF_OPEN, 1)
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    daemon.hold.add(Acquire)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, link, Acquire("svc"))
        daemon.wait_for(lambda: len(daemon.held) == 1)
        second = pool.submit(ask, link, Acquire("svc"))
        daemon.wait_for(lambda: len(daemon.held) == 2)
        (p1, id1, _), (p2, id2, _) = daemon.held
        half_open = snap("svc", CircuitState.HALF_OPEN, 1)
        p2.respond(id2, Admission(True, 1, 22, half_open))
        assert second.result(WAIT).lease == 22
        assert not first.done()
        p1.respond(id1, Admission(True, 1, 11, half_open))
        assert first.result(WAIT).lease == 11


def record_transitions(link: RemoteBreaker) -> tuple[list[Transition], threading.Event]:
    """The transitions ``link`` announces from now on, and an event set at each."""
    seen: list[Transition] = []
    got = threading.Event()

    def listener(transition: Transition, snapshot: Snapshot) -> None:
        seen.append(transition)
        got.set()

    link.listeners.append(listener)
    return seen, got


def test_pushes_update_the_snapshot_and_fire_transitions(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    seen, got = record_transitions(link)
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    daemon.push(opened)
    assert got.wait(WAIT)
    assert link.snapshot == opened
    (transition,) = seen
    assert (transition.from_state, transition.to_state) == (CircuitState.CLOSED, CircuitState.OPEN)
    assert transition.generation == 1
    assert transition.reason == "daemon"


# -- the shared state table ---------------------------------------------------------------


def table_daemon(daemon: FakeDaemon, slots: int = 16) -> SharedStateTable:
    table = daemon.table = SharedStateTable(slots)
    return table


def test_a_trip_in_the_table_is_seen_without_any_push(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    client = make_client()
    breaker = CircuitBreaker("svc", daemon=client.path, min_calls=1)
    link = breaker._actor
    assert isinstance(link, RemoteBreaker)
    assert breaker.state is CircuitState.CLOSED  # the first use registers it
    assert client.state_table is not None
    assert client.state_table.slots == 16
    assert breaker.state is CircuitState.CLOSED
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    # The client's lock held: its IO thread could not apply a push even if one came.
    with client._lock:
        daemon.write_table(opened)
        assert breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitBreakerOpenError) as info:
            breaker.call_sync(ok_sync)
    assert info.value.retry_after is not None
    assert 29 < info.value.retry_after <= 30
    assert breaker.snapshot.generation == 1
    assert breaker.snapshot.open_until == opened.open_until


def test_a_push_older_than_the_table_is_ignored_and_a_current_one_fills_in(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    seen, got = record_transitions(link)
    reopened = Snapshot("svc", CircuitState.OPEN, 3, open_until=time.monotonic() + 30)
    daemon.write_table(reopened)
    assert link.snapshot.generation == 3
    # A push from before that state arrives late: the table's newer state stays.
    stale = Snapshot("svc", CircuitState.HALF_OPEN, 2)
    with daemon.cond:
        for peer in daemon.peers:
            peer.push(stale)
    daemon.push(dataclasses.replace(reopened, failure_rate=0.75, calls=4))
    assert got.wait(WAIT)
    wait_until(lambda: link.snapshot.failure_rate == 0.75)
    assert link.snapshot.state is CircuitState.OPEN
    assert link.snapshot.generation == 3
    assert [(t.from_state, t.to_state) for t in seen] == [(CircuitState.CLOSED, CircuitState.OPEN)]


def test_without_the_tables_descriptor_the_client_lives_on_pushes(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    daemon.table_fd_override = -1  # the welcome announces a table but brings no descriptor
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    assert link.remote
    assert client.state_table is None
    assert link._slot_words is None
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    daemon.push(opened)
    wait_until(lambda: link.snapshot == opened)


def sealed_memfd(data: bytes, seals: int) -> int:
    """A memfd holding ``data``, with ``seals`` added (what the daemon hands out, or not)."""
    fd = os.memfd_create("bogus", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


_TABLE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def refused_table(daemon: FakeDaemon, fd: int, make_client: Callable[..., DaemonClient]) -> str:
    """The warning a client logs when offered ``fd`` as the table; it lives on pushes."""
    daemon.table_fd_override = fd
    try:
        with structlog.testing.capture_logs() as logs:
            client = make_client()
            link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    finally:
        os.close(fd)
    assert link.remote
    assert client.state_table is None
    assert link._slot_words is None
    (warning,) = [e for e in logs if e["event"] == "state_table_unusable"]
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    daemon.push(opened)
    wait_until(lambda: link.snapshot == opened)
    error: str = warning["error"]
    return error


def test_a_descriptor_that_is_not_a_table_is_refused_with_a_warning(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    # Sealed like a table and of the announced size, but no header.
    fd = sealed_memfd(b"\0" * 16 * 32, _TABLE_SEALS)
    assert "magic" in refused_table(daemon, fd, make_client)


def test_a_table_that_could_change_size_or_be_written_is_refused(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient], tmp_path: Path
) -> None:
    table = table_daemon(daemon)
    # A copy of a real table (header and all), missing one seal at a time:
    # shrunk, it would kill the client with SIGBUS; written, it would lie.
    image = bytes(os.pread(table.reader_fd, 16 * 32, 0))
    for missing in (fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE):
        fd = sealed_memfd(image, _TABLE_SEALS & ~missing)
        assert "seal" in refused_table(daemon, fd, make_client)
    # A plain file cannot be sealed at all.
    plain = tmp_path / "plain"
    plain.write_bytes(image)
    assert "seal" in refused_table(daemon, os.open(plain, os.O_RDONLY), make_client)


def test_a_reconnected_client_reads_the_new_daemons_table(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    first = client.state_table
    assert first is not None
    daemon.write_table(Snapshot("svc", CircuitState.OPEN, 5, open_until=time.monotonic() + 30))
    assert link.snapshot.generation == 5
    old_table = daemon.table
    assert old_table is not None
    table_daemon(daemon)  # the next welcome brings a new table...
    with daemon.cond:
        daemon.states.clear()  # ...from a daemon whose breakers start over
    daemon.kill_peers()
    wait_until(lambda: client.epoch == 2 and link.remote)
    assert client.state_table is not None
    assert client.state_table is not first
    # The new daemon's breaker starts over at generation 0; only its table counts now.
    assert link.snapshot.generation == 0
    daemon.write_table(Snapshot("svc", CircuitState.FORCED_OPEN, 1))
    assert link.snapshot.state is CircuitState.FORCED_OPEN
    old_table.close()


def test_successes_travel_as_one_batch(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    client = make_client(flush_delay=3600.0)  # only flush() sends: one batch, on demand
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    for _ in range(200):
        assert link.post_success(0)
    assert link.post_report((0, Outcome.IGNORED, 0.5))
    assert daemon.batches == []
    client.flush()
    daemon.wait_for(lambda: len(daemon.batches) == 2)
    (_, counts), (_, others) = daemon.batches
    assert counts.successes == (("svc", 0, 200),)
    assert others.items == (Report("svc", 0, Outcome.IGNORED, 0.5),)


def test_batched_reports_leave_without_any_further_call(daemon: FakeDaemon, sock_path: str) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path)
    assert breaker.call_sync(ok_sync, 3) == 3
    # No flush(), no other call: the IO thread's timer sends it.
    daemon.wait_for(lambda: daemon.count("svc", Outcome.SUCCESS) == 1)
    ((_, batch),) = daemon.batches
    assert batch.successes == (("svc", 0, 1),)


def test_many_threads_every_success_counted_once(daemon: FakeDaemon, sock_path: str) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path)
    threads, calls = 8, 400

    def work() -> None:
        for i in range(calls):
            assert breaker.call_sync(ok_sync, i) == i

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work) for _ in range(threads)]:
            future.result(WAIT)
    daemon.wait_for(lambda: daemon.count("svc", Outcome.SUCCESS) >= threads * calls)
    assert daemon.count("svc", Outcome.SUCCESS) == threads * calls
    assert len(daemon.live_peers()) == 1  # one connection for the whole process


def test_failure_is_acked_and_read_back_at_once(daemon: FakeDaemon, sock_path: str) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path)
    with pytest.raises(Boom):
        breaker.call_sync(fail_sync)
    # The report was a request: its reply (the open snapshot) is already here.
    assert breaker.state is CircuitState.OPEN
    assert daemon.received(Report) == [Report("svc", 0, Outcome.FAILURE)]
    with pytest.raises(CircuitBreakerOpenError) as info:
        breaker.call_sync(ok_sync)
    assert info.value.retry_after is not None
    assert 0 < info.value.retry_after <= 30.0


async def test_async_calls_through_the_daemon(daemon: FakeDaemon, sock_path: str) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path, strict=True)

    async def ok() -> str:
        return "fine"

    async def fail() -> str:
        raise Boom("no")

    assert await breaker.call(ok) == "fine"
    assert daemon.received(Acquire) == [Acquire("svc")]  # strict: acquired from the daemon
    with pytest.raises(Boom):
        await breaker.call(fail)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        await breaker.call(ok)


def test_admin_and_status_go_to_the_daemon(daemon: FakeDaemon, sock_path: str) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path)
    assert breaker.force_open() is CircuitState.FORCED_OPEN
    assert daemon.received(Admin) == [Admin("svc", "force_open")]
    assert breaker.state is CircuitState.FORCED_OPEN
    assert breaker.status().snapshot.state is CircuitState.FORCED_OPEN


def test_config_conflicts_come_back_from_the_daemon(daemon: FakeDaemon, sock_path: str) -> None:
    daemon.conflicts["svc"] = ("timeout",)
    with structlog.testing.capture_logs() as logs:
        breaker = CircuitBreaker("svc", timeout=5.0, daemon=sock_path)
        assert breaker.config_conflicts == ("timeout",)  # read: it connects
    assert any(e["event"] == "breaker_config_conflict" for e in logs)


def test_a_refused_registration_raises(daemon: FakeDaemon, sock_path: str) -> None:
    def refuse(peer: Peer, message: RequestMessage) -> ResultMessage:
        raise InvalidRequestError("bad settings")

    daemon.answer = refuse  # type: ignore[method-assign]
    breaker = CircuitBreaker("svc", daemon=sock_path)  # connects on its first use
    for _ in range(2):  # and that use, like every later one, raises
        with pytest.raises(InvalidRequestError, match="bad settings"):
            breaker.call_sync(ok_sync)
    assert len(daemon.received(Register)) == 1  # refused once, not asked again


# -- a daemon that goes away ------------------------------------------------------------


def test_pending_requests_fail_at_once_when_the_daemon_drops(
    daemon: FakeDaemon, sock_path: str
) -> None:
    # daemon_timeout far off: only the dropped connection may end the wait.
    breaker = CircuitBreaker(
        "svc", daemon=sock_path, strict=True, on_unavailable="deny", daemon_timeout=60
    )
    daemon.hold.add(Acquire)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(breaker.call_sync, ok_sync)
        daemon.wait_for(lambda: len(daemon.held) == 1)
        assert not call.done()
        daemon.kill_peers()
        with pytest.raises(DaemonUnavailableError, match=sock_path):
            call.result(WAIT)


def test_a_request_in_flight_is_served_locally_when_the_daemon_drops(
    daemon: FakeDaemon, sock_path: str, system: ActorSystem
) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path, strict=True, system=system)
    daemon.hold.add(Acquire)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(breaker.call_sync, ok_sync, 7)
        daemon.wait_for(lambda: len(daemon.held) == 1)
        daemon.kill_peers()
        assert call.result(WAIT) == 7
    assert system.get("svc") is not None


def test_a_hung_daemon_times_out(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    client = make_client(request_timeout=0.2, backoff_min=60.0, backoff_max=60.0)
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), "deny", client=client)
    (peer,) = daemon.live_peers()
    daemon.hold.add(Acquire)
    with pytest.raises(DaemonUnavailableError, match=r"no reply within 0\.2s"):
        ask(link, Acquire("svc"))
    daemon.wait_for(lambda: peer.closed)  # the client hung up on it


def test_a_sync_call_waits_for_a_hung_daemon_only_daemon_timeout(
    daemon: FakeDaemon, sock_path: str, system: ActorSystem
) -> None:
    breaker = CircuitBreaker(
        "svc", min_calls=1, daemon=sock_path, system=system, daemon_timeout=0.05
    )
    assert breaker.state is CircuitState.CLOSED  # on the daemon
    daemon.hold.add(Report)  # it reads the failure and never answers
    started = time.monotonic()
    with pytest.raises(Boom):
        breaker.call_sync(fail_sync)
    # Well under request_timeout (5 s): the caller gave up after daemon_timeout,
    # the local breaker counted the failure (1 of min_calls=1) and shows it.
    assert time.monotonic() - started < 1.0
    assert breaker.state is CircuitState.OPEN
    local = system.get("svc")
    assert local is not None
    assert local.snapshot.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        breaker.call_sync(ok_sync)
    # The daemon answers again: the breaker is the daemon's once more.
    ((peer, msgid, message),) = daemon.held
    daemon.hold.clear()
    peer.respond(msgid, daemon.answer(peer, message))
    link = breaker._actor
    assert isinstance(link, RemoteBreaker)
    wait_until(lambda: link.remote)
    assert not link.client.stalled


async def test_an_async_call_waits_for_a_hung_daemon_only_daemon_timeout(
    daemon: FakeDaemon, sock_path: str, system: ActorSystem
) -> None:
    breaker = CircuitBreaker(
        "svc", daemon=sock_path, system=system, strict=True, daemon_timeout=0.05
    )
    assert breaker.state is CircuitState.CLOSED
    daemon.hold.add(Acquire)

    async def ok() -> int:
        return 7

    started = time.monotonic()
    assert await breaker.call(ok) == 7  # admitted by the local breaker
    assert time.monotonic() - started < 1.0
    local = system.get("svc")
    assert local is not None
    assert len(daemon.held) == 1  # the next call did not ask the stalled daemon
    assert await breaker.call(ok) == 7
    assert len(daemon.held) == 1


def test_a_trial_lease_granted_too_late_is_given_back(
    daemon: FakeDaemon, sock_path: str, system: ActorSystem
) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path, system=system, daemon_timeout=0.05)
    assert breaker.state is CircuitState.CLOSED
    daemon.push(Snapshot("svc", CircuitState.HALF_OPEN, 1))
    wait_until(lambda: breaker.state is CircuitState.HALF_OPEN)
    daemon.hold.add(Acquire)
    assert breaker.call_sync(ok_sync, 2) == 2  # the local breaker's call, not a trial
    ((peer, msgid, message),) = daemon.held
    peer.respond(msgid, daemon.answer(peer, message))  # lease 1, to nobody now
    released = daemon.wait_for(lambda: [r for r in daemon.received(Report) if r.lease == 1])
    assert [(r.outcome, r.generation) for r in released] == [(Outcome.CANCELLED, 1)]


def test_a_daemon_breaker_holds_no_connection_until_used(
    daemon: FakeDaemon, sock_path: str
) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path)
    assert not [t for t in threading.enumerate() if t.name.startswith("breakerd-client")]
    assert not daemon.live_peers()
    assert breaker.state is CircuitState.CLOSED  # a status read: it connects
    assert len(daemon.live_peers()) == 1
    assert daemon.received(Register) == [Register("svc", breaker.config.as_dict())]


def test_local_policy_without_a_daemon(sock_path: str, system: ActorSystem) -> None:
    with structlog.testing.capture_logs() as logs:
        breaker = CircuitBreaker("svc", min_calls=1, daemon=sock_path, system=system)
        client = get_client(sock_path)
        wait_until(lambda: client.attempts >= 3)  # it keeps trying in the background
    warnings = [e for e in logs if e["event"] == "daemon_unavailable"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert breaker.state is CircuitState.CLOSED
    assert breaker.call_sync(ok_sync, 2) == 2
    for _ in range(2):  # 2 failures in 3 calls: over the 0.5 threshold
        with pytest.raises(Boom):
            breaker.call_sync(fail_sync)
    # The embedded fallback counted them and opened.
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        breaker.call_sync(ok_sync)
    local = system.get("svc")
    assert local is not None
    assert local.snapshot.state is CircuitState.OPEN


def test_allow_policy_fails_open(sock_path: str) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, daemon=sock_path, on_unavailable="allow")
    for _ in range(5):
        with pytest.raises(Boom):
            breaker.call_sync(fail_sync)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.call_sync(ok_sync, 4) == 4
    strict = CircuitBreaker("svc2", daemon=sock_path, on_unavailable="allow", strict=True)
    assert strict.call_sync(ok_sync, 5) == 5


async def test_deny_policy_fails_closed(sock_path: str) -> None:
    breaker = CircuitBreaker(
        "svc", daemon=sock_path, on_unavailable="deny", fallback=lambda: "fallback"
    )
    with pytest.raises(DaemonUnavailableError) as info:
        breaker.call_sync(ok_sync)
    message = str(info.value)
    assert sock_path in message
    assert "deny" in message

    async def ok() -> int:
        return 1

    with pytest.raises(DaemonUnavailableError):
        await breaker.call(ok)
    with pytest.raises(DaemonUnavailableError):
        breaker.status()


def test_reconnects_reregisters_and_switches_back(
    daemon: FakeDaemon, sock_path: str, system: ActorSystem
) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path, system=system)
    link = breaker._actor
    assert isinstance(link, RemoteBreaker)
    link.ensure_started()
    assert link.remote
    seen: list[Transition] = []
    breaker.on_transition(seen.append)
    daemon.push(Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30))
    wait_until(lambda: breaker.state is CircuitState.OPEN)

    daemon.stop()
    wait_until(lambda: not link.remote)
    # The local fallback is closed: the switch is a transition too.
    assert breaker.state is CircuitState.CLOSED
    assert breaker.call_sync(ok_sync, 1) == 1
    assert breaker.snapshot.generation >= LOCAL_GENERATION_OFFSET

    again = FakeDaemon(sock_path).start()
    try:
        wait_until(lambda: link.remote)
        assert again.received(Register) == [Register("svc", breaker.config.as_dict())]
        assert breaker.state is CircuitState.CLOSED
        assert breaker.snapshot.generation == 0
        assert breaker.call_sync(ok_sync, 2) == 2
        again.wait_for(lambda: again.count("svc", Outcome.SUCCESS) == 1)
    finally:
        again.stop()
    assert [(t.from_state, t.to_state, t.reason) for t in seen[:2]] == [
        (CircuitState.CLOSED, CircuitState.OPEN, "daemon"),
        (CircuitState.OPEN, CircuitState.CLOSED, "daemon_unavailable"),
    ]


def test_an_outcome_goes_back_to_the_breaker_that_admitted_it(
    daemon: FakeDaemon, sock_path: str, system: ActorSystem
) -> None:
    # Admitted by the daemon, reported after it died: the local breaker counts it.
    breaker = CircuitBreaker("svc", min_calls=1, daemon=sock_path, system=system)
    gate, release = threading.Event(), threading.Event()

    def slow_failure() -> int:
        gate.set()
        assert release.wait(WAIT)
        raise Boom("late")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(breaker.call_sync, slow_failure)
        assert gate.wait(WAIT)
        daemon.stop()
        link = breaker._actor
        assert isinstance(link, RemoteBreaker)
        wait_until(lambda: not link.remote)
        release.set()
        with pytest.raises(Boom):
            call.result(WAIT)
    local = system.get("svc")
    assert local is not None
    # The failure reached nobody else: it trips the fallback (1 of min_calls=1).
    assert local.snapshot.state is CircuitState.OPEN


def test_a_local_outcome_stays_local_when_the_daemon_comes_back(
    sock_path: str, system: ActorSystem
) -> None:
    # Admitted by the local fallback, reported once the daemon is back: it
    # belongs to the local breaker, whose generations the daemon never had.
    breaker = CircuitBreaker("svc", min_calls=1, daemon=sock_path, system=system)
    link = breaker._actor
    assert isinstance(link, RemoteBreaker)
    assert not link.remote
    gate, release = threading.Event(), threading.Event()

    def slow_failure() -> int:
        gate.set()
        assert release.wait(WAIT)
        raise Boom("late")

    daemon = None
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(breaker.call_sync, slow_failure)
            assert gate.wait(WAIT)
            daemon = FakeDaemon(sock_path).start()
            wait_until(lambda: link.remote)
            release.set()
            with pytest.raises(Boom):
                call.result(WAIT)
        local = system.get("svc")
        assert local is not None
        assert local.snapshot.state is CircuitState.OPEN
        assert daemon.received(Report) == []
        assert breaker.state is CircuitState.CLOSED  # the daemon's view
    finally:
        if daemon is not None:
            daemon.stop()


# -- the reader baton: sync callers read their own replies -----------------------------


class ReadSpy:
    """Which threads fed the client's core (``DaemonClient._read_socket``), and how often."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[int] = []
        read = DaemonClient._read_socket

        def spy(client: DaemonClient, fd: int) -> str | None:
            self.threads.append(threading.get_ident())
            return read(client, fd)

        monkeypatch.setattr(DaemonClient, "_read_socket", spy)


def caller_reading(client: DaemonClient) -> int:
    """Wait until a caller (not the IO thread) holds the reader baton; its thread id."""
    io_thread = client._thread.ident

    def reading() -> int:
        ident = client._reader_ident
        return ident if ident is not None and ident != io_thread else 0

    return wait_until(reading)


def waiter_and_reader(
    daemon: FakeDaemon, link: RemoteBreaker, pool: concurrent.futures.ThreadPoolExecutor
) -> tuple[concurrent.futures.Future[Any], concurrent.futures.Future[Any], int]:
    """Two acquires the daemon holds: one waiting for its reply, one reading the socket.

    Returns both futures and the reading caller's thread id.
    """
    other = pool.submit(ask, link, Acquire("svc"))
    daemon.wait_for(lambda: len(daemon.held) == 1)
    reader = pool.submit(link.ask_sync, Acquire("svc"))
    daemon.wait_for(lambda: len(daemon.held) == 2)
    return other, reader, caller_reading(link.client)


def baton_free(client: DaemonClient) -> None:
    """Wait until nobody reads (the IO thread may still be running the last callbacks)."""
    wait_until(lambda: client._reader_ident is None)


def numbered_admissions(daemon: FakeDaemon) -> None:
    """Answer every ``Acquire`` with lease = its rank among that breaker's acquires (1, 2...)."""
    answer = daemon.answer
    served: dict[str, int] = {}

    def numbered(peer: Peer, message: RequestMessage) -> ResultMessage:
        if isinstance(message, Acquire):
            with daemon.cond:
                rank = served[message.name] = served.get(message.name, 0) + 1
                snapshot = daemon.states[message.name]
            return Admission(True, snapshot.generation, rank, snapshot)
        return answer(peer, message)

    daemon.answer = numbered  # type: ignore[method-assign]


def test_a_sync_caller_reads_its_own_reply(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    spy = ReadSpy(monkeypatch)
    for _ in range(50):
        assert link.ask_sync(Acquire("svc")).admitted
    # Every reply was read by the caller: none went through the IO thread.
    assert spy.threads == [threading.get_ident()] * 50
    baton_free(client)  # given back, not leaked
    # With the baton free again, the IO thread still reads what nobody asked for.
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    daemon.push(opened)
    wait_until(lambda: link.snapshot == opened)
    assert spy.threads[-1] == client._thread.ident


def test_many_threads_reading_for_each_other_each_get_their_own_replies(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    threads, calls = 8, 300
    numbered_admissions(daemon)
    client = make_client()
    links = [
        RemoteBreaker.open(client.path, f"svc{t}", BreakerConfig(), client=client)
        for t in range(threads)
    ]
    spy = ReadSpy(monkeypatch)
    start = threading.Barrier(threads)

    def work(link: RemoteBreaker) -> list[int]:
        start.wait(WAIT)
        leases = []
        for _ in range(calls):
            admission = link.ask_sync(Acquire(link.name))
            assert admission.snapshot.name == link.name  # a reply meant for this breaker
            leases.append(admission.lease)
        return leases

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(work, links))
    # Each caller got its own replies, in order, whichever thread read them.
    assert results == [list(range(1, calls + 1))] * threads
    assert client.core.pending == 0
    readers = set(spy.threads)
    assert readers - {client._thread.ident}, "no caller ever read for itself"
    baton_free(client)  # given back, not leaked
    # After all those hand-overs the socket is still watched: a push gets through.
    for t, link in enumerate(links):
        opened = Snapshot(link.name, CircuitState.OPEN, 1 + t, open_until=time.monotonic() + 30)
        daemon.push(opened)
        wait_until(lambda: link.snapshot == opened)  # noqa: B023 - waited on at once


def test_strict_calls_from_many_threads_are_all_counted(daemon: FakeDaemon, sock_path: str) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path, strict=True)
    threads, calls = 8, 200

    def work(t: int) -> list[int]:
        return [breaker.call_sync(ok_sync, t * calls + i) for i in range(calls)]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(work, range(threads)))
    assert results == [list(range(t * calls, (t + 1) * calls)) for t in range(threads)]
    acquires = daemon.received(Acquire)
    assert len(acquires) == threads * calls
    daemon.wait_for(lambda: daemon.count("svc", Outcome.SUCCESS) == threads * calls)
    # Most successes rode on the next acquire rather than in a frame of their own.
    assert sum(a.successes for a in acquires) > calls


def test_a_strict_callers_success_rides_on_its_next_acquire(
    daemon: FakeDaemon, sock_path: str
) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path, strict=True)
    for value in range(5):
        assert breaker.call_sync(ok_sync, value) == value
    acquires = daemon.received(Acquire)
    assert [(a.successes, a.successes_generation) for a in acquires] == [(0, 0)] + [(1, 0)] * 4
    assert not [b for _, b in daemon.batches if b.successes]  # no frame of their own
    breaker._actor.client.flush()  # type: ignore[attr-defined]
    daemon.wait_for(lambda: daemon.count("svc", Outcome.SUCCESS) == 5)


async def test_async_and_sync_strict_callers_share_the_connection(
    daemon: FakeDaemon, sock_path: str
) -> None:
    numbered_admissions(daemon)
    # A fake daemon in this process's threads, loaded on purpose, may well take
    # longer than the default daemon_timeout (0.25 s) to answer: every call
    # here must go to it, never to the fallback.
    breaker = CircuitBreaker("svc", daemon=sock_path, strict=True, daemon_timeout=60.0)
    mixed = CircuitBreaker("sync", daemon=sock_path, strict=True, daemon_timeout=60.0)
    async_link, sync_link = breaker._actor, mixed._actor
    assert isinstance(async_link, RemoteBreaker)
    assert isinstance(sync_link, RemoteBreaker)
    loop = asyncio.get_running_loop()
    threads, calls = 4, 150
    stop = threading.Event()

    def sync_work() -> int:
        done = 0
        while not stop.is_set() or done < calls:
            assert mixed.call_sync(ok_sync, done) == done
            done += 1
        return done

    async def ask_async(message: object) -> Any:
        future: asyncio.Future[Any] = loop.create_future()

        def reply(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(
                lambda: future.set_exception(error) if error else future.set_result(result)
            )

        async_link.ask(message, reply)
        return await future

    async def ok(value: int) -> int:
        return value

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        workers = [pool.submit(sync_work) for _ in range(threads)]
        # Async replies are read by whichever thread holds the baton: the IO
        # thread or a sync caller reading for itself.
        admissions = await asyncio.gather(*(ask_async(Acquire("svc")) for _ in range(calls)))
        results = await asyncio.gather(*(breaker.call(ok, i) for i in range(calls)))
        stop.set()
        synced = sum(await asyncio.gather(*(asyncio.wrap_future(w) for w in workers)))
    assert sorted(a.lease for a in admissions) == list(range(1, calls + 1))
    assert results == list(range(calls))
    assert len([m for m in daemon.received(Acquire) if m.name == "svc"]) == 2 * calls
    assert len([m for m in daemon.received(Acquire) if m.name == "sync"]) == synced
    daemon.wait_for(lambda: daemon.count("sync", Outcome.SUCCESS) == synced)
    daemon.wait_for(lambda: daemon.count("svc", Outcome.SUCCESS) == calls)


def test_a_reader_fails_at_once_when_the_daemon_drops(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    # A long request timeout: only the dropped connection can end the wait.
    client = make_client(request_timeout=120.0)
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), "deny", client=client)
    baton_free(client)
    daemon.hold.add(Acquire)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(link.ask_sync, Acquire("svc"))
        daemon.wait_for(lambda: len(daemon.held) == 1)
        caller_reading(client)  # the caller holds the baton
        started = time.monotonic()
        daemon.kill_peers()
        with pytest.raises(DaemonUnavailableError, match="closed the connection"):
            call.result(WAIT)
    assert time.monotonic() - started < WAIT
    baton_free(client)  # given back, not leaked
    # The IO thread reconnects, and callers read for themselves again.
    daemon.hold.clear()
    wait_until(lambda: link.remote)
    assert link.ask_sync(Acquire("svc")).admitted


def test_a_reader_of_a_hung_daemon_times_out(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    client = make_client(request_timeout=0.2, backoff_min=60.0, backoff_max=60.0)
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), "deny", client=client)
    (peer,) = daemon.live_peers()
    daemon.hold.add(Acquire)
    with pytest.raises(DaemonUnavailableError, match=r"no reply within 0\.2s"):
        link.ask_sync(Acquire("svc"))
    daemon.wait_for(lambda: peer.closed)
    baton_free(client)  # given back, not leaked


def test_closing_the_client_ends_a_readers_wait(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    client = make_client(request_timeout=120.0)
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), "deny", client=client)
    baton_free(client)
    daemon.hold.add(Acquire)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(link.ask_sync, Acquire("svc"))
        caller_reading(client)
        client.close()
        with pytest.raises(DaemonUnavailableError, match="on_unavailable='deny'"):
            call.result(WAIT)
    assert not client._thread.is_alive()


def test_a_callback_run_by_a_reader_cannot_wait_for_a_reply(
    daemon: FakeDaemon, sock_path: str
) -> None:
    waiting = CircuitBreaker("waiting", daemon=sock_path, strict=True)
    watched = CircuitBreaker("watched", daemon=sock_path, strict=True)
    client = get_client(sock_path)
    seen: list[tuple[int, BaseException | None]] = []

    def on_transition(transition: Transition) -> None:
        try:
            waiting.call_sync(ok_sync)  # closed and strict: it needs the daemon's answer
        except BaseException as exc:  # recorded for the test
            seen.append((threading.get_ident(), exc))
        else:
            seen.append((threading.get_ident(), None))

    watched.on_transition(on_transition)
    baton_free(client)
    daemon.hold.add(Acquire)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(waiting.call_sync, ok_sync, 4)
        (held,) = daemon.wait_for(lambda: list(daemon.held))
        reader = caller_reading(client)
        # The push reaches the reader: it runs the callback in its own thread,
        # where waiting for a reply would wait for itself.
        daemon.push(Snapshot("watched", CircuitState.OPEN, 1, open_until=time.monotonic() + 30))
        wait_until(lambda: seen)
        peer, msgid, _ = held
        peer.respond(msgid, Admission(True, 0, 0, daemon.states["waiting"]))
        assert call.result(WAIT) == 4
    ((thread, error),) = seen
    assert thread == reader
    assert isinstance(error, RuntimeError)
    assert "cannot wait for its own actor thread" in str(error)


def test_a_reader_interrupted_while_reading_drops_the_connection_not_the_replies(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(request_timeout=120.0)
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), "deny", client=client)
    baton_free(client)
    daemon.hold.add(Acquire)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # B waits for its reply without reading; A reads, and is interrupted
        # (as by Ctrl-C in the main thread) just after the core took B's reply
        # out of the pending table, before handing it over.
        other, reader, reader_ident = waiter_and_reader(daemon, link, pool)
        response = ClientCore._response

        def interrupted(core: ClientCore, event: Any, actions: list[Any]) -> None:
            response(core, event, actions)
            if threading.get_ident() == reader_ident:
                raise KeyboardInterrupt

        monkeypatch.setattr(ClientCore, "_response", interrupted)
        (peer, msgid, _), _ = daemon.held
        peer.respond(msgid, Admission(True, 0, 7, daemon.states["svc"]))
        with pytest.raises(KeyboardInterrupt):
            reader.result(WAIT)
        # B still gets the daemon's answer: the connection was dropped, and
        # the IO thread delivered what the interrupted reader had decoded.
        assert other.result(WAIT).lease == 7
    assert client._reader_ident != reader_ident
    baton_free(client)  # given back, not leaked
    wait_until(lambda: link.remote)  # reconnected
    monkeypatch.setattr(ClientCore, "_response", response)
    daemon.hold.clear()
    assert link.ask_sync(Acquire("svc")).admitted


def test_a_reader_interrupted_while_dispatching_still_delivers_the_others(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    client = make_client(request_timeout=120.0)
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), "deny", client=client)
    baton_free(client)
    daemon.hold.add(Acquire)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        other, reader, reader_ident = waiter_and_reader(daemon, link, pool)

        def listener(transition: Transition, snapshot: Snapshot) -> None:
            if threading.get_ident() == reader_ident:
                raise KeyboardInterrupt  # as a signal handler would, mid-dispatch

        link.listeners.append(listener)
        (peer, msgid, _), _ = daemon.held
        opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
        # One write: the reader gets the push and B's reply in one read.
        with peer.lock:
            peer._send(
                peer.conn.send_notification(StatePush(opened))
                + peer.conn.send_response(msgid, Admission(True, 0, 8, opened))
            )
        with pytest.raises(KeyboardInterrupt):
            reader.result(WAIT)
        assert other.result(WAIT).lease == 8
    assert client._reader_ident != reader_ident
    baton_free(client)  # given back, not leaked
    assert link.snapshot == opened


# -- fork and exit --------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_its_own_connection(daemon: FakeDaemon, sock_path: str) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path)
    assert breaker.call_sync(ok_sync) == 1
    (parent_peer,) = daemon.live_peers()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            if breaker.call_sync(ok_sync, 5) == 5 and breaker.status().snapshot.name == "svc":
                code = 0
        finally:
            os.write(write_end, bytes([code]))
            os._exit(code)
    os.close(write_end)
    verdict = os.read(read_end, 1)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert verdict == b"\x00"
    assert os.waitstatus_to_exitcode(status) == 0
    child_peers = [p for p in daemon.peers if p is not parent_peer]
    assert len(child_peers) == 1
    child = child_peers[0]
    assert child.cred_pid == pid != parent_peer.cred_pid
    assert child.hello is not None
    assert child.hello.pid == pid
    assert parent_peer.hello is not None
    assert parent_peer.hello.pid == os.getpid()
    daemon.wait_for(lambda: child.closed)  # the child's exit closed only its own
    # The parent's connection is untouched and still answers.
    assert not parent_peer.closed
    assert breaker.status().snapshot.name == "svc"
    assert len(daemon.live_peers()) == 1


def test_reports_are_flushed_at_exit(daemon: FakeDaemon, sock_path: str) -> None:
    script = (
        "import breakerd.clients._remote as remote\n"
        "remote.FLUSH_DELAY = 3600.0  # only the exit hook can send it now\n"
        "from breakerd.clients import CircuitBreaker\n"
        f"breaker = CircuitBreaker('exiting', daemon={sock_path!r})\n"
        "breaker._actor.ensure_started()\n"
        "assert breaker._actor.remote\n"
        "for _ in range(3):\n"
        "    breaker.call_sync(int)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert done.returncode == 0, done.stderr
    daemon.wait_for(lambda: daemon.count("exiting", Outcome.SUCCESS) == 3)


# -- arguments ---------------------------------------------------------------------------


def test_daemon_arguments_are_checked(sock_path: str) -> None:
    with pytest.raises(ValueError, match="on_unavailable"):
        CircuitBreaker("svc", daemon=sock_path, on_unavailable="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only applies in daemon mode"):
        CircuitBreaker("svc", on_unavailable="deny")
    with pytest.raises(TypeError, match="daemon must be"):
        CircuitBreaker("svc", daemon=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most 107"):
        CircuitBreaker("svc", daemon="/tmp/" + "x" * 120)
    with pytest.raises(ValueError, match="empty"):
        CircuitBreaker("svc", daemon="")
    with pytest.raises(ValueError, match=r"time\.monotonic"):
        CircuitBreaker("svc", daemon=sock_path, system=ActorSystem(clock=FakeClock()))


def test_daemon_true_uses_the_default_socket(
    daemon: FakeDaemon, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BREAKERD_SOCKET", sock_path)
    breaker = CircuitBreaker("svc", daemon=True)
    assert breaker.daemon_path == sock_path
    assert breaker.state is CircuitState.CLOSED  # the first use registers it
    assert daemon.received(Register) == [Register("svc", breaker.config.as_dict())]
    breaker_path = CircuitBreaker("svc", daemon=Path(sock_path))
    assert breaker_path.daemon_path == sock_path


# -- end to end: the real daemon ---------------------------------------------------------


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def _start_real_daemon(path: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "breakerd.actor.daemon", "--socket", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Readiness is the socket file (DESIGN.md): wait for it, not for time. A
    # socket left by a killed daemon is there already: wait until it answers.
    wait_until(lambda: _answers(path) or process.poll() is not None)
    assert process.poll() is None, "the daemon exited at start"
    return process


def test_against_the_real_daemon_killed_and_restarted(sock_path: str, system: ActorSystem) -> None:
    daemon = _start_real_daemon(sock_path)
    try:
        breaker = CircuitBreaker("e2e", min_calls=2, daemon=sock_path, system=system)
        link = breaker._actor
        assert isinstance(link, RemoteBreaker)
        link.ensure_started()
        assert link.remote
        for _ in range(50):
            breaker.call_sync(ok_sync)
        # status() is a request: the queued successes go out ahead of it.
        assert breaker.status().successes == 50
        other = CircuitBreaker("e2e-trip", min_calls=2, daemon=sock_path)
        for _ in range(2):
            with pytest.raises(Boom):
                other.call_sync(fail_sync)
        assert other.state is CircuitState.OPEN

        daemon.kill()
        daemon.wait()
        wait_until(lambda: not link.remote)
        assert breaker.call_sync(ok_sync, 9) == 9  # served by the local fallback

        # The killed daemon left its socket file: the new one must replace it.
        daemon = _start_real_daemon(sock_path)
        wait_until(lambda: link.remote)
        breaker.call_sync(ok_sync)
        # The new daemon carries on from the state file, which the killed one
        # wrote at the trip (the 50 successes were counted by then).
        assert breaker.status().successes == 51
    finally:
        daemon.terminate()
        assert daemon.wait(WAIT) == 0


def test_a_reader_fails_at_once_when_the_real_daemon_is_killed(sock_path: str) -> None:
    daemon = _start_real_daemon(sock_path)
    try:
        # daemon_timeout far off: this is about the reader's baton and the
        # EOF, and a caller that gave up at 0.25 s would have let go already.
        breaker = CircuitBreaker(
            "svc", daemon=sock_path, strict=True, on_unavailable="deny", daemon_timeout=60
        )
        assert breaker.call_sync(ok_sync, 1) == 1
        client = get_client(sock_path)
        baton_free(client)
        daemon.send_signal(signal.SIGSTOP)  # hung: the next acquire goes unanswered
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(breaker.call_sync, ok_sync, 2)
            caller_reading(client)  # the caller holds the baton
            started = time.monotonic()
            daemon.kill()
            with pytest.raises(DaemonUnavailableError):
                call.result(WAIT)
        # Well inside the request timeout: the EOF ended the wait, not the clock.
        assert time.monotonic() - started < client.request_timeout
        baton_free(client)  # given back, not leaked
    finally:
        daemon.kill()
        daemon.wait(WAIT)
