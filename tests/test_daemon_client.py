# Tests read `breaker.state` before and after calls that change it on another
# thread; mypy narrows the property after one assert and flags the next.
# mypy: disable-error-code="comparison-overlap"
"""The daemon transport (``_daemon_client.DaemonClient``): the reader baton, a daemon
that drops or hangs, fork and exit, and the real daemon killed under a reader.

Against the fake daemon (``fake_daemon``) and ``breakerd serve``: real Unix sockets
under /tmp, real processes; nothing sleeps to let time pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fake_daemon import (  # noqa: F401 - fixtures, found by pytest under their own names
    WAIT,
    Boom,
    FakeDaemon,
    MakeLink,
    Peer,
    ask,
    close_clients_after,
    fail_sync,
    fake_daemon,
    make_client_fixture,
    make_link_fixture,
    ok_sync,
    record_transitions,
    snap,
    sock_dir_fixture,
    sock_path_fixture,
    system_fixture,
    wait_until,
)

from breakerd.actor import ActorSystem, BreakerConfig, Transition
from breakerd.clients import CircuitBreaker, CircuitState, DaemonUnavailableError
from breakerd.clients._core import ClientCore
from breakerd.clients._daemon_client import DaemonClient
from breakerd.clients._daemon_socket import DaemonSocket
from breakerd.clients._globals import get_client
from breakerd.clients._link import RemoteBreaker
from breakerd.clients._reader import ReaderBaton
from breakerd.protocol import Acquire, Admission, Outcome, RequestMessage, Snapshot, StatePush
from breakerd.protocol._codec import ResultMessage

pytestmark = pytest.mark.anyio


def test_replies_out_of_order_over_the_socket(daemon: FakeDaemon, make_link: MakeLink) -> None:
    daemon.states["svc"] = snap("svc", CircuitState.HALF_OPEN, 1)
    link = make_link()
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


def test_a_hung_daemon_times_out(daemon: FakeDaemon, make_link: MakeLink) -> None:
    link = hung_link(daemon, make_link)
    (peer,) = daemon.live_peers()
    with pytest.raises(DaemonUnavailableError, match=r"no reply within 0\.2s"):
        ask(link, Acquire("svc"))
    daemon.wait_for(lambda: peer.closed)  # the client hung up on it


class ReadSpy:
    """Which threads read the client's socket (``ReaderBaton.read``), and how often."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[int] = []
        read = ReaderBaton.read

        def spy(baton: ReaderBaton, conn: DaemonSocket) -> str | None:
            self.threads.append(threading.get_ident())
            return read(baton, conn)

        monkeypatch.setattr(ReaderBaton, "read", spy)


def caller_reading(client: DaemonClient) -> int:
    """Wait until a caller (not the IO thread) holds the reader baton; its thread id."""
    io_thread = client._thread.ident

    def reading() -> int:
        ident = client._baton.holder
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
    wait_until(lambda: client._baton.holder is None)


def held_link(daemon: FakeDaemon, make_link: MakeLink) -> RemoteBreaker:
    """A "deny" link that nobody reads for, whose acquires the daemon holds.

    Its requests time out only after 120 s: only what a test does ends a wait.
    """
    link = make_link("deny", request_timeout=120.0)
    baton_free(link.client)
    daemon.hold.add(Acquire)
    return link


def hung_link(daemon: FakeDaemon, make_link: MakeLink) -> RemoteBreaker:
    """A "deny" link whose acquires the daemon holds, timed out after 0.2 s, never reconnected."""
    link = make_link("deny", request_timeout=0.2, backoff_min=60.0, backoff_max=60.0)
    daemon.hold.add(Acquire)
    return link


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
    daemon: FakeDaemon, make_link: MakeLink, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = make_link()
    client = link.client
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
    daemon: FakeDaemon, make_link: MakeLink
) -> None:
    # A long request timeout: only the dropped connection can end the wait.
    link = held_link(daemon, make_link)
    client = link.client
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


def test_a_reader_of_a_hung_daemon_times_out(daemon: FakeDaemon, make_link: MakeLink) -> None:
    link = hung_link(daemon, make_link)
    client = link.client
    (peer,) = daemon.live_peers()
    with pytest.raises(DaemonUnavailableError, match=r"no reply within 0\.2s"):
        link.ask_sync(Acquire("svc"))
    daemon.wait_for(lambda: peer.closed)
    baton_free(client)  # given back, not leaked


def test_closing_the_client_ends_a_readers_wait(daemon: FakeDaemon, make_link: MakeLink) -> None:
    link = held_link(daemon, make_link)
    client = link.client
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
    daemon: FakeDaemon, make_link: MakeLink, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = held_link(daemon, make_link)
    client = link.client
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
    assert client._baton.holder != reader_ident
    baton_free(client)  # given back, not leaked
    wait_until(lambda: link.remote)  # reconnected
    monkeypatch.setattr(ClientCore, "_response", response)
    daemon.hold.clear()
    assert link.ask_sync(Acquire("svc")).admitted


def test_a_reader_interrupted_while_dispatching_still_delivers_the_others(
    daemon: FakeDaemon, make_link: MakeLink
) -> None:
    link = held_link(daemon, make_link)
    client = link.client
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
    assert client._baton.holder != reader_ident
    baton_free(client)  # given back, not leaked
    assert link.snapshot == opened


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
        "import breakerd.clients._daemon_client as daemon_client\n"
        "daemon_client.FLUSH_DELAY = 3600.0  # only the exit hook can send it now\n"
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
