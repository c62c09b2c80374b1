"""The pure decisions of a protected call (``breakerd.clients._plan``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from breakerd.clients import RateLimited
from breakerd.clients._plan import (
    ASK,
    PASS,
    RUN,
    admit,
    is_plain_success,
    needs_ack,
    report_for,
)
from breakerd.protocol import CircuitState, Outcome, Report, Snapshot

NAME = "svc"


def snap(state: CircuitState, open_until: float | None = None) -> Snapshot:
    return Snapshot(NAME, state, 3, open_until)


@pytest.mark.parametrize(
    ("state", "strict", "step"),
    [
        (CircuitState.CLOSED, False, RUN),
        (CircuitState.CLOSED, True, ASK),
        (CircuitState.DISABLED, False, PASS),
        (CircuitState.DISABLED, True, ASK),
        (CircuitState.HALF_OPEN, False, ASK),
        (CircuitState.OPEN, False, ASK),
    ],
)
def test_admit(state: CircuitState, strict: bool, step: int) -> None:
    assert admit(snap(state), strict) == step


@given(
    lease=st.sampled_from([0, 5]),
    duration=st.floats(0, 10),
    slow=st.sampled_from([None, 0.0, 1.0, 5.0]),
)
def test_a_plain_success_has_no_lease_and_is_not_slow(
    lease: int, duration: float, slow: float | None
) -> None:
    expected = lease == 0 and (slow is None or duration <= slow)
    assert is_plain_success(lease, duration, slow) is expected


@pytest.mark.parametrize(
    ("outcome", "lease", "ack"),
    [
        (Outcome.FAILURE, 0, True),
        (Outcome.FAILURE, 9, True),
        (Outcome.RATE_LIMITED, 0, True),
        (Outcome.SUCCESS, 9, True),  # a trial's success closes the breaker
        (Outcome.SUCCESS, 0, False),
        (Outcome.IGNORED, 0, False),
        (Outcome.IGNORED, 9, False),  # releases the lease, changes nothing
        (Outcome.CANCELLED, 9, False),
    ],
)
def test_what_waits_for_the_actor(outcome: Outcome, lease: int, ack: bool) -> None:
    assert needs_ack(Report(NAME, 3, outcome, 0.1, lease)) is ack


def test_the_report_for_each_verdict() -> None:
    assert report_for(NAME, Outcome.FAILURE, 3, 0, 0.25) == Report(NAME, 3, Outcome.FAILURE, 0.25)
    # A cancelled closed-state call holds nothing; a cancelled trial releases its lease.
    assert report_for(NAME, Outcome.CANCELLED, 3, 0, 0.25) is None
    assert report_for(NAME, Outcome.CANCELLED, 3, 7, 0.25) == Report(
        NAME, 3, Outcome.CANCELLED, 0.25, 7
    )
    limited = report_for(NAME, RateLimited(12.0, reason="quota", error_code="x"), 3, 0, 0.5)
    assert limited == Report(NAME, 3, Outcome.RATE_LIMITED, 0.5, 0, 12.0, "quota", "x")
    plain = report_for(NAME, RateLimited(2.0), 3, 0, 0.5)
    assert plain is not None
    assert plain.reason is None
