# Tests read `breaker.state` before and after calls that change it on another
# thread; mypy narrows the property after one assert and flags the next.
# mypy: disable-error-code="comparison-overlap"
"""The books balance: a success that trips is seen at once, stale outcomes still
count in the totals, admin moves to the current state are no-ops, and a
half-open verdict reports the trials' own rates. Fake clock, real actor thread."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing
from daemon_helpers import DaemonProcess

from breakerd.actor import ActorSystem, BreakerConfig, Transition
from breakerd.actor._machine import Machine
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState, Outcome
from breakerd.clients._globals import close_all_clients

pytestmark = pytest.mark.anyio

TRIPS_ON_A_SUCCESS = {"failure_threshold": 0.5, "min_calls": 5, "window_size": 5}


class Boom(Exception):
    pass


def ok_sync() -> str:
    return "ok"


def fail_sync() -> str:
    raise Boom


async def ok() -> str:
    return "ok"


async def fail() -> str:
    raise Boom


# -- 1. a success that trips the breaker is seen by the next call --------------------------


def test_a_tripping_success_is_seen_by_the_next_sync_call(system: ActorSystem) -> None:
    breaker = CircuitBreaker("trip-sync", system=system, **TRIPS_ON_A_SUCCESS)  # type: ignore[arg-type]
    for func in (fail_sync, fail_sync, fail_sync):
        with pytest.raises(Boom):
            breaker.call_sync(func)
    assert breaker.call_sync(ok_sync) == "ok"
    assert breaker.call_sync(ok_sync) == "ok"  # 5 outcomes, 60% failures: opens
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        breaker.call_sync(ok_sync)


async def test_a_tripping_success_is_seen_by_the_next_async_call(system: ActorSystem) -> None:
    breaker = CircuitBreaker("trip-async", system=system, **TRIPS_ON_A_SUCCESS)  # type: ignore[arg-type]
    for func in (fail, fail, fail):
        with pytest.raises(Boom):
            await breaker.call(func)
    assert await breaker.call(ok) == "ok"
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        await breaker.call(ok)


def test_a_tripping_success_in_a_time_window(system: ActorSystem, clock: FakeClock) -> None:
    # Successes age out first: what is left is all failures, and the next
    # success (which brings the window back to min_calls) trips it.
    breaker = CircuitBreaker(
        "trip-time", system=system, min_calls=4, window_seconds=10, failure_threshold=0.5
    )
    for _ in range(4):
        breaker.call_sync(ok_sync)
    assert breaker.status().successes == 4  # applied now, not when the drain timer fires
    clock.advance(5)
    for _ in range(3):
        with pytest.raises(Boom):
            breaker.call_sync(fail_sync)  # 3 of 7: closed
    assert breaker.state is CircuitState.CLOSED
    clock.advance(6)  # the four successes leave the window; the failures stay
    assert breaker.call_sync(ok_sync) == "ok"  # 3 of 4 fail: opens
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        breaker.call_sync(ok_sync)


def test_plain_successes_that_cannot_trip_are_not_waited_for(system: ActorSystem) -> None:
    # The fast path stays fire-and-forget while no success can change the state.
    breaker = CircuitBreaker("fast", system=system, min_calls=5, window_size=5)
    assert breaker.snapshot.successes_safe
    for _ in range(20):
        breaker.call_sync(ok_sync)
    with pytest.raises(Boom):
        breaker.call_sync(fail_sync)  # 1 of 5: no success can trip it
    assert breaker.snapshot.successes_safe


def test_successes_safe_rule_in_the_machine() -> None:
    machine = Machine("m", BreakerConfig(min_calls=5, window_size=5))
    assert machine.snapshot().successes_safe
    for _ in range(3):
        machine.record(0, Outcome.FAILURE, 1.0)
    # Two more successes would make 3 of 5: a success can trip it.
    assert not machine.snapshot().successes_safe
    machine.record_successes(0, 1, 1.0)
    assert not machine.snapshot().successes_safe
    assert machine.record_successes(0, 1, 1.0)  # the tripping success
    assert machine.state is CircuitState.OPEN


def test_record_successes_matches_one_at_a_time() -> None:
    for count in range(1, 8):
        for failures in range(0, 5):
            bulk = Machine("b", BreakerConfig(min_calls=4, window_size=6))
            single = Machine("s", BreakerConfig(min_calls=4, window_size=6))
            for machine in (bulk, single):
                for _ in range(failures):
                    machine.record(machine.generation, Outcome.FAILURE, 1.0)
            generation = bulk.generation
            bulk.record_successes(generation, count, 1.0)
            for _ in range(count):
                single.record(generation, Outcome.SUCCESS, 1.0)
            assert (bulk.state, bulk.generation, bulk.window_calls, bulk.failure_rate()) == (
                single.state,
                single.generation,
                single.window_calls,
                single.failure_rate(),
            ), (count, failures)
            assert (bulk.successes, bulk.failures) == (single.successes, single.failures)


def test_record_successes_costs_nothing_per_count() -> None:
    # A count of 2**62 on a breaker below min_calls, disabled, or in a time
    # window must not loop 2**62 times.
    for config in (
        BreakerConfig(min_calls=5, window_size=5),
        BreakerConfig(min_calls=5, window_seconds=10),
    ):
        machine = Machine("big", config)
        machine.record_successes(0, 2**62, 1.0)
        assert machine.successes == 2**62
        assert machine.window_calls == (5 if config.window_seconds is None else 2**62)
    disabled = Machine("off", BreakerConfig())
    transition = disabled.disable(1.0)
    assert transition is not None
    disabled.record_successes(disabled.generation, 2**62, 1.0)
    assert disabled.successes == 2**62


# -- 2. stale outcomes count in the totals ---------------------------------------------


def test_a_failure_reported_after_the_trip_counts_in_the_totals() -> None:
    machine = Machine("m", BreakerConfig(min_calls=2, window_size=2))
    admitted = machine.generation
    machine.record(admitted, Outcome.FAILURE, 1.0)
    machine.record(admitted, Outcome.FAILURE, 1.0)
    assert machine.state is CircuitState.OPEN
    result = machine.record(admitted, Outcome.FAILURE, 1.0)  # a third, admitted before the trip
    assert not result.counted  # out of the window
    assert machine.failures == 3  # but in the books
    machine.record_successes(admitted, 2, 1.0)
    assert machine.successes == 2
    assert machine.record(admitted, Outcome.CANCELLED, 1.0).counted is False
    assert (machine.successes, machine.failures, machine.ignored) == (2, 3, 0)


def test_trials_cut_short_by_a_verdict_still_count() -> None:
    machine = Machine("m", BreakerConfig(min_calls=1, window_size=1, half_open_calls=2, timeout=1))
    machine.record(0, Outcome.FAILURE, 0.0)
    first = machine.acquire(1.0)
    second = machine.acquire(1.0)
    assert first.lease
    assert second.lease
    machine.record(first.generation, Outcome.FAILURE, 1.0, lease=first.lease)
    assert machine.state is CircuitState.HALF_OPEN  # one of two trials in
    machine.force_open(1.0)
    # The second trial ran against the upstream: it counts once, and only once.
    machine.record(second.generation, Outcome.SUCCESS, 1.0, lease=second.lease)
    machine.record(second.generation, Outcome.SUCCESS, 1.0, lease=second.lease)
    assert (machine.successes, machine.failures) == (1, 2)


async def test_status_totals_count_a_failure_reported_after_the_trip(
    system: ActorSystem,
) -> None:
    breaker = CircuitBreaker("books", min_calls=1, window_size=1, system=system)
    entered, go = asyncio.Event(), asyncio.Event()

    async def fails_late() -> None:
        entered.set()
        await go.wait()
        raise Boom

    task = asyncio.create_task(breaker.call(fails_late))
    await entered.wait()
    with pytest.raises(Boom):
        await breaker.call(fail)  # trips the breaker
    go.set()
    with pytest.raises(Boom):
        await task
    status = breaker.status()
    assert status.failures == 2
    assert breaker.state is CircuitState.OPEN


# -- 7. small semantic slips --------------------------------------------------------------


def test_a_half_open_verdict_reports_the_trials_slow_call_rate() -> None:
    machine = Machine(
        "slow",
        BreakerConfig(
            min_calls=1,
            window_size=1,
            half_open_calls=4,
            timeout=1,
            slow_call_duration=2.0,
            slow_call_threshold=0.5,
        ),
    )
    machine.record(0, Outcome.FAILURE, 0.0)
    leases = [machine.acquire(1.0) for _ in range(4)]
    transitions: tuple[Transition, ...] = ()
    for decision, duration in zip(leases, (5.0, 5.0, 5.0, 1.0), strict=True):
        transitions = machine.record(
            decision.generation, Outcome.SUCCESS, 2.0, duration=duration, lease=decision.lease
        ).transitions
    (reopened,) = transitions
    assert reopened.to_state is CircuitState.OPEN
    assert reopened.slow_call_rate == 0.75
    assert reopened.failure_rate == 0.0


def test_admin_move_to_the_current_state_is_a_no_op(system: ActorSystem) -> None:
    breaker = CircuitBreaker("admin-twice", system=system)
    seen: list[object] = []
    breaker.on_transition(seen.append)
    with structlog.testing.capture_logs() as logs:
        breaker.force_open()
        generation = breaker.snapshot.generation
        breaker.force_open()
        assert breaker.snapshot.generation == generation
        breaker.disable()
        generation = breaker.snapshot.generation
        breaker.disable()
        assert breaker.snapshot.generation == generation
    assert len(seen) == 2
    events = [entry["event"] for entry in logs if entry["event"].startswith("breaker_")]
    assert events == ["breaker_forced_open", "breaker_disabled"]


def test_machine_admin_moves_to_the_current_state_return_none() -> None:
    machine = Machine("m", BreakerConfig())
    assert machine.force_open(1.0) is not None
    assert machine.force_open(1.0) is None
    assert machine.disable(1.0) is not None
    assert machine.disable(1.0) is None
    assert machine.reset(1.0) is not None
    generation = machine.generation
    machine.record(generation, Outcome.FAILURE, 1.0)
    assert machine.reset(1.0) is None  # already closed: the window empties, no transition
    assert machine.generation == generation
    assert machine.window_calls == 0


# -- 1, daemon mode: the same rule through the socket, with and without the state table --


@pytest.fixture(params=["table", "pushes"])
def books_daemon(
    tmp_short: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[DaemonProcess, str]]:
    config = tmp_short / "d.toml"
    slots = 65_536 if request.param == "table" else 0
    config.write_text(f"[daemon]\nstate_table_slots = {slots}\n")
    process = DaemonProcess(tmp_short / "s.sock", config=config).wait_ready()
    yield process, request.param
    close_all_clients()
    process.kill()


def test_daemon_mode_a_tripping_success_is_seen_by_the_next_call(
    books_daemon: tuple[DaemonProcess, str],
) -> None:
    socket_path = str(books_daemon[0].socket_path)
    breaker = CircuitBreaker("trip-daemon", daemon=socket_path, **TRIPS_ON_A_SUCCESS)  # type: ignore[arg-type]
    assert breaker.status().snapshot.state is CircuitState.CLOSED  # registered with the daemon
    for func in (fail_sync, fail_sync, fail_sync):
        with pytest.raises(Boom):
            breaker.call_sync(func)
    assert not breaker.snapshot.successes_safe
    assert breaker.call_sync(ok_sync) == "ok"
    assert breaker.call_sync(ok_sync) == "ok"
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        breaker.call_sync(ok_sync)
    status = breaker.status()
    assert (status.successes, status.failures, status.rejections) == (2, 3, 1)


async def test_daemon_mode_a_tripping_success_async(
    books_daemon: tuple[DaemonProcess, str],
) -> None:
    socket_path = str(books_daemon[0].socket_path)
    breaker = CircuitBreaker("trip-daemon-async", daemon=socket_path, **TRIPS_ON_A_SUCCESS)  # type: ignore[arg-type]
    for func in (fail, fail, fail):
        with pytest.raises(Boom):
            await breaker.call(func)
    assert await breaker.call(ok) == "ok"
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        await breaker.call(ok)


OTHER_PROCESS = """
import sys, time
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError
name, socket_path, wait_for_push = sys.argv[1], sys.argv[2], sys.argv[3] == "pushes"
b = CircuitBreaker(name, daemon=socket_path, failure_threshold=0.5, min_calls=5, window_size=5)
b.status()
print("ready", flush=True)
sys.stdin.readline()
if wait_for_push:
    # Without a state table the news comes by push, read by the IO thread.
    deadline = time.monotonic() + 10
    while b.snapshot.successes_safe and time.monotonic() < deadline:
        time.sleep(0.001)
out = [b.call_sync(lambda: "ok"), b.call_sync(lambda: "ok")]
try:
    b.call_sync(lambda: "ok")
    out.append("admitted")
except CircuitBreakerOpenError:
    out.append("rejected")
print(" ".join(out), flush=True)
"""


def _line_from(process: subprocess.Popen[str], start: str) -> str:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(start):
            return line.strip()
    return ""


def test_daemon_mode_another_process_learns_successes_must_wait(
    books_daemon: tuple[DaemonProcess, str],
) -> None:
    # This process fails three times; another process, already connected,
    # then succeeds twice: its second success trips the breaker, and its
    # third call must be rejected. Through the state table it knows at once
    # that successes must now be acknowledged; without one, from a push.
    daemon, mode = books_daemon
    name = "trip-two"
    socket_path = str(daemon.socket_path)
    breaker = CircuitBreaker(name, daemon=socket_path, **TRIPS_ON_A_SUCCESS)  # type: ignore[arg-type]
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS, name, socket_path, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdin is not None
        assert _line_from(other, "ready") == "ready"
        for _ in range(3):
            with pytest.raises(Boom):
                breaker.call_sync(fail_sync)
        other.stdin.write("go\n")
        other.stdin.flush()
        assert _line_from(other, "ok").split() == ["ok", "ok", "rejected"]
    finally:
        other.kill()
        other.wait()


def test_a_cut_short_trial_is_settled_by_its_first_report() -> None:
    # Cancelled first, then reported again: the lease counts once at most.
    machine = Machine("m", BreakerConfig(min_calls=1, window_size=1, timeout=1))
    machine.record(0, Outcome.FAILURE, 0.0)
    trial = machine.acquire(1.0)
    assert trial.lease
    machine.force_open(1.0)
    machine.record(trial.generation, Outcome.CANCELLED, 1.0, lease=trial.lease)
    machine.record(trial.generation, Outcome.SUCCESS, 1.0, lease=trial.lease)
    assert (machine.successes, machine.failures) == (0, 1)
