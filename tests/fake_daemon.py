"""A fake ``breakerd serve`` for the daemon-mode client tests, and their shared fixtures.

The fake daemon speaks the real protocol (``Connection("server")``) over real
Unix sockets under /tmp, one thread per peer. Nothing here sleeps to let time
pass: tests wait for socket events (a frame arriving, a connection closing)
with a timeout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from daemon_helpers import poll_until

from breakerd.actor import ActorSystem, BreakerConfig, Transition
from breakerd.actor.daemon._state_table import SharedStateTable
from breakerd.clients import CircuitState
from breakerd.clients._daemon_client import DaemonClient
from breakerd.clients._fallback import OnUnavailable
from breakerd.clients._globals import close_all_clients
from breakerd.clients._handle import BreakerHandle, future_reply
from breakerd.clients._link import RemoteBreaker
from breakerd.protocol import (
    NEED_DATA,
    Acquire,
    Admin,
    Admission,
    BreakerError,
    BreakerStatus,
    Connection,
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
    Snapshot,
    StatePush,
    Status,
    StatusRequest,
    UnknownBreakerError,
    Welcome,
    negotiate_version,
)
from breakerd.protocol._codec import ResultMessage

T = TypeVar("T")


WAIT = 10.0  # generous bound on a socket event; tests finish far sooner


def ok_sync(value: int = 1) -> int:
    return value


class Boom(Exception):
    pass


def fail_sync() -> int:
    raise Boom("upstream failed")


@contextlib.contextmanager
def failure_in_flight(call_sync: Callable[[Callable[[], int]], int]) -> Iterator[None]:
    """A call, in a thread of its own, that fails only after the block (``Boom("late")``).

    For an outcome reported after the daemon changed under a call in flight:
    the block runs while ``call_sync`` runs the function; after it, the
    function fails and so must the call.
    """
    started, release = threading.Event(), threading.Event()

    def slow_failure() -> int:
        started.set()
        assert release.wait(WAIT)
        raise Boom("late")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(call_sync, slow_failure)
        assert started.wait(WAIT)
        try:
            yield
        finally:
            release.set()
        with pytest.raises(Boom):
            call.result(WAIT)


def wait_until(predicate: Callable[[], T], timeout: float = WAIT) -> T:
    """Wait for a condition another thread or process makes true (not for time to pass)."""
    value = poll_until(predicate, timeout)
    if value is None:
        raise AssertionError("condition not reached in time")
    return value


def snap(name: str, state: CircuitState = CircuitState.CLOSED, generation: int = 0) -> Snapshot:
    return Snapshot(name, state, generation)


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


# -- fixtures (import them into a test module: pytest finds them by their names) -------


@pytest.fixture(name="sock_dir")
def sock_dir_fixture() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="bd")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="sock_path")
def sock_path_fixture(sock_dir: str) -> str:
    return os.path.join(sock_dir, "d.sock")


@pytest.fixture(name="daemon")
def fake_daemon(sock_path: str) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(sock_path).start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True, name="_close_clients")
def close_clients_after() -> Iterator[None]:
    yield
    close_all_clients()


@pytest.fixture(name="system")
def system_fixture() -> Iterator[ActorSystem]:
    with ActorSystem().running_in_thread() as running:
        yield running


@pytest.fixture(name="make_client")
def make_client_fixture(sock_path: str) -> Iterator[Callable[..., DaemonClient]]:
    clients: list[DaemonClient] = []

    def make(**kwargs: Any) -> DaemonClient:
        client = DaemonClient(sock_path, **kwargs).start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


#: ``make_link(on_unavailable="local", *, name="svc", config=BreakerConfig(), **client_options)``.
MakeLink = Callable[..., RemoteBreaker]


@pytest.fixture(name="make_link")
def make_link_fixture(make_client: Callable[..., DaemonClient]) -> MakeLink:
    """A link registered with the fake daemon, on a client of its own (``make_client``)."""

    def make(
        on_unavailable: OnUnavailable = "local",
        *,
        name: str = "svc",
        config: BreakerConfig | None = None,
        **client_options: Any,
    ) -> RemoteBreaker:
        client = make_client(**client_options)
        return RemoteBreaker.open(
            client.path, name, config or BreakerConfig(), on_unavailable, client=client
        )

    return make


# -- helpers ---------------------------------------------------------------------------


def ask(link: BreakerHandle, message: object) -> Any:
    """A blocking request through a handle (a link, a policy), as the facade's ``_request_sync``."""
    future, reply = future_reply()
    link.ask(message, reply)
    return future.result(WAIT)


def record_transitions(link: RemoteBreaker) -> tuple[list[Transition], threading.Event]:
    """The transitions ``link`` announces from now on, and an event set at each."""
    seen: list[Transition] = []
    got = threading.Event()

    def listener(transition: Transition, snapshot: Snapshot) -> None:
        seen.append(transition)
        got.set()

    link.listeners.append(listener)
    return seen, got
