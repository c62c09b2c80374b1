"""The machine's LLM rules: open-until only grows, error classes, why it is open.

Pure machine, explicit instants: nothing sleeps.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor._machine import BreakerConfig, Machine
from breakerd.protocol import CircuitState, Outcome

CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN
RL = Outcome.RATE_LIMITED
F = Outcome.FAILURE


def make(**settings: Any) -> Machine:
    return Machine("svc", BreakerConfig(**settings))


def test_a_later_deadline_extends_an_open_breaker_with_a_new_generation() -> None:
    m = make(timeout=30)
    before = m.acquire(0.0).generation
    late = m.acquire(0.0).generation  # admitted before the opening, answers late
    (opened,) = m.record(before, RL, 10.0, retry_after=5.0, pid=11).transitions
    assert m.open_until == 15.0
    result = m.record(late, RL, 11.0, retry_after=20.0, pid=22)
    assert not result.counted  # stale for the window...
    (extended,) = result.transitions  # ...but its deadline wins
    assert (extended.from_state, extended.to_state) == (OPEN, OPEN)
    assert extended.generation == opened.generation + 1 == m.generation
    assert extended.open_until == 31.0 == m.open_until
    snapshot = m.snapshot()
    assert snapshot.open_until == 31.0
    assert snapshot.opened_by_pid == 22
    assert m.acquire(30.9).retry_after == pytest.approx(0.1)


@pytest.mark.parametrize("retry_after", [1.0, 4.0, None, -1.0, math.nan, math.inf])
def test_an_earlier_deadline_or_none_never_shortens_an_open(retry_after: float | None) -> None:
    m = make(timeout=30)
    generation = m.acquire(0.0).generation
    m.record(generation, RL, 10.0, retry_after=5.0)
    generation_open = m.generation
    result = m.record(generation, RL, 11.0, retry_after=retry_after)
    assert result.transitions == ()
    assert m.open_until == 15.0
    assert m.generation == generation_open
    assert m.failures == 2  # the books still count the late call


def test_extension_is_capped_by_max_timeout() -> None:
    m = make(timeout=30, max_timeout=60)
    generation = m.acquire(0.0).generation
    m.record(generation, RL, 0.0, retry_after=5.0)
    (t,) = m.record(generation, RL, 1.0, retry_after=86_400.0).transitions
    assert t.open_until == 61.0


def test_a_window_opening_is_extended_by_a_late_rate_limit_too() -> None:
    m = make(timeout=10, min_calls=1)
    generation = m.acquire(0.0).generation
    (t,) = m.record(generation, F, 0.0).transitions
    assert t.open_until == 10.0
    assert m.snapshot().reason == "failure_rate"
    result = m.record(generation, RL, 1.0, retry_after=30.0, error_code="rate_limit_exceeded")
    (t2,) = result.transitions
    assert t2.open_until == 31.0
    assert (m.snapshot().reason, m.snapshot().error_code) == ("rate_limited", "rate_limit_exceeded")


def test_forced_open_is_never_extended_or_moved() -> None:
    m = make()
    generation = m.acquire(0.0).generation
    m.force_open(0.0)
    assert m.record(generation, RL, 1.0, retry_after=30.0).transitions == ()
    assert m.state is CircuitState.FORCED_OPEN
    assert m.snapshot().reason == "forced_open"
    assert m.snapshot().opened_by_pid == 0


def test_quota_opens_for_quota_timeout_capped_by_it_not_by_max_timeout() -> None:
    m = make(timeout=30, max_timeout=60, quota_timeout=900)
    generation = m.acquire(0.0).generation
    (t,) = m.record(
        generation, RL, 0.0, reason="quota", error_code="insufficient_quota", pid=7
    ).transitions
    assert t.reason == "quota"
    assert t.open_until == 900.0
    snapshot = m.snapshot()
    assert (snapshot.reason, snapshot.error_code, snapshot.opened_by_pid) == (
        "quota",
        "insufficient_quota",
        7,
    )
    # A server's hint for a quota error is capped by quota_timeout, not max_timeout.
    m2 = make(timeout=30, max_timeout=60, quota_timeout=900)
    g2 = m2.acquire(0.0).generation
    (t2,) = m2.record(g2, RL, 0.0, retry_after=5000.0, reason="quota").transitions
    assert t2.open_until == 900.0


def test_quota_then_one_trial_at_its_deadline() -> None:
    m = make(quota_timeout=100, half_open_calls=1)
    generation = m.acquire(0.0).generation
    m.record(generation, RL, 0.0, reason="quota")
    assert not m.acquire(99.0).admitted
    trial = m.acquire(100.0)
    assert trial.admitted
    assert trial.lease
    assert m.state is HALF_OPEN
    assert m.snapshot().reason == "quota"  # half-open still says why it opened
    assert not m.acquire(100.0).admitted  # one trial only
    m.record(trial.generation, Outcome.SUCCESS, 100.5, lease=trial.lease)
    assert m.state is CLOSED
    snapshot = m.snapshot()
    assert (snapshot.reason, snapshot.error_code, snapshot.opened_by_pid) == (None, None, 0)


def test_a_late_quota_report_extends_a_rate_limit_open() -> None:
    m = make(timeout=30, quota_timeout=900)
    generation = m.acquire(0.0).generation
    m.record(generation, RL, 0.0, retry_after=5.0)
    (t,) = m.record(generation, RL, 1.0, reason="quota").transitions
    assert t.open_until == 901.0
    assert m.snapshot().reason == "quota"


def test_quota_timeout_must_be_a_finite_number() -> None:
    with pytest.raises(ValueError, match="quota_timeout"):
        BreakerConfig(quota_timeout=math.inf)
    with pytest.raises(ValueError, match="quota_timeout"):
        BreakerConfig(quota_timeout=-1)


def test_the_snapshot_reason_names_the_rate_that_tripped() -> None:
    m = make(min_calls=1, slow_call_duration=1.0, slow_call_threshold=0.5)
    generation = m.acquire(0.0).generation
    m.record(generation, Outcome.SUCCESS, 0.0, duration=2.0, pid=5)
    snapshot = m.snapshot()
    assert (snapshot.state, snapshot.reason, snapshot.opened_by_pid) == (OPEN, "slow_call_rate", 5)


def test_why_it_is_open_survives_export_and_restore() -> None:
    m = make(quota_timeout=900)
    generation = m.acquire(0.0).generation
    m.record(generation, RL, 0.0, reason="quota", error_code="insufficient_quota", pid=42)
    restored = Machine.restore(m.export_state(1.0))
    snapshot = restored.snapshot()
    assert (snapshot.reason, snapshot.error_code, snapshot.opened_by_pid) == (
        "quota",
        "insufficient_quota",
        42,
    )
    # A record written before the field existed restores without it.
    old = m.export_state(1.0)
    del old["why"]
    assert Machine.restore(old).snapshot().reason is None
    bad = m.export_state(1.0)
    bad["why"] = [1, None, 0]
    with pytest.raises(ValueError, match="why"):
        Machine.restore(bad)


@settings(max_examples=300, deadline=None)
@given(
    first=st.floats(0, 1000),
    late=st.lists(
        st.tuples(st.floats(0, 50), st.none() | st.floats(-10, 5000) | st.just(math.nan)),
        max_size=12,
    ),
)
def test_open_until_never_shrinks_under_late_rate_limits(
    first: float, late: list[tuple[float, float | None]]
) -> None:
    """Any run of late rate limits: the deadline is the max of the capped ones."""
    m = make(timeout=30, max_timeout=600)
    generation = m.acquire(0.0).generation
    m.record(generation, RL, 0.0, retry_after=first)
    now = 0.0
    expected = min(first, 600.0)
    for step, retry_after in late:
        now += step
        if m.state is not OPEN:
            break
        before = (m.open_until, m.generation)
        result = m.record(generation, RL, now, retry_after=retry_after)
        assert m.open_until is not None
        assert before[0] is not None
        assert m.open_until >= before[0]
        usable = retry_after is not None and math.isfinite(retry_after) and retry_after >= 0
        if usable and retry_after is not None and now + min(retry_after, 600.0) > expected:
            expected = now + min(retry_after, 600.0)
            assert m.generation == before[1] + 1
            assert len(result.transitions) == 1
        else:
            assert m.generation == before[1]
            assert result.transitions == ()
        assert m.open_until == expected
