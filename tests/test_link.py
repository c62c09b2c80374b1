# Tests read `breaker.state` before and after calls that change it on another
# thread; mypy narrows the property after one assert and flags the next.
# mypy: disable-error-code="comparison-overlap"
"""One breaker's link to the daemon (``_link.RemoteBreaker``), through the facade and directly.

Against the fake daemon (``fake_daemon``): real Unix sockets under /tmp, no sleeps.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from pathlib import Path

import pytest
import structlog.testing
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

from breakerd.actor import ActorSystem, BreakerConfig
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState
from breakerd.protocol import (
    Acquire,
    Admin,
    Admission,
    BreakerStatus,
    InvalidRequestError,
    Outcome,
    Register,
    Report,
    RequestMessage,
    Snapshot,
    StatusRequest,
)
from breakerd.protocol._codec import ResultMessage

pytestmark = pytest.mark.anyio


def test_link_registers_and_answers_requests(daemon: FakeDaemon, make_link: MakeLink) -> None:
    daemon.states["svc"] = snap("svc", CircuitState.CLOSED, 5)
    link = make_link(config=BreakerConfig(min_calls=3))
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


def test_pushes_update_the_snapshot_and_fire_transitions(
    daemon: FakeDaemon, make_link: MakeLink
) -> None:
    link = make_link()
    seen, got = record_transitions(link)
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    daemon.push(opened)
    assert got.wait(WAIT)
    assert link.snapshot == opened
    (transition,) = seen
    assert (transition.from_state, transition.to_state) == (CircuitState.CLOSED, CircuitState.OPEN)
    assert transition.generation == 1
    assert transition.reason == "daemon"


def test_successes_travel_as_one_batch(daemon: FakeDaemon, make_link: MakeLink) -> None:
    link = make_link(flush_delay=3600.0)  # only flush() sends: one batch, on demand
    client = link.client
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


def test_a_daemon_breaker_holds_no_connection_until_used(
    daemon: FakeDaemon, sock_path: str
) -> None:
    breaker = CircuitBreaker("svc", daemon=sock_path)
    assert not [t for t in threading.enumerate() if t.name.startswith("breakerd-client")]
    assert not daemon.live_peers()
    assert breaker.state is CircuitState.CLOSED  # a status read: it connects
    assert len(daemon.live_peers()) == 1
    assert daemon.received(Register) == [Register("svc", breaker.config.as_dict())]


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
