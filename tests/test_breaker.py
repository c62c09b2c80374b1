# Tests read `breaker.state` before and after calls that change it on another
# thread; mypy narrows the property after one assert and flags the next.
# mypy: disable-error-code="comparison-overlap"
"""The embedded facade and its actor: fake clock, real actor thread, no sleeps.

Time passes only by ``clock.advance``; the actor thread is real, so tests
await its answers (events, futures), never a duration.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import anyio.lowlevel
import pytest
import structlog.testing

from breakerd.actor import ActorSystem, BreakerActor, BreakerConfig
from breakerd.actor.testing import FakeClock
from breakerd.clients import (
    BreakerError,
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    Outcome,
    RateLimited,
    Transition,
)
from breakerd.protocol import (
    ActorStoppedError,
    InboxFullError,
    Report,
    StatusRequest,
)

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


async def ok(value: int = 1) -> int:
    return value


async def fail() -> int:
    raise TimeoutError("upstream timed out")


def ok_sync(value: int = 1) -> int:
    return value


def fail_sync() -> int:
    raise Boom("nope")


async def outcomes(breaker: CircuitBreaker, funcs: list[Any]) -> list[str]:
    seen = []
    for func in funcs:
        try:
            result = await breaker.call(func)
            seen.append(f"ok:{result}")
        except CircuitBreakerOpenError:
            seen.append("rejected")
        except Exception as exc:
            seen.append(type(exc).__name__)
    return seen


async def test_original_scenario_trips_falls_back_and_recovers(
    system: ActorSystem, clock: FakeClock
) -> None:
    calls_reaching_service = 0

    async def service(prompt: str) -> str:
        nonlocal calls_reaching_service
        calls_reaching_service += 1
        if calls_reaching_service in (3, 4, 5):
            raise TimeoutError
        return f"answer to {prompt}"

    async def fallback(prompt: str) -> str:
        return f"fallback for {prompt}"

    breaker = CircuitBreaker(
        "LLM", failure_threshold=0.5, timeout=30, fallback=fallback, system=system
    )
    lines = []
    with structlog.testing.capture_logs() as logs:
        for i in range(10):
            if i == 7:
                clock.advance(30)
            try:
                lines.append(await breaker.call(service, f"p{i}"))
            except TimeoutError:
                lines.append("timeout")
    assert lines == [
        "answer to p0",
        "answer to p1",
        "timeout",
        "timeout",
        "timeout",
        "fallback for p5",
        "fallback for p6",
        "answer to p7",
        "answer to p8",
        "answer to p9",
    ]
    assert calls_reaching_service == 8
    assert breaker.state is CircuitState.CLOSED
    events = [entry["event"] for entry in logs if entry["event"].startswith("breaker_")]
    assert events == ["breaker_opened", "breaker_half_open", "breaker_closed"]
    opened = next(entry for entry in logs if entry["event"] == "breaker_opened")
    assert opened["failure_rate"] == 0.6
    assert opened["log_level"] == "error"
    assert opened["breaker"] == "LLM"


async def test_rejection_without_fallback_raises_with_retry_after(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, timeout=10, system=system)
    with pytest.raises(TimeoutError):
        await breaker.call(fail)
    # Read your own writes: the failure was acknowledged before it was raised.
    assert breaker.state is CircuitState.OPEN
    clock.advance(4)
    with pytest.raises(CircuitBreakerOpenError) as info:
        await breaker.call(ok)
    assert info.value.name == "svc"
    assert info.value.retry_after == pytest.approx(6.0)
    assert info.value.state == "open"


async def test_two_failures_of_five_do_not_open(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", system=system)
    seen = await outcomes(breaker, [ok, ok, ok, fail, fail])
    assert seen == ["ok:1", "ok:1", "ok:1", "TimeoutError", "TimeoutError"]
    assert breaker.state is CircuitState.CLOSED
    await outcomes(breaker, [fail])
    assert breaker.state is CircuitState.CLOSED  # 3 of 6 is 0.5: not greater than 0.5
    await outcomes(breaker, [fail])
    assert breaker.state is CircuitState.OPEN  # 4 of 7


async def test_closing_starts_with_an_empty_window(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("svc", min_calls=2, timeout=5, system=system)
    await outcomes(breaker, [fail, fail])
    assert breaker.state is CircuitState.OPEN
    clock.advance(5)
    assert await breaker.call(ok) == 1
    assert breaker.state is CircuitState.CLOSED
    # One failure after closing is 1 of 1 outcomes: below min_calls, stays closed.
    await outcomes(breaker, [fail])
    assert breaker.state is CircuitState.CLOSED
    assert breaker.status().snapshot.calls == 1


async def test_half_open_admits_exactly_the_trial_permits(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, timeout=5, half_open_calls=3, system=system)
    await outcomes(breaker, [fail])
    clock.advance(5)
    release = asyncio.Event()
    started = 0

    async def slow_trial() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "trial"

    tasks = [asyncio.create_task(breaker.call(slow_trial)) for _ in range(5)]
    # The rejected calls finish as soon as the actor answers; the trials wait.
    rejected: set[asyncio.Task[str]] = set()
    pending: set[asyncio.Task[str]] = set(tasks)
    while len(rejected) < 2:
        done, pending = await asyncio.wait(pending, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no call was rejected"
        rejected |= done
    assert started == 3
    assert len(rejected) == 2
    for task in rejected:
        assert isinstance(task.exception(), CircuitBreakerOpenError)
    release.set()
    results = [await t for t in tasks if t not in rejected]
    assert results == ["trial"] * 3
    assert breaker.state is CircuitState.CLOSED


async def test_cancelled_trial_releases_its_permit(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, timeout=5, system=system)
    await outcomes(breaker, [fail])
    clock.advance(5)
    entered = asyncio.Event()

    async def hang() -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(breaker.call(hang))
    await entered.wait()
    assert breaker.state is CircuitState.HALF_OPEN
    with pytest.raises(CircuitBreakerOpenError):
        await breaker.call(ok)  # the only trial permit is taken
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancelled trial gave its lease back without counting as a failure.
    assert await breaker.call(ok, 7) == 7
    assert breaker.state is CircuitState.CLOSED
    assert breaker.status().failures == 1  # only the original failure


async def test_cancellation_while_closed_records_nothing(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, system=system)
    entered = asyncio.Event()

    async def hang() -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(breaker.call(hang))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    status = breaker.status()
    assert (status.successes, status.failures, status.ignored) == (0, 0, 0)
    assert breaker.state is CircuitState.CLOSED


async def test_unreported_trial_lease_counts_as_failure(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, timeout=5, half_open_max_wait=10, system=system)
    await outcomes(breaker, [fail])
    clock.advance(5)
    entered = asyncio.Event()

    async def hang() -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(breaker.call(hang))
    await entered.wait()
    clock.advance(10)
    with pytest.raises(CircuitBreakerOpenError) as info:
        await breaker.call(ok)
    assert info.value.state == "open"
    assert breaker.state is CircuitState.OPEN
    assert breaker.status().failures == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_stale_report_after_a_transition_stays_out_of_the_window(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, system=system)
    entered, go = asyncio.Event(), asyncio.Event()

    async def fails_late() -> None:
        entered.set()
        await go.wait()
        raise Boom

    task = asyncio.create_task(breaker.call(fails_late))
    await entered.wait()
    breaker.force_open()
    breaker.reset()  # closed again, but a newer generation
    go.set()
    with pytest.raises(Boom):
        await task
    assert breaker.state is CircuitState.CLOSED
    status = breaker.status()
    assert status.snapshot.calls == 0  # out of the window
    assert status.failures == 1  # in the books: the call did fail


async def test_classification_rules(system: ActorSystem, clock: FakeClock) -> None:
    class ClientMistake(Exception):
        pass

    def classify(exc: BaseException) -> Outcome | RateLimited | None:
        if isinstance(exc, KeyError):
            return RateLimited(12.0)
        if isinstance(exc, ValueError):
            return Outcome.SUCCESS
        return None

    breaker = CircuitBreaker(
        "svc", min_calls=1, ignore=(ClientMistake,), classify=classify, system=system
    )

    async def raises(exc: Exception) -> None:
        raise exc

    for exc in (ClientMistake(), ValueError()):
        with pytest.raises(type(exc)):
            await breaker.call(raises, exc)
    assert breaker.state is CircuitState.CLOSED
    status = breaker.status()
    assert (status.ignored, status.successes, status.failures) == (1, 1, 0)
    now = clock()
    with pytest.raises(KeyError):
        await breaker.call(raises, KeyError("x"))
    assert breaker.state is CircuitState.OPEN
    assert breaker.snapshot.open_until == pytest.approx(now + 12.0)


async def test_record_limits_what_counts_as_failure(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, record=(Boom,), system=system)

    async def raises(exc: Exception) -> None:
        raise exc

    with pytest.raises(RuntimeError):
        await breaker.call(raises, RuntimeError())
    assert breaker.state is CircuitState.CLOSED
    with pytest.raises(Boom):
        await breaker.call(raises, Boom())
    assert breaker.state is CircuitState.OPEN


async def test_admin_operations(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, system=system)
    assert breaker.force_open() is CircuitState.FORCED_OPEN
    with pytest.raises(CircuitBreakerOpenError) as info:
        await breaker.call(ok)
    assert info.value.state == "forced_open"
    assert info.value.retry_after is None
    with pytest.raises(CircuitBreakerOpenError):
        breaker.call_sync(ok_sync)
    assert breaker.disable() is CircuitState.DISABLED
    await outcomes(breaker, [fail, fail, fail])
    assert breaker.state is CircuitState.DISABLED  # records nothing
    assert breaker.reset() is CircuitState.CLOSED
    await outcomes(breaker, [fail])
    assert breaker.state is CircuitState.OPEN
    assert breaker.status().rejections == 2


def test_call_sync_from_eight_threads_counts_exactly(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", min_calls=100_000, window_size=100_000, system=system)
    per_thread = 2_000
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            try:
                if index % 2 and i % 10 == 0:
                    breaker.call_sync(fail_sync)
                else:
                    breaker.call_sync(ok_sync)
            except Boom:
                pass
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    status = breaker.status()  # FIFO: every earlier report is applied first
    failures = 4 * (per_thread // 10)
    assert status.failures == failures
    assert status.successes == 8 * per_thread - failures
    assert breaker.state is CircuitState.CLOSED


def test_call_sync_works_without_an_event_loop(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("svc", min_calls=2, timeout=3, system=system, fallback=lambda x: -x)
    assert breaker.call_sync(ok_sync, 5) == 5
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call_sync(fail_sync)
    assert breaker.state is CircuitState.OPEN
    assert breaker.call_sync(ok_sync, 5) == -5
    clock.advance(3)
    assert breaker.call_sync(ok_sync, 5) == 5
    assert breaker.state is CircuitState.CLOSED


def test_call_sync_refuses_an_async_fallback(system: ActorSystem) -> None:
    async def fallback() -> int:
        return 0

    breaker = CircuitBreaker("svc", system=system, fallback=fallback)
    breaker.force_open()
    with pytest.raises(TypeError, match="call_sync"):
        breaker.call_sync(ok_sync)


async def test_sync_fallback_in_async_call(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", system=system, fallback=lambda value=1: value * 100)
    breaker.force_open()
    assert await breaker.call(ok, 3) == 300


async def test_decorator_on_sync_and_async_functions(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, failure_threshold=0.3, system=system)

    @breaker
    async def async_double(x: int) -> int:
        return 2 * x

    @breaker
    def sync_triple(x: int) -> int:
        if x < 0:
            raise Boom
        return 3 * x

    assert async_double.__name__ == "async_double"
    assert await async_double(4) == 8
    assert sync_triple(4) == 12
    with pytest.raises(Boom):
        sync_triple(-1)
    with pytest.raises(CircuitBreakerOpenError):
        await async_double(1)


async def test_same_name_shares_one_actor_and_first_config_wins(system: ActorSystem) -> None:
    first = CircuitBreaker("shared", min_calls=1, system=system)
    with structlog.testing.capture_logs() as logs:
        second = CircuitBreaker("shared", min_calls=9, timeout=1.0, system=system)
    assert second.config_conflicts == ("timeout", "min_calls")
    assert any(entry["event"] == "breaker_config_conflict" for entry in logs)
    with pytest.raises(TimeoutError):
        await second.call(fail)
    # min_calls=1 (the first registration) applies to both proxies.
    assert first.state is CircuitState.OPEN
    assert second.state is CircuitState.OPEN


async def test_transition_observers(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("svc", min_calls=1, timeout=1, system=system)
    seen: list[Transition] = []
    unsubscribe = breaker.on_transition(seen.append)
    stream = breaker.transitions()
    listeners = breaker._actor.listeners
    subscribed = len(listeners) + 1
    first = asyncio.ensure_future(stream.__anext__())
    while len(listeners) < subscribed:
        # Give the loop one turn at a time until the iterator has subscribed.
        await anyio.lowlevel.checkpoint()
    await outcomes(breaker, [fail])
    streamed = await asyncio.wait_for(first, 5)
    assert (streamed.from_state, streamed.to_state) == (CircuitState.CLOSED, CircuitState.OPEN)
    clock.advance(1)
    await breaker.call(ok)
    unsubscribe()
    breaker.force_open()
    await stream.aclose()
    assert [(t.from_state.value, t.to_state.value) for t in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_a_crashing_machine_is_logged_and_restarted(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", system=system, strict=True)
    actor = system.get("svc")
    assert actor is not None

    def broken(now: float) -> Any:
        raise RuntimeError("bug")

    actor.machine.acquire = broken  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs, pytest.raises(BreakerError, match="crashed"):
        breaker.call_sync(ok_sync)
    assert any(entry["event"] == "actor_crashed" for entry in logs)
    assert actor.restarts == 1
    # A fresh machine serves the next request; the broken method went with the old one.
    assert breaker.call_sync(ok_sync, 9) == 9
    assert breaker.state is CircuitState.CLOSED


def test_stop_fails_pending_requests_instead_of_hanging(clock: FakeClock) -> None:
    system = ActorSystem(clock=clock)  # never started: requests just queue
    actor, _ = system.actor("svc")
    answers: list[tuple[Any, BaseException | None]] = []
    actor.ask(StatusRequest("svc"), lambda result, error: answers.append((result, error)))
    system.stop()
    assert len(answers) == 1
    assert isinstance(answers[0][1], ActorStoppedError)
    with pytest.raises(ActorStoppedError):
        actor.ask(StatusRequest("svc"), None)
    with pytest.raises(ActorStoppedError):
        system.actor("other")


def test_inbox_is_bounded(clock: FakeClock) -> None:
    actor = BreakerActor("svc", BreakerConfig(), clock=clock, max_inbox=2)
    actor.ask(StatusRequest("svc"), None)
    assert actor.post_report((0, Outcome.IGNORED, 0.0))
    with pytest.raises(InboxFullError):
        actor.ask(StatusRequest("svc"), None)
    assert not actor.post_report((0, Outcome.IGNORED, 0.0))
    # Successes are counts in a tally, not inbox items: never refused.
    assert actor.post_success(0, 5)
    # Reports that must not be lost can still be forced in.
    actor.ask(Report("svc", 0, Outcome.FAILURE), None, force=True)


def test_successes_posted_without_a_drain_are_drained_by_flush_soon(system: ActorSystem) -> None:
    # The daemon posts a batch's counts with flush=False and arms the drain
    # once the whole read is handled, unless a request served inline took them.
    actor, _ = system.actor("svc", BreakerConfig())
    loop = system._loop
    assert loop is not None
    armed: list[bool] = []
    drained = threading.Event()

    def post() -> None:  # on the actor's loop, as the daemon's connections are
        if not actor._asleep:
            loop.call_soon(post)  # not parked yet: look again on the next turn
            return
        actor.post_success(0, 3, flush=False)
        armed.append(actor._flush_scheduled)
        actor.flush_soon()
        armed.append(actor._flush_scheduled)
        actor.flush_soon()  # armed once, not twice
        loop.call_soon(check)

    def check() -> None:
        if actor.machine.successes == 3:
            drained.set()
        else:
            loop.call_soon(check)

    loop.call_soon_threadsafe(post)
    assert drained.wait(10)
    assert armed == [False, True]


def test_invalid_settings_are_clear_errors(system: ActorSystem) -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("svc", failure_threshold=1.5, system=system)
    with pytest.raises(ValueError, match="min_calls"):
        CircuitBreaker("svc", min_calls=0, system=system)
    with pytest.raises(TypeError, match="fallback"):
        CircuitBreaker("svc", fallback="nope", system=system)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="record"):
        CircuitBreaker("svc", record=[Exception], system=system)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        CircuitBreaker("", system=system)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_gets_its_own_actor() -> None:
    breaker = CircuitBreaker("fork-test", min_calls=1)
    assert breaker.call_sync(ok_sync, 1) == 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            with pytest.raises(Boom):
                breaker.call_sync(fail_sync)
            if breaker.state is CircuitState.OPEN and breaker.status().failures == 1:
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
    # The child's failure never reached the parent's breaker.
    assert breaker.state is CircuitState.CLOSED
    assert breaker.status().failures == 0


def test_status_shows_a_time_window_aging(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("svc", window_seconds=10, min_calls=5, system=system)
    with pytest.raises(Boom):
        breaker.call_sync(fail_sync)
    assert breaker.status().snapshot.calls == 1
    clock.advance(30)
    status = breaker.status()
    assert status.snapshot.calls == 0
    assert status.snapshot.failure_rate is None
    assert status.failures == 1  # totals never age
