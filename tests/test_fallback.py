# Tests read `breaker.state` before and after calls that change it on another
# thread; mypy narrows the property after one assert and flags the next.
# mypy: disable-error-code="comparison-overlap"
"""The ``on_unavailable`` policies (``_fallback``): a daemon that is gone, hung or slow.

Against the fake daemon (``fake_daemon``): real Unix sockets under /tmp, no sleeps.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator

import pytest
import structlog.testing
from fake_daemon import (  # noqa: F401 - fixtures, found by pytest under their own names
    WAIT,
    Boom,
    FakeDaemon,
    Peer,
    ask,
    close_clients_after,
    fail_sync,
    failure_in_flight,
    fake_daemon,
    make_client_fixture,
    ok_sync,
    record_transitions,
    snap,
    sock_dir_fixture,
    sock_path_fixture,
    system_fixture,
    wait_until,
)

from breakerd.actor import ActorSystem, BreakerConfig, Transition
from breakerd.clients import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    DaemonUnavailableError,
)
from breakerd.clients._daemon_client import DaemonClient
from breakerd.clients._fallback import (
    LOCAL_GENERATION_OFFSET,
    NO_GENERATION,
    AllowFallback,
    DenyFallback,
    make_fallback,
)
from breakerd.clients._globals import get_client
from breakerd.clients._handle import BreakerHandle
from breakerd.clients._link import RemoteBreaker
from breakerd.protocol import (
    Acquire,
    BreakerStatus,
    Outcome,
    Register,
    Report,
    Snapshot,
    StatusRequest,
)

pytestmark = pytest.mark.anyio


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
    with failure_in_flight(breaker.call_sync):
        daemon.stop()
        link = breaker._actor
        assert isinstance(link, RemoteBreaker)
        wait_until(lambda: not link.remote)
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
    daemon = None
    try:
        with failure_in_flight(breaker.call_sync):
            daemon = FakeDaemon(sock_path).start()
            wait_until(lambda: link.remote)
        local = system.get("svc")
        assert local is not None
        assert local.snapshot.state is CircuitState.OPEN
        assert daemon.received(Report) == []
        assert breaker.state is CircuitState.CLOSED  # the daemon's view
    finally:
        if daemon is not None:
            daemon.stop()


def local_status(link: RemoteBreaker) -> BreakerStatus:
    """The local fallback breaker's counts, after everything already in its inbox."""
    local = link.local_actor
    assert local is not None
    status: BreakerStatus = ask(local, StatusRequest(link.name))
    return status


def test_an_outcome_the_caller_gave_up_on_is_counted_once_when_the_connection_drops(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient], system: ActorSystem
) -> None:
    # The daemon reads the failure and never answers: after daemon_timeout the
    # local breaker counts it for the caller; at request_timeout the client
    # drops the hung connection, which fails the request. That failure must
    # not send the outcome to the local breaker a second time.
    client = make_client(request_timeout=0.3)
    link = RemoteBreaker.open(
        client.path, "svc", BreakerConfig(), "local", system, client=client, daemon_timeout=0.05
    )
    daemon.hold.add(Report)
    link.ask_sync(Report("svc", 0, Outcome.FAILURE))
    assert local_status(link).failures == 1
    # Dropped, and (a working connection) reconnected at once: the failed
    # request's reply ran before the new connection was made.
    wait_until(lambda: client.epoch == 2)
    assert local_status(link).failures == 1


# -- each policy is a full handle (``BreakerHandle``), driven through that protocol only --


@pytest.fixture(name="idle_client")
def idle_client_fixture(sock_path: str) -> Iterator[DaemonClient]:
    """A client never started: what a policy needs of it is its path and outage."""
    client = DaemonClient(sock_path)
    yield client
    client.close()


def test_allow_is_a_handle_that_admits_everything_and_counts_nothing(
    idle_client: DaemonClient,
) -> None:
    handle: BreakerHandle = AllowFallback("svc", idle_client)
    assert handle.admit() == NO_GENERATION
    assert handle.seen is handle.snapshot
    assert handle.snapshot.state is CircuitState.CLOSED
    admission = ask(handle, Acquire("svc"))
    assert (admission.admitted, admission.generation) == (True, NO_GENERATION)
    own = Report("svc", NO_GENERATION, Outcome.FAILURE, 0.1)
    assert ask(handle, own) is handle.snapshot  # its own outcome: counted nowhere
    assert handle.post_success(NO_GENERATION)
    assert handle.post_report((NO_GENERATION, Outcome.FAILURE, 0.1))
    handle.post_rejection()
    assert handle.listeners == []  # it never changes state
    assert handle.admit() == NO_GENERATION


def test_deny_is_a_handle_that_admits_nothing(idle_client: DaemonClient) -> None:
    handle: BreakerHandle = DenyFallback("svc", idle_client)
    assert handle.admit() is None
    assert handle.seen is handle.snapshot
    assert handle.seen.state is CircuitState.OPEN
    with pytest.raises(DaemonUnavailableError, match="fails closed"):
        ask(handle, Acquire("svc"))
    # An outcome the daemon admitted before it went away: nothing here counts it.
    assert ask(handle, Report("svc", 3, Outcome.FAILURE, 0.1)) is handle.snapshot
    with pytest.raises(DaemonUnavailableError):
        ask(handle, StatusRequest("svc"))
    handle.post_rejection(2)
    assert handle.listeners == []


def test_local_is_a_handle_on_an_in_process_breaker(
    idle_client: DaemonClient, system: ActorSystem
) -> None:
    handle: BreakerHandle = make_fallback(
        "local", "svc", idle_client, BreakerConfig(min_calls=1), system, noop
    )
    transitions: list[Transition] = []
    handle.listeners.append(lambda transition, snapshot: transitions.append(transition))
    generation = handle.admit()
    assert generation is not None
    assert generation >= LOCAL_GENERATION_OFFSET
    assert handle.seen.generation == handle.snapshot.generation == generation
    admission = ask(handle, Acquire("svc"))
    assert admission.admitted
    assert admission.generation == generation
    # Its own outcome (a shown generation) goes through ask like any request.
    opened = ask(handle, Report("svc", generation, Outcome.FAILURE, 0.1))
    assert opened.state is CircuitState.OPEN
    assert opened.generation > generation >= LOCAL_GENERATION_OFFSET
    wait_until(lambda: transitions)
    assert transitions[0].to_state is CircuitState.OPEN
    assert transitions[0].generation >= LOCAL_GENERATION_OFFSET
    assert handle.admit() is None
    assert handle.seen.state is CircuitState.OPEN
    assert handle.post_success(generation)  # an older generation's: for the totals only
    assert not ask(handle, Acquire("svc")).admitted
    handle.post_rejection()
    status = ask(handle, StatusRequest("svc"))
    assert status.snapshot.generation == handle.snapshot.generation


def noop(transition: Transition, snapshot: Snapshot) -> None:
    pass
