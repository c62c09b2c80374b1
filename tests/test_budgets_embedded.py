# Tests read `breaker.state` before and after calls that change it on another
# thread; mypy narrows the property after one assert and flags the next.
# mypy: disable-error-code="comparison-overlap"
"""Budgets on an embedded breaker: paced rates, concurrency, header feeds, waiting.

Time is a ``FakeClock``: a budgeted call that waits sleeps on it, which
moves it at once (``FakeClock.sleep``). Concurrency tests use real threads
that block on events, never on a duration.
"""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest

from breakerd.actor import ActorSystem
from breakerd.actor._budget import RAMP_STEP, SAFETY_MARGIN
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState
from breakerd.protocol import BudgetExceededError

GAP = 1 / (20 * SAFETY_MARGIN)  # the spacing of "20/s"


def test_a_call_past_the_rate_is_refused_with_reason_and_retry_after(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("rate-refuse", max_rate="20/s", system=system)
    assert breaker.call_sync(lambda: 1) == 1
    with pytest.raises(BudgetExceededError) as caught:
        breaker.call_sync(lambda: 2)
    error = caught.value
    assert isinstance(error, CircuitBreakerOpenError)
    assert error.reason == "rate_budget"
    assert error.retry_after == pytest.approx(GAP)
    assert error.name == "rate-refuse"
    assert "rate budget" in str(error)
    assert "retry after" in str(error)
    assert breaker.state is CircuitState.CLOSED  # a budget is not an open breaker
    clock.advance(GAP)
    assert breaker.call_sync(lambda: 3) == 3
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is BudgetExceededError
    assert restored.reason == "rate_budget"


def test_the_fallback_answers_a_budget_refusal(system: ActorSystem) -> None:
    breaker = CircuitBreaker(
        "rate-fallback", max_rate="1/min", fallback=lambda x: f"later:{x}", system=system
    )
    assert breaker.call_sync(lambda x: f"now:{x}", 1) == "now:1"
    assert breaker.call_sync(lambda x: f"now:{x}", 2) == "later:2"


def test_calls_that_may_wait_are_paced_not_refused(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("rate-wait", max_rate="20/s", wait=1.0, system=system)
    start = clock()
    seen = [breaker.call_sync(clock) for _ in range(10)]
    assert [t - start for t in seen] == pytest.approx([i * GAP for i in range(10)])
    # Past the wait: refused without waiting at all.
    before = clock()
    paced = CircuitBreaker("rate-wait2", max_rate="1/s", wait=0.5, system=system)
    paced.call_sync(lambda: None)
    with pytest.raises(BudgetExceededError):
        paced.call_sync(lambda: None)
    assert clock() == before  # a refusal does not wait its wait out first


def test_burst_lets_that_many_go_at_once(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("rate-burst", max_rate="10/s", burst=3, system=system)
    assert [breaker.call_sync(lambda: 1) for _ in range(3)] == [1, 1, 1]
    with pytest.raises(BudgetExceededError):
        breaker.call_sync(lambda: 1)


@pytest.mark.anyio
async def test_async_calls_are_paced_too(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("rate-async", max_rate="20/s", wait=1.0, system=system)

    async def when() -> float:
        return clock()

    start = clock()
    seen = [await breaker.call(when) for _ in range(5)]
    assert [t - start for t in seen] == pytest.approx([i * GAP for i in range(5)])
    refusing = CircuitBreaker("rate-async2", max_rate="1/min", system=system)
    await refusing.call(when)
    with pytest.raises(BudgetExceededError, match="rate budget"):
        await refusing.call(when)


def test_bad_budget_settings_are_refused(system: ActorSystem) -> None:
    with pytest.raises(ValueError, match="max_rate must be a string like"):
        CircuitBreaker("bad1", max_rate="20", system=system)
    with pytest.raises(ValueError, match="max_concurrent must be an integer >= 1"):
        CircuitBreaker("bad2", max_concurrent=0, system=system)
    with pytest.raises(ValueError, match="wait must be a number of seconds >= 0"):
        CircuitBreaker("bad3", wait=-1, system=system)
    with pytest.raises(ValueError, match="burst only applies with max_rate"):
        CircuitBreaker("bad4", burst=3, system=system)


def test_breakers_of_one_name_share_their_budget(system: ActorSystem) -> None:
    first = CircuitBreaker("rate-shared", max_rate="1/min", system=system)
    second = CircuitBreaker("rate-shared", max_rate="1/min", system=system)
    first.call_sync(lambda: None)
    with pytest.raises(BudgetExceededError):
        second.call_sync(lambda: None)


def _hold(breaker: CircuitBreaker, started: threading.Event, release: threading.Event) -> None:
    def held() -> None:
        started.set()
        release.wait(10)

    breaker.call_sync(held)


def test_concurrency_refuses_past_its_limit_and_wait_queues() -> None:
    # A real clock: a waiter is woken by the release, not by time passing.
    with ActorSystem().running_in_thread() as real:
        breaker = CircuitBreaker("conc", max_concurrent=2, system=real)
        release = threading.Event()
        holders = []
        for _ in range(2):
            started = threading.Event()
            thread = threading.Thread(target=_hold, args=(breaker, started, release))
            thread.start()
            assert started.wait(10)
            holders.append(thread)
        assert breaker.in_flight == 2
        with pytest.raises(BudgetExceededError) as caught:
            breaker.call_sync(lambda: None)
        assert caught.value.reason == "concurrency"
        assert caught.value.retry_after is None
        assert "max_concurrent" in str(caught.value)
        waiting = CircuitBreaker("conc", max_concurrent=2, wait=30.0, system=real)
        result: list[int] = []
        waiter = threading.Thread(target=lambda: result.append(waiting.call_sync(lambda: 7)))
        waiter.start()
        release.set()
        waiter.join(10)
        for thread in holders:
            thread.join(10)
        assert result == [7]
        assert breaker.in_flight == 0


def test_a_failed_call_gives_its_lease_back(system: ActorSystem) -> None:
    breaker = CircuitBreaker("conc-fail", max_concurrent=1, min_calls=100, system=system)

    def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        breaker.call_sync(boom)
    assert breaker.in_flight == 0
    assert breaker.call_sync(lambda: 1) == 1


def test_concurrency_wait_runs_out_on_the_clock(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("conc-clock", max_concurrent=1, wait=2.0, system=system)
    before = clock()

    def inner() -> None:
        with pytest.raises(BudgetExceededError, match="max_concurrent"):
            breaker.call_sync(lambda: None)

    breaker.call_sync(inner)
    assert clock() - before == pytest.approx(2.0)  # it waited its wait, then gave up


@pytest.mark.anyio
async def test_async_concurrency(system: ActorSystem) -> None:
    breaker = CircuitBreaker("conc-async", max_concurrent=1, system=system)
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def held() -> None:
        entered.set()
        await leave.wait()

    task = asyncio.ensure_future(breaker.call(held))
    await entered.wait()

    async def other() -> int:
        return 1

    with pytest.raises(BudgetExceededError):
        await breaker.call(other)
    leave.set()
    await task
    assert await breaker.call(other) == 1


def test_headers_spread_what_is_left_and_wait_for_the_reset(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("headers", wait=5.0, system=system)
    breaker.observe_limits(
        {
            "x-ratelimit-limit-requests": "20",
            "x-ratelimit-remaining-requests": "2",
            "x-ratelimit-reset-requests": "1s",
        }
    )
    start = clock()
    seen = [breaker.call_sync(clock) - start for _ in range(4)]
    assert seen[0] == 0.0
    assert 0 < seen[1] < 1.0  # the last one spread over the time to the reset
    assert seen[2] >= 1.0  # none left: after the reset
    assert seen[3] > seen[2]  # and one by one after it
    no_wait = CircuitBreaker("headers2", system=system)
    no_wait.observe_limits(remaining_requests=0, reset_requests=3.0)
    with pytest.raises(BudgetExceededError) as caught:
        no_wait.call_sync(lambda: None)
    assert caught.value.retry_after == pytest.approx(3.0)


def test_tokens_are_debited_by_estimate_and_corrected_by_usage(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("tokens", system=system)
    breaker.observe_limits(remaining_tokens=1000, reset_tokens=60.0)

    def used(tokens: int, max_tokens: int) -> int:
        breaker.observe_limits(used_tokens=tokens)
        return tokens

    assert breaker.call_sync(used, 100, max_tokens=600) == 100  # 900 left after the correction
    assert breaker.call_sync(used, 600, max_tokens=800) == 600  # 300 left
    with pytest.raises(BudgetExceededError):
        breaker.call_sync(used, 1, max_tokens=400)
    assert breaker.call_sync(used, 1, max_tokens=300) == 1


def test_wait_covers_an_open_breakers_recovery(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("recover", min_calls=1, timeout=1.0, wait=5.0, system=system)

    def boom() -> None:
        raise KeyError("down")

    with pytest.raises(KeyError):
        breaker.call_sync(boom)
    assert breaker.state is CircuitState.OPEN
    opened = clock()
    ran_at = breaker.call_sync(clock)  # waits for the trial, is the trial, closes it
    assert ran_at >= opened + 1.0
    assert breaker.state is CircuitState.CLOSED
    short = CircuitBreaker("recover-short", min_calls=1, timeout=10.0, wait=1.0, system=system)
    with pytest.raises(KeyError):
        short.call_sync(boom)
    before = clock()
    with pytest.raises(CircuitBreakerOpenError) as caught:
        short.call_sync(clock)
    assert not isinstance(caught.value, BudgetExceededError)
    assert clock() == before  # the recovery is further than the wait: refused at once


@pytest.mark.anyio
async def test_async_wait_covers_recovery_and_uses_the_fallback_after(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(
        "recover-async", min_calls=1, timeout=1.0, wait=5.0, fallback=lambda: -1, system=system
    )

    async def boom() -> int:
        raise KeyError("down")

    async def when() -> float:
        return clock()

    with pytest.raises(KeyError):
        await breaker.call(boom)
    opened = clock()
    assert await breaker.call(when) >= opened + 1.0
    late = CircuitBreaker(
        "recover-late", min_calls=1, timeout=10.0, wait=1.0, fallback=lambda: -1, system=system
    )
    with pytest.raises(KeyError):
        await late.call(boom)
    assert await late.call(when) == -1


def test_waiters_after_an_outage_leave_in_a_doubling_ramp(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("ramp", wait=5.0, system=system)
    budgets = breaker.budgets
    assert budgets is not None
    now = clock()
    slots = [budgets.ramp_slot(7, now + i * 0.001) - now for i in range(7)]
    assert slots == pytest.approx([0, RAMP_STEP, RAMP_STEP, 2 * RAMP_STEP, *[2 * RAMP_STEP] * 3])
    assert budgets.ramp_slot(8, now + 1) == now + 1  # a new recovery, a new ramp
