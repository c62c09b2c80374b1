"""Unit tests for the pure breaker state machine (``breakerd.actor._machine``).

Every instant is an explicit ``now``: no clock is read and nothing sleeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor._machine import (
    BreakerConfig,
    Decision,
    IllegalTransitionError,
    Machine,
    RecordResult,
    Transition,
)
from breakerd.actor._reasons import TransitionReason
from breakerd.protocol import CircuitState, Outcome

CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN
FORCED_OPEN = CircuitState.FORCED_OPEN
DISABLED = CircuitState.DISABLED
#: The whitelist tests' reason: the whitelist does not look at it.
ANY_REASON = TransitionReason.ADMIN_RESET
ALL_STATES = (CLOSED, OPEN, HALF_OPEN, FORCED_OPEN, DISABLED)

S = Outcome.SUCCESS
F = Outcome.FAILURE


# -- helpers ------------------------------------------------------------------


def make(rng: Callable[[], float] | None = None, **settings_: Any) -> Machine:
    return Machine("svc", BreakerConfig(**settings_), rng=rng)


def admit(m: Machine, now: float) -> Decision:
    decision = m.acquire(now)
    assert decision.admitted, f"expected admission at {now}, got {decision}"
    return decision


def call(
    m: Machine,
    outcome: Outcome,
    now: float,
    *,
    duration: float = 0.0,
    retry_after: float | None = None,
) -> RecordResult:
    """Acquire and report one call at ``now``."""
    d = admit(m, now)
    return m.record(
        d.generation, outcome, now, duration=duration, lease=d.lease, retry_after=retry_after
    )


def trip(m: Machine, now: float) -> Transition:
    """Drive a closed machine open with failures; return the opening transition."""
    assert m.state is CLOSED
    for _ in range(m.config.min_calls):
        result = call(m, F, now)
        if result.transitions:
            (t,) = result.transitions
            assert t.to_state is OPEN
            return t
    raise AssertionError("the breaker never opened")


def to_half_open(m: Machine, now: float) -> tuple[float, Decision]:
    """Trip at ``now`` and take the first trial lease at the deadline."""
    opened = trip(m, now)
    assert opened.open_until is not None
    deadline = opened.open_until
    first = admit(m, deadline)
    assert m.state is HALF_OPEN
    assert first.lease != 0
    return deadline, first


def put_in_state(m: Machine, state: CircuitState, now: float = 0.0) -> None:
    if state is OPEN:
        trip(m, now)
    elif state is HALF_OPEN:
        to_half_open(m, now)
    elif state is FORCED_OPEN:
        m.force_open(now)
    elif state is DISABLED:
        m.disable(now)
    assert m.state is state


def totals(m: Machine) -> tuple[int, int, int, int]:
    return (m.successes, m.failures, m.ignored, m.rejections)


# -- the original scenario and the failure-rate rule -----------------------------------


def test_defaults_match_the_documented_api() -> None:
    config = BreakerConfig()
    assert config.failure_threshold == 0.5
    assert config.timeout == 30.0
    assert config.min_calls == 5
    assert config.half_open_calls == 1
    assert config.window_size == 100
    assert config.window_seconds is None
    assert config.slow_call_duration is None
    assert config.backoff == 1.0
    assert config.jitter == 0.0
    m = Machine("svc")
    assert m.state is CLOSED
    assert m.generation == 0
    assert m.failure_rate() is None
    assert m.window_calls == 0


def test_original_scenario_two_successes_then_three_failures_opens_at_0_6() -> None:
    m = make()  # failure_threshold=0.5, min_calls=5, timeout=30
    for now, outcome in [(0.0, S), (0.5, S), (1.0, F), (1.5, F)]:
        assert call(m, outcome, now) == RecordResult(True)
        assert m.state is CLOSED
    result = call(m, F, 2.0)
    assert result.counted
    (t,) = result.transitions
    assert (t.from_state, t.to_state) == (CLOSED, OPEN)
    assert t.reason == "failure_rate_exceeded"
    assert t.failure_rate == pytest.approx(0.6)
    assert t.generation == 1 == m.generation
    assert t.open_until == pytest.approx(32.0) == m.open_until
    assert m.state is OPEN
    assert m.failure_rate() == pytest.approx(0.6)
    assert (m.successes, m.failures) == (2, 3)
    # Requests 5 and 6 of the original script are rejected, with the time left.
    rejected = m.acquire(2.5)
    assert not rejected.admitted
    assert rejected.retry_after == pytest.approx(29.5)


def test_two_failures_of_five_do_not_open() -> None:
    m = make()
    for now, outcome in enumerate([S, F, S, F, S]):
        assert call(m, outcome, float(now)).transitions == ()
    assert m.state is CLOSED
    assert m.window_calls == 5
    assert m.failure_rate() == pytest.approx(0.4)


def test_rate_equal_to_the_threshold_does_not_open() -> None:
    m = make(min_calls=4)
    for outcome in [F, S, F, S]:
        call(m, outcome, 1.0)
    assert m.failure_rate() == 0.5
    assert m.state is CLOSED  # 0.5 is not greater than 0.5
    call(m, F, 2.0)  # 3/5
    assert m.state is OPEN


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.75])
def test_threshold_is_strictly_greater_than(threshold: float) -> None:
    # 4 calls; k failures open exactly when k/4 > threshold.
    for k in range(5):
        m = make(min_calls=4, failure_threshold=threshold)
        for i in range(4):
            call(m, F if i < k else S, 0.0)
        assert (m.state is OPEN) == (k / 4 > threshold), (k, threshold)


def test_threshold_one_never_opens_on_failures() -> None:
    m = make(min_calls=1, failure_threshold=1.0)
    for i in range(50):
        call(m, F, float(i))
    assert m.state is CLOSED
    assert m.failure_rate() == 1.0


@pytest.mark.parametrize("min_calls", [1, 3, 5, 8])
def test_min_calls_gates_the_judgement(min_calls: int) -> None:
    m = make(min_calls=min_calls)
    for i in range(min_calls - 1):
        assert call(m, F, float(i)).transitions == ()
        assert m.state is CLOSED
    assert m.window_calls == min_calls - 1
    (t,) = call(m, F, 100.0).transitions
    assert t.to_state is OPEN
    assert t.failure_rate == 1.0


# -- windows -----------------------------------------------------------------


def test_count_window_evicts_the_oldest_outcome() -> None:
    m = make(window_size=3, min_calls=3)
    for outcome in [S, F, S]:
        call(m, outcome, 0.0)
    assert m.state is CLOSED
    assert m.failure_rate() == pytest.approx(1 / 3)
    # The first S leaves: the window is F, S, F = 2/3. Without eviction it
    # would be 2/4, which does not open.
    call(m, F, 0.0)
    assert m.window_calls == 3
    assert m.state is OPEN
    assert m.failure_rate() == pytest.approx(2 / 3)


def test_count_window_forgets_old_failures() -> None:
    m = make(window_size=4, min_calls=4)
    for outcome in [F, F, S, S]:  # 0.5: stays closed
        call(m, outcome, 0.0)
    for _ in range(2):  # the two failures leave
        call(m, S, 0.0)
    assert m.window_calls == 4
    assert m.failure_rate() == 0.0
    call(m, F, 0.0)  # S S S F
    call(m, F, 0.0)  # S S F F: 0.5, still closed
    assert m.state is CLOSED
    call(m, F, 0.0)  # S F F F: 0.75
    assert m.state is OPEN


def test_time_window_expires_whole_old_buckets() -> None:
    m = make(window_seconds=2, min_calls=3)
    call(m, F, 5.1)
    call(m, F, 5.9)
    assert m.window_calls == 2
    # At 10.0 the second 5 bucket is long gone: one success alone, below min_calls.
    call(m, S, 10.0)
    assert m.window_calls == 1
    assert m.failure_rate() == 0.0
    call(m, F, 10.2)
    call(m, F, 10.4)  # 2/3 within the window
    assert m.state is OPEN


def test_time_window_old_failures_do_not_reach_min_calls() -> None:
    m = make(window_seconds=5, min_calls=3)
    call(m, F, 0.0)
    call(m, F, 0.5)
    call(m, F, 30.0)  # the first two are 30 s old
    assert m.state is CLOSED
    assert m.window_calls == 1


@pytest.mark.parametrize(
    ("seconds", "first", "second"),
    [
        (1, 9.99, 10.0),  # 10 ms apart, in a 1 s window
        (2, 5.9, 7.5),  # 1.6 s apart, in a 2 s window
        (1.5, 9.9, 10.7),  # 0.8 s apart, in a 1.5 s window
        (10, 3.5, 13.2),  # 9.7 s apart, in a 10 s window
    ],
)
def test_time_window_keeps_outcomes_younger_than_the_window(
    seconds: float, first: float, second: float
) -> None:
    assert second - first < seconds
    m = make(window_seconds=seconds, min_calls=2)
    call(m, F, first)
    call(m, F, second)
    assert m.window_calls == 2
    assert m.state is OPEN


def test_time_window_buckets_by_whole_second() -> None:
    # A bucket covers [s, s + 1) and leaves the window only once all of it is
    # older than window_seconds; its outcomes come and go together.
    m = make(window_seconds=2, min_calls=10)
    call(m, F, 5.1)
    call(m, F, 5.9)
    call(m, S, 7.5)  # 5.9 is 1.6 s old, so bucket 5 stays, and 5.1 with it
    assert m.window_calls == 3
    call(m, S, 8.0)  # all of bucket 5 is now older than 2 s
    assert m.window_calls == 2
    assert m.failure_rate() == 0.0


# -- ignored and cancelled -----------------------------------------------------


def test_ignored_counts_as_neither_success_nor_failure() -> None:
    m = make(min_calls=3)
    call(m, F, 0.0)
    call(m, F, 0.0)
    for _ in range(10):
        assert call(m, Outcome.IGNORED, 0.0) == RecordResult(True)
    assert m.window_calls == 2  # ignored outcomes do not reach min_calls
    assert m.failure_rate() == 1.0  # nor dilute the rate
    assert m.state is CLOSED
    assert m.ignored == 10
    assert (m.successes, m.failures) == (0, 2)
    call(m, S, 0.0)  # F F S: 2/3
    assert m.state is OPEN


def test_ignored_does_not_evict_from_a_count_window() -> None:
    m = make(window_size=2, min_calls=2)
    call(m, F, 0.0)
    call(m, Outcome.IGNORED, 0.0)
    call(m, S, 0.0)
    assert m.failure_rate() == 0.5


def test_cancelled_releases_and_records_nothing() -> None:
    m = make(min_calls=1)
    before = (m.snapshot(), totals(m))
    assert call(m, Outcome.CANCELLED, 0.0) == RecordResult(True)
    assert (m.snapshot(), totals(m)) == before
    assert m.state is CLOSED


# -- open ----------------------------------------------------------------------


def test_open_rejects_with_retry_after_until_the_deadline() -> None:
    m = make(timeout=30)
    opened = trip(m, 100.0)
    assert opened.open_until == 130.0
    generation = m.generation
    for now in [100.0, 110.0, 129.0, 129.999]:
        d = m.acquire(now)
        assert not d.admitted
        assert d.lease == 0
        assert d.transitions == ()
        assert d.generation == generation
        assert d.retry_after == pytest.approx(130.0 - now)
    assert m.rejections == 4
    assert m.state is OPEN
    assert m.generation == generation


@pytest.mark.parametrize("late", [0.0, 0.001, 1000.0])
def test_first_acquire_at_or_after_the_deadline_is_a_half_open_trial(late: float) -> None:
    m = make(timeout=30)
    trip(m, 100.0)
    generation = m.generation
    d = m.acquire(130.0 + late)
    assert d.admitted
    assert d.lease != 0
    assert d.retry_after is None
    (t,) = d.transitions
    assert (t.from_state, t.to_state, t.reason) == (OPEN, HALF_OPEN, "open_timeout_elapsed")
    assert t.generation == generation + 1 == d.generation == m.generation
    assert t.open_until is None
    assert m.state is HALF_OPEN
    assert m.open_until is None
    assert m.trials_in_flight == 1


def test_reports_are_not_counted_while_open() -> None:
    m = make(min_calls=1)
    trip(m, 0.0)
    rejected = m.acquire(1.0)
    before = (m.snapshot(), totals(m))
    assert m.record(rejected.generation, S, 1.0) == RecordResult(False)
    assert (m.snapshot(), totals(m)) == before


# -- half open -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_half_open_hands_out_exactly_n_leases(n: int) -> None:
    m = make(min_calls=1, half_open_calls=n, timeout=10)
    deadline, first = to_half_open(m, 0.0)
    leases = [first.lease] + [admit(m, deadline).lease for _ in range(n - 1)]
    assert len(set(leases)) == n
    assert 0 not in leases
    assert m.trials_in_flight == n
    for _ in range(3):
        d = m.acquire(deadline + 1)
        assert not d.admitted
        assert d.lease == 0
        assert d.retry_after is None
    assert m.state is HALF_OPEN
    assert m.trials_in_flight == n


@pytest.mark.parametrize("n", [2, 3])
def test_half_open_reported_trials_do_not_free_a_lease(n: int) -> None:
    # "Hands out at most half_open_calls trial leases ... An ignored or
    # cancelled trial gives its lease back": a success or failure does not.
    m = make(min_calls=1, half_open_calls=n, timeout=10)
    deadline, first = to_half_open(m, 0.0)
    others = [admit(m, deadline) for _ in range(n - 1)]
    assert m.record(first.generation, S, deadline + 1, lease=first.lease).counted
    assert m.state is HALF_OPEN  # only 1 of n trials reported
    extra = m.acquire(deadline + 1)
    assert not extra.admitted, f"lease {extra.lease} is trial {n + 1} of {n}"
    for d in others:
        m.record(d.generation, S, deadline + 2, lease=d.lease)
    assert m.state is CLOSED


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([S], CLOSED),
        ([F], OPEN),
        ([S, F], CLOSED),  # 0.5 is not greater than 0.5
        ([F, S], CLOSED),
        ([F, F], OPEN),
        ([S, S, F], CLOSED),
        ([S, F, F], OPEN),
        ([F, F, F], OPEN),
    ],
)
def test_half_open_verdict_after_all_trials(
    outcomes: list[Outcome], expected: CircuitState
) -> None:
    n = len(outcomes)
    m = make(min_calls=1, half_open_calls=n, timeout=10)
    deadline, first = to_half_open(m, 0.0)
    decisions = [first] + [admit(m, deadline) for _ in range(n - 1)]
    half_open_generation = m.generation
    for i, (d, outcome) in enumerate(zip(decisions, outcomes, strict=True)):
        result = m.record(d.generation, outcome, deadline + 1, lease=d.lease)
        assert result.counted
        if i < n - 1:
            assert result.transitions == ()
            assert m.state is HALF_OPEN
    (t,) = result.transitions
    assert t.from_state is HALF_OPEN
    assert t.to_state is expected is m.state
    assert t.reason == ("trial_succeeded" if expected is CLOSED else "trial_failed")
    assert t.failure_rate == pytest.approx(outcomes.count(F) / n)
    assert t.generation == half_open_generation + 1 == m.generation
    assert m.trials_in_flight == 0
    if expected is OPEN:
        assert m.open_until == deadline + 1 + 10
    else:
        assert m.open_until is None


@pytest.mark.parametrize("outcome", [Outcome.IGNORED, Outcome.CANCELLED])
def test_ignored_or_cancelled_trial_gives_its_lease_back(outcome: Outcome) -> None:
    m = make(min_calls=1, half_open_calls=1, timeout=10)
    deadline, first = to_half_open(m, 0.0)
    assert not m.acquire(deadline).admitted
    assert m.record(first.generation, outcome, deadline + 1, lease=first.lease).counted
    assert m.state is HALF_OPEN
    assert m.trials_in_flight == 0
    second = admit(m, deadline + 1)
    assert second.lease not in (0, first.lease)
    assert second.generation == first.generation
    (t,) = m.record(second.generation, S, deadline + 2, lease=second.lease).transitions
    assert t.to_state is CLOSED


def test_a_lease_is_reported_once() -> None:
    m = make(min_calls=1, half_open_calls=2, timeout=10)
    deadline, first = to_half_open(m, 0.0)
    admit(m, deadline)
    assert m.record(first.generation, F, deadline, lease=first.lease).counted
    before = (m.snapshot(), totals(m))
    assert not m.record(first.generation, F, deadline, lease=first.lease).counted
    assert not m.record(first.generation, F, deadline, lease=0).counted
    assert not m.record(first.generation, F, deadline, lease=10_000).counted
    assert (m.snapshot(), totals(m)) == before
    assert m.state is HALF_OPEN


def test_overdue_lease_counts_as_a_failure_via_expire() -> None:
    m = make(min_calls=1, half_open_calls=1, timeout=10, half_open_max_wait=5)
    deadline, first = to_half_open(m, 0.0)
    assert m.next_deadline() == deadline + 5
    failures = m.failures
    assert m.expire(deadline + 4.999) == ()
    assert m.state is HALF_OPEN
    (t,) = m.expire(deadline + 5)
    assert (t.from_state, t.to_state, t.reason) == (HALF_OPEN, OPEN, "trial_failed")
    assert t.failure_rate == 1.0
    assert m.open_until == deadline + 5 + 10
    assert m.failures == failures + 1
    assert m.next_deadline() is None
    # The late report is for a past generation: it counts for nothing.
    assert not m.record(first.generation, S, deadline + 6, lease=first.lease).counted
    assert m.state is OPEN


def test_overdue_lease_is_one_failed_trial_of_several() -> None:
    m = make(min_calls=1, half_open_calls=2, timeout=10, half_open_max_wait=5)
    deadline, first = to_half_open(m, 0.0)
    second = admit(m, deadline + 2)
    assert m.next_deadline() == deadline + 5
    assert m.expire(deadline + 5) == ()  # one failure of two trials: no verdict yet
    assert m.state is HALF_OPEN
    assert m.trials_in_flight == 1
    assert m.next_deadline() == deadline + 7
    assert not m.record(first.generation, S, deadline + 5, lease=first.lease).counted
    (t,) = m.record(second.generation, S, deadline + 6, lease=second.lease).transitions
    assert t.to_state is CLOSED  # 1 failure of 2 is not greater than 0.5
    assert t.failure_rate == 0.5


def test_overdue_lease_counts_as_a_failure_via_acquire() -> None:
    m = make(min_calls=1, half_open_calls=1, timeout=10, half_open_max_wait=5)
    deadline, _ = to_half_open(m, 0.0)
    d = m.acquire(deadline + 5)
    assert not d.admitted
    (t,) = d.transitions
    assert (t.from_state, t.to_state) == (HALF_OPEN, OPEN)
    assert d.generation == t.generation == m.generation
    assert d.retry_after == pytest.approx(10.0)
    assert m.open_until == deadline + 15


def test_overdue_lease_via_acquire_can_close_and_admit() -> None:
    m = make(min_calls=1, half_open_calls=3, timeout=10, half_open_max_wait=5)
    deadline, first = to_half_open(m, 0.0)
    second = admit(m, deadline)
    admit(m, deadline + 1)  # never reported
    m.record(first.generation, S, deadline + 1, lease=first.lease)
    m.record(second.generation, S, deadline + 1, lease=second.lease)
    assert m.state is HALF_OPEN
    d = m.acquire(deadline + 6)  # the third lease is overdue: 1 failure of 3
    (t,) = d.transitions
    assert (t.from_state, t.to_state) == (HALF_OPEN, CLOSED)
    assert d.admitted
    assert d.lease == 0
    assert d.generation == m.generation == t.generation


def test_timeout_zero_reopens_straight_into_a_trial() -> None:
    m = make(min_calls=1, half_open_calls=1, timeout=0, half_open_max_wait=5)
    deadline, _ = to_half_open(m, 7.0)
    assert deadline == 7.0
    d = m.acquire(12.0)  # overdue: re-open for 0 s, then a new trial at once
    assert d.admitted
    assert d.lease != 0
    assert [(t.from_state, t.to_state) for t in d.transitions] == [
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
    ]
    assert d.generation == m.generation == d.transitions[-1].generation
    assert m.state is HALF_OPEN


def test_closing_starts_an_empty_window() -> None:
    m = make(min_calls=3, timeout=10)
    call(m, S, 0.0)
    deadline, first = to_half_open(m, 0.0)
    (t,) = m.record(first.generation, S, deadline, lease=first.lease).transitions
    assert t.to_state is CLOSED
    assert m.window_calls == 0
    assert m.failure_rate() is None
    call(m, F, deadline)
    call(m, F, deadline)  # the failures that tripped it are gone: 2 < min_calls
    assert m.state is CLOSED
    assert m.failure_rate() == 1.0


# -- rate limited -----------------------------------------------------------------


def test_rate_limited_opens_for_retry_after() -> None:
    m = make(timeout=30, min_calls=5)
    result = call(m, Outcome.RATE_LIMITED, 50.0, retry_after=7.0)
    assert result.counted
    (t,) = result.transitions
    assert (t.from_state, t.to_state, t.reason) == (CLOSED, OPEN, "rate_limited")
    assert t.open_until == 57.0 == m.open_until
    assert m.window_calls == 0  # it opens the breaker, it is not a window sample
    assert m.failures == 1
    assert m.acquire(56.5).retry_after == pytest.approx(0.5)
    assert m.acquire(57.0).admitted


@pytest.mark.parametrize("retry_after", [None, -1.0, math.nan, math.inf])
def test_rate_limited_without_a_usable_retry_after_opens_for_timeout(
    retry_after: float | None,
) -> None:
    m = make(timeout=30)
    (t,) = call(m, Outcome.RATE_LIMITED, 50.0, retry_after=retry_after).transitions
    assert t.open_until == 80.0 == m.open_until


def test_rate_limited_with_zero_retry_after_allows_a_trial_at_once() -> None:
    m = make()
    call(m, Outcome.RATE_LIMITED, 50.0, retry_after=0.0)
    assert m.state is OPEN
    d = m.acquire(50.0)
    assert d.admitted
    assert m.state is HALF_OPEN


def test_rate_limited_trial_reopens_for_retry_after() -> None:
    m = make(min_calls=1, half_open_calls=2, timeout=10)
    deadline, first = to_half_open(m, 0.0)
    admit(m, deadline)
    (t,) = m.record(
        first.generation, Outcome.RATE_LIMITED, deadline, lease=first.lease, retry_after=3.0
    ).transitions
    assert (t.from_state, t.to_state, t.reason) == (HALF_OPEN, OPEN, "rate_limited")
    assert m.open_until == deadline + 3.0
    assert m.trials_in_flight == 0


# -- backoff and jitter ---------------------------------------------------------


def reopen(m: Machine) -> float:
    """From open: wait for the deadline, fail the trial, return the new open duration."""
    assert m.open_until is not None
    now = m.open_until
    d = admit(m, now)
    m.record(d.generation, F, now, lease=d.lease)
    assert m.state is OPEN
    assert m.open_until is not None
    return m.open_until - now


def test_backoff_multiplies_consecutive_reopen_durations_up_to_max_timeout() -> None:
    m = make(min_calls=1, timeout=10, backoff=2, max_timeout=50)
    opened = trip(m, 0.0)
    assert opened.open_until == 10.0
    assert [reopen(m) for _ in range(5)] == [20.0, 40.0, 50.0, 50.0, 50.0]


def test_backoff_without_max_timeout_keeps_growing() -> None:
    m = make(min_calls=1, timeout=1, backoff=3)
    trip(m, 0.0)
    assert [reopen(m) for _ in range(4)] == [3.0, 9.0, 27.0, 81.0]


def test_backoff_one_keeps_the_duration_constant() -> None:
    m = make(min_calls=1, timeout=4)
    trip(m, 0.0)
    assert [reopen(m) for _ in range(3)] == [4.0, 4.0, 4.0]


def test_closing_resets_the_backoff() -> None:
    m = make(min_calls=1, timeout=10, backoff=2)
    trip(m, 0.0)
    assert reopen(m) == 20.0
    assert m.open_until is not None
    now = m.open_until
    d = admit(m, now)
    m.record(d.generation, S, now, lease=d.lease)
    assert m.state is CLOSED
    opened = trip(m, now)
    assert opened.open_until == now + 10.0


def test_admin_reset_resets_the_backoff() -> None:
    m = make(min_calls=1, timeout=10, backoff=2)
    trip(m, 0.0)
    assert reopen(m) == 20.0
    m.reset(100.0)
    assert trip(m, 100.0).open_until == 110.0


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.75, 0.999999])
def test_jitter_spreads_the_duration_within_bounds(r: float) -> None:
    m = make(rng=lambda: r, min_calls=1, timeout=100, jitter=0.1)
    opened = trip(m, 0.0)
    assert opened.open_until is not None
    assert 90.0 <= opened.open_until <= 110.0
    # Linear in the random draw: 0 gives the shortest, 0.5 the nominal timeout.
    assert opened.open_until == pytest.approx(100.0 * (1 + 0.1 * (2 * r - 1)))


def test_jitter_draws_a_fresh_value_per_opening() -> None:
    draws: Iterator[float] = iter([0.0, 1 - 1e-9])
    m = make(rng=lambda: next(draws), min_calls=1, timeout=100, jitter=0.5)
    trip(m, 0.0)
    assert m.open_until == pytest.approx(50.0)
    assert reopen(m) == pytest.approx(150.0)


@settings(max_examples=200, deadline=None)
@given(
    r=st.floats(0.0, 1.0, exclude_max=True),
    jitter=st.floats(0.0, 0.99),
    timeout=st.floats(0.0, 1e6),
    now=st.floats(0.0, 1e6),
)
def test_jitter_never_leaves_its_bounds(
    r: float, jitter: float, timeout: float, now: float
) -> None:
    m = make(rng=lambda: r, min_calls=1, timeout=timeout, jitter=jitter)
    opened = trip(m, now)
    assert opened.open_until is not None
    duration = opened.open_until - now
    slack = 1e-9 * max(1.0, timeout, now)
    assert timeout * (1 - jitter) - slack <= duration <= timeout * (1 + jitter) + slack


def test_no_rng_is_drawn_without_jitter() -> None:
    def rng() -> float:
        raise AssertionError("rng called with jitter=0")

    m = make(rng=rng, min_calls=1, timeout=10)
    trip(m, 0.0)
    assert m.open_until == 10.0


# -- slow calls --------------------------------------------------------------------


def test_slow_calls_open_when_the_slow_rate_exceeds_the_threshold() -> None:
    m = make(min_calls=4, slow_call_duration=1.0, slow_call_threshold=0.5)
    call(m, S, 0.0, duration=2.0)
    call(m, S, 0.0, duration=1.0)  # exactly the limit is not slow
    call(m, S, 0.0, duration=0.1)
    assert m.slow_call_rate() == pytest.approx(1 / 3)
    assert call(m, S, 0.0, duration=5.0).transitions == ()  # 2/4 = 0.5: not greater
    assert m.state is CLOSED
    (t,) = call(m, S, 0.0, duration=1.5).transitions  # 3/5
    assert (t.to_state, t.reason) == (OPEN, "slow_call_rate_exceeded")
    assert t.slow_call_rate == pytest.approx(0.6)
    assert t.failure_rate == 0.0


def test_slow_failures_count_towards_the_slow_rate() -> None:
    m = make(min_calls=2, failure_threshold=1.0, slow_call_duration=1.0, slow_call_threshold=0.0)
    call(m, F, 0.0, duration=0.5)
    assert m.state is CLOSED
    call(m, F, 0.0, duration=3.0)
    assert m.state is OPEN


def test_slow_call_detection_off_by_default() -> None:
    m = make(min_calls=1, slow_call_threshold=0.0)
    for _ in range(10):
        call(m, S, 0.0, duration=1e9)
    assert m.state is CLOSED
    assert m.slow_call_rate() == 0.0


def test_a_slow_trial_reopens() -> None:
    m = make(min_calls=1, timeout=10, slow_call_duration=1.0, slow_call_threshold=0.5)
    deadline, first = to_half_open(m, 0.0)
    (t,) = m.record(first.generation, S, deadline, duration=2.0, lease=first.lease).transitions
    assert (t.to_state, t.reason) == (OPEN, "trial_slow")


def test_a_fast_trial_closes_with_slow_detection_on() -> None:
    m = make(min_calls=1, timeout=10, slow_call_duration=1.0, slow_call_threshold=0.5)
    deadline, first = to_half_open(m, 0.0)
    (t,) = m.record(first.generation, S, deadline, duration=1.0, lease=first.lease).transitions
    assert t.to_state is CLOSED


# -- generations ----------------------------------------------------------------------


def test_stale_generation_report_stays_out_of_the_window_but_counts() -> None:
    m = make(min_calls=2, timeout=10)
    old = admit(m, 0.0)  # a permit from generation 0
    deadline, first = to_half_open(m, 0.0)
    m.record(first.generation, S, deadline, lease=first.lease)
    assert m.state is CLOSED
    assert m.generation == 3
    call(m, S, deadline)
    before = m.snapshot()
    successes, failures, ignored, rejections = totals(m)
    for outcome in Outcome:
        result = m.record(old.generation, outcome, deadline + 1, retry_after=1.0)
        assert result == RecordResult(False)
    # A generation the machine never had is nobody's permit: not even the books.
    assert m.record(m.generation + 1, F, deadline + 1) == RecordResult(False)
    assert m.snapshot() == before
    # The calls happened: success, failure and rate_limited, ignored; not cancelled.
    assert totals(m) == (successes + 1, failures + 2, ignored + 1, rejections)
    assert m.generation == 3


def test_stale_generation_report_is_dropped_in_half_open() -> None:
    m = make(min_calls=1, half_open_calls=1, timeout=10)
    old = admit(m, 0.0)
    call(m, F, 0.0)
    assert m.state is OPEN
    deadline, first = m.open_until, admit(m, 10.0)
    assert deadline == 10.0
    before = (m.snapshot(), totals(m), m.next_deadline())
    # The closed-era permit, even with the live lease id, counts for nothing.
    for outcome in Outcome:
        assert not m.record(old.generation, outcome, 11.0, lease=first.lease).counted
    assert (m.snapshot(), totals(m), m.next_deadline()) == before
    assert m.record(first.generation, S, 11.0, lease=first.lease).counted
    assert m.state is CLOSED


def test_every_transition_bumps_the_generation() -> None:
    m = Machine("svc", BreakerConfig(min_calls=1, timeout=1), generation=41)
    assert m.generation == 41
    seen = [m.generation]
    seen.append(trip(m, 0.0).generation)
    seen.append(admit(m, 1.0).generation)
    for admin, now in ((m.force_open, 2.0), (m.disable, 3.0), (m.reset, 4.0)):
        moved = admin(now)
        assert moved is not None
        seen.append(moved.generation)
    assert seen == list(range(41, 47))
    assert m.reset(5.0) is None  # closed already: no transition
    assert m.generation == 46


# -- administration -----------------------------------------------------------------


@pytest.mark.parametrize("source", ALL_STATES)
def test_force_open_from_every_state(source: CircuitState) -> None:
    m = make(min_calls=1, timeout=10)
    put_in_state(m, source)
    generation = m.generation
    t = m.force_open(20.0)
    if source is FORCED_OPEN:
        # Already there: no transition, the same generation.
        assert t is None
        assert m.generation == generation
        generation -= 1  # for the checks below, which count the move
    else:
        assert t is not None
        assert (t.from_state, t.to_state, t.reason) == (source, FORCED_OPEN, "admin_force_open")
        assert t.generation == generation + 1 == m.generation
    assert m.state is FORCED_OPEN
    assert m.trials_in_flight == 0
    assert m.open_until is None
    for now in (20.0, 1e9):
        d = m.acquire(now)
        assert not d.admitted
        assert d.retry_after is None
        assert d.transitions == ()
    assert m.expire(1e9) == ()
    assert not m.record(m.generation, F, 1e9).counted
    assert m.state is FORCED_OPEN


@pytest.mark.parametrize("source", ALL_STATES)
def test_disable_from_every_state(source: CircuitState) -> None:
    m = make(min_calls=1, timeout=10)
    put_in_state(m, source)
    generation = m.generation
    t = m.disable(20.0)
    if source is DISABLED:
        # Already there: no transition, the same generation.
        assert t is None
        assert m.generation == generation
        generation -= 1  # for the checks below, which count the move
    else:
        assert t is not None
        assert (t.from_state, t.to_state, t.reason) == (source, DISABLED, "admin_disable")
        assert t.generation == generation + 1 == m.generation
    assert m.trials_in_flight == 0
    window = (m.window_calls, m.failure_rate())
    for i in range(20):
        d = admit(m, 20.0 + i)
        assert d.lease == 0
        assert d.transitions == ()
        for outcome in (F, Outcome.RATE_LIMITED):
            result = m.record(d.generation, outcome, 20.0 + i, retry_after=1.0)
            assert result.transitions == ()
    assert m.state is DISABLED
    assert (m.window_calls, m.failure_rate()) == window  # records nothing
    assert m.generation == generation + 1


@pytest.mark.parametrize("source", ALL_STATES)
def test_reset_from_every_state(source: CircuitState) -> None:
    m = make(min_calls=2, timeout=10, half_open_calls=2)
    call(m, F, 0.0)
    put_in_state(m, source)
    generation = m.generation
    t = m.reset(20.0)
    if source is CLOSED:
        # Already there: no transition, the same generation.
        assert t is None
        assert m.generation == generation
        generation -= 1  # for the checks below, which count the move
    else:
        assert t is not None
        assert (t.from_state, t.to_state, t.reason) == (source, CLOSED, "admin_reset")
        assert t.generation == generation + 1 == m.generation
    assert m.state is CLOSED
    assert m.window_calls == 0
    assert m.failure_rate() is None
    assert m.open_until is None
    assert m.trials_in_flight == 0
    assert m.next_deadline() is None
    call(m, F, 21.0)  # one failure is below min_calls=2 in the fresh window
    assert m.state is CLOSED


# -- the transition whitelist ----------------------------------------------------------

_LEGAL_AUTOMATIC = {
    (CLOSED, OPEN),
    (OPEN, HALF_OPEN),
    (HALF_OPEN, OPEN),
    (HALF_OPEN, CLOSED),
    (OPEN, OPEN),  # a later rate-limit deadline extends an open period
}


@pytest.mark.parametrize(
    ("source", "target"),
    [(s, t) for s in ALL_STATES for t in ALL_STATES if (s, t) not in _LEGAL_AUTOMATIC],
)
def test_move_refuses_illegal_automatic_transitions(
    source: CircuitState, target: CircuitState
) -> None:
    m = make(min_calls=1, timeout=10)
    put_in_state(m, source)
    before = (m.snapshot(), m.generation, m.trials_in_flight)
    with pytest.raises(IllegalTransitionError, match=f"{source} -> {target}"):
        m._move(target, ANY_REASON, 5.0)
    assert (m.snapshot(), m.generation, m.trials_in_flight) == before


@pytest.mark.parametrize("source", [FORCED_OPEN, DISABLED, CLOSED])
def test_admin_cannot_move_to_open_or_half_open_from_elsewhere(source: CircuitState) -> None:
    m = make(min_calls=1)
    put_in_state(m, source)
    with pytest.raises(IllegalTransitionError):
        m._move(HALF_OPEN, ANY_REASON, 5.0, admin=True)
    if source is not CLOSED:
        with pytest.raises(IllegalTransitionError):
            m._move(OPEN, ANY_REASON, 5.0, admin=True)
    assert m.state is source


@pytest.mark.parametrize(("source", "target"), sorted(_LEGAL_AUTOMATIC))
def test_move_allows_whitelisted_transitions(source: CircuitState, target: CircuitState) -> None:
    m = make(min_calls=1)
    put_in_state(m, source)
    t = m._move(target, ANY_REASON, 5.0, open_until=9.0)
    assert (t.from_state, t.to_state) == (source, target)
    assert m.state is target
    assert m.open_until == (9.0 if target is OPEN else None)


# -- configuration ---------------------------------------------------------------------

_BAD_CONFIG: list[tuple[str, object]] = [
    *[
        ("failure_threshold", v)
        for v in [-0.1, 1.01, math.nan, math.inf, -math.inf, True, False, "0.5", None]
    ],
    *[("timeout", v) for v in [-1, -0.001, math.nan, math.inf, True, "30", None]],
    *[
        (name, v)
        for name in ("min_calls", "half_open_calls", "window_size")
        for v in [0, -1, 1.0, 2.5, math.nan, math.inf, True, False, "5", None]
    ],
    *[("window_seconds", v) for v in [0, 0.5, -1, math.nan, math.inf, True, "10"]],
    *[("slow_call_duration", v) for v in [0, -1, math.nan, math.inf, True, "1"]],
    *[("slow_call_threshold", v) for v in [-0.1, 1.5, math.nan, math.inf, True, None]],
    *[("backoff", v) for v in [0.5, 0, -2, math.nan, math.inf, True, None]],
    *[("max_timeout", v) for v in [29.9, 0, -1, math.nan, math.inf, True]],
    *[("jitter", v) for v in [-0.1, 1.0, 1.5, math.nan, math.inf, True, None]],
    *[("half_open_max_wait", v) for v in [0, -1, math.nan, math.inf, True, None]],
]


@pytest.mark.parametrize(("field", "value"), _BAD_CONFIG)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=rf"^{field} must be") as info:
        BreakerConfig(**kwargs)
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=rf"^{field} "):
        BreakerConfig.from_dict(kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"failure_threshold": 1},
        {"failure_threshold": 0.0},
        {"timeout": 0},
        {"min_calls": 1, "half_open_calls": 1, "window_size": 1},
        {"window_seconds": 1},
        {"window_seconds": 2.5},
        {"slow_call_duration": 0.001, "slow_call_threshold": 0.0},
        {"slow_call_threshold": 1.0},
        {"backoff": 1},
        {"max_timeout": 30.0},
        {"timeout": 5, "max_timeout": 5},
        {"jitter": 0.999},
        {"half_open_max_wait": 0.001},
    ],
)
def test_config_accepts_edge_values(kwargs: dict[str, Any]) -> None:
    config = BreakerConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_config_is_frozen() -> None:
    config = BreakerConfig()
    with pytest.raises(AttributeError):
        config.timeout = 1.0  # type: ignore[misc]


def test_from_dict_round_trips_as_dict() -> None:
    config = BreakerConfig(timeout=5, min_calls=2, window_seconds=10, jitter=0.2)
    data = config.as_dict()
    assert data["timeout"] == 5
    assert data["window_seconds"] == 10
    assert BreakerConfig.from_dict(data) == config
    assert BreakerConfig.from_dict({}) == BreakerConfig()


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"treshold": 0.5}, "treshold"),
        ({"timeout": 1, "zeta": 1, "alpha": 2}, "alpha, zeta"),
        ({"failure_threshold": 0.5, "fallback": None}, "fallback"),
    ],
)
def test_from_dict_rejects_unknown_keys(data: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match=f"unknown breaker setting\\(s\\): {names}$"):
        BreakerConfig.from_dict(data)


def test_differences_names_the_changed_settings() -> None:
    base = BreakerConfig()
    assert base.differences(BreakerConfig()) == ()
    assert base.differences(base) == ()
    other = BreakerConfig(timeout=1, jitter=0.5, min_calls=5)
    assert base.differences(other) == ("timeout", "jitter")
    assert other.differences(base) == ("timeout", "jitter")
    assert base.differences(BreakerConfig(window_seconds=3)) == ("window_seconds",)


def test_retry_after_is_capped_by_max_timeout() -> None:
    machine = Machine("svc", BreakerConfig(timeout=30, max_timeout=60))
    result = machine.record(0, Outcome.RATE_LIMITED, 100.0, retry_after=86_400.0)
    assert result.transitions[0].open_until == 160.0
    uncapped = Machine("svc", BreakerConfig(timeout=30, max_timeout=None))
    result = uncapped.record(0, Outcome.RATE_LIMITED, 100.0, retry_after=86_400.0)
    assert result.transitions[0].open_until == 86_500.0
