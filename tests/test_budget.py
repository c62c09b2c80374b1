"""The pure budgets: rates parsed, paced admissions, leases, header-fed pacing, the ramp."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor._budget import (
    RAMP_STEP,
    SAFETY_MARGIN,
    ConcurrencyBudget,
    HeaderBudget,
    RateBudget,
    parse_rate,
    ramp_offset,
)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("20/s", 20.0),
        ("500/min", 500 / 60),
        ("1000/hour", 1000 / 3600),
        ("3/10s", 0.3),
        (" 2 / sec ", 2.0),
        ("90/minutes", 1.5),
        ("86400/day", 1.0),
        ("1.5/s", 1.5),
    ],
)
def test_rates_parse(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["20", 20, "0/s", "20/fortnight", "/s", "-1/s", "20/0s", None, ""])
def test_a_bad_rate_says_what_is_accepted(bad: object) -> None:
    with pytest.raises(ValueError, match=r"max_rate must be a string like '500/min'"):
        parse_rate(bad)


def test_rate_budget_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="burst must be an integer >= 1"):
        RateBudget(20.0, burst=0)
    with pytest.raises(ValueError, match="rate must be"):
        RateBudget(0.0)


def test_calls_are_paced_at_the_margin_not_released_at_once() -> None:
    budget = RateBudget(20.0)
    leaves = [budget.reserve(100.0, max_wait=10.0) for _ in range(5)]
    gap = 1 / (20 * SAFETY_MARGIN)
    assert leaves == pytest.approx([100.0 + i * gap for i in range(5)])
    # Past the wait: refused, and nothing reserved.
    assert budget.reserve(100.0, max_wait=0.0) is None
    assert budget.next_free(100.0) == pytest.approx(100.0 + 5 * gap)


def test_burst_after_an_idle_spell() -> None:
    budget = RateBudget(10.0, burst=3)
    assert [budget.reserve(50.0) for _ in range(3)] == [50.0, 50.0, 50.0]
    assert budget.reserve(50.0) is None
    # A long idle spell earns the burst back, never more than it.
    assert [budget.reserve(60.0) for _ in range(3)] == [60.0, 60.0, 60.0]
    assert budget.reserve(60.0) is None


def test_a_waiter_that_gives_up_returns_the_last_slot() -> None:
    budget = RateBudget(10.0)
    first = budget.reserve(0.0, 5.0)
    second = budget.reserve(0.0, 5.0)
    assert first is not None
    assert second is not None
    budget.give_back(second)
    assert budget.reserve(0.0, 5.0) == second
    budget.give_back(first)  # not the last: stays spent
    assert budget.next_free(0.0) > second


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 200.0),
    burst=st.integers(1, 10),
    asks=st.lists(st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 2.0), st.booleans()), max_size=120),
)
def test_never_more_than_rate_times_t_plus_burst_in_any_window(
    rate: float, burst: int, asks: list[tuple[float, float, bool]]
) -> None:
    budget = RateBudget(rate, burst)
    now = 0.0
    leaves: list[float] = []
    for step, wait, give_up in asks:
        now += step
        leave = budget.reserve(now, wait)
        if leave is None:
            assert budget.next_free(now) - now > wait
            continue
        assert now <= leave <= now + wait + 1e-9
        if give_up:
            budget.give_back(leave)
        else:
            leaves.append(leave)
    leaves.sort()
    paced = rate * SAFETY_MARGIN
    for i in range(len(leaves)):
        for j in range(i, len(leaves)):
            # j - i + 1 calls left within a window of this length.
            assert j - i + 1 <= paced * (leaves[j] - leaves[i]) + burst + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 5),
    ops=st.lists(st.tuples(st.sampled_from(["acquire", "release", "leave"]), st.integers(0, 3))),
)
def test_concurrency_never_exceeds_the_limit(limit: int, ops: list[tuple[str, int]]) -> None:
    budget = ConcurrencyBudget(limit)
    model: dict[int, int] = {}  # lease -> holder
    for op, holder in ops:
        if op == "acquire":
            lease = budget.acquire(holder)
            if len(model) < limit:
                assert lease is not None
                assert lease not in model
                model[lease] = holder
            else:
                assert lease is None
        elif op == "release" and model:
            lease = sorted(model)[holder % len(model)]
            assert budget.release(lease)
            assert not budget.release(lease)  # twice: nothing
            del model[lease]
        elif op == "leave":
            gone = [lease for lease, owner in model.items() if owner == holder]
            assert budget.release_holder(holder) == len(gone)
            for lease in gone:
                del model[lease]
        assert budget.in_use == len(model) <= limit


def test_concurrency_refuses_a_bad_limit() -> None:
    with pytest.raises(ValueError, match="max_concurrent must be an integer >= 1"):
        ConcurrencyBudget(0)


def test_headers_with_plenty_left_admit_at_once() -> None:
    budget = HeaderBudget()
    budget.observe(0.0, remaining_requests=100, reset_requests=60.0, limit_requests=100)
    assert [budget.reserve(0.0) for _ in range(10)] == [0.0] * 10
    assert budget.remaining_requests(0.0) == 90


def test_headers_running_low_spread_the_rest_over_the_reset() -> None:
    budget = HeaderBudget(low_water=0.2)
    budget.observe(0.0, remaining_requests=4, reset_requests=1.0, limit_requests=20)
    leaves = [budget.reserve(0.0, max_wait=5.0) for _ in range(4)]
    assert leaves[0] == 0.0
    assert all(b is not None and a is not None and b > a for a, b in itertools.pairwise(leaves))
    assert all(leave is not None and leave < 1.0 for leave in leaves)
    # None left: wait for the reset, then leave one by one, not all at once.
    after = [budget.reserve(0.0, max_wait=5.0) for _ in range(3)]
    assert after[0] is not None
    assert after[0] >= 1.0
    assert after[1] is not None
    assert after[2] is not None
    assert after[0] < after[1] < after[2]
    assert budget.reserve(0.0, max_wait=0.5) is None


def test_calls_in_flight_are_subtracted_from_what_a_response_said() -> None:
    budget = HeaderBudget(min_low_water=0)
    for _ in range(5):
        budget.reserve(0.0)
    # One of the five answered: the other four were probably not counted yet.
    budget.observe(0.01, remaining_requests=6, reset_requests=1.0)
    budget.done(0.01)
    assert budget.remaining_requests(0.01) == 2


def test_tokens_wait_for_their_reset_and_usage_corrects_the_estimate() -> None:
    budget = HeaderBudget()
    budget.observe(0.0, remaining_tokens=1000, reset_tokens=2.0)
    assert budget.reserve(0.0, tokens=800) == 0.0
    assert budget.reserve(0.0, tokens=800) is None  # 200 left
    budget.done(0.1, estimated_tokens=800, used_tokens=100)
    assert budget.remaining_tokens(0.1) == 900
    assert budget.reserve(0.1, tokens=800) == 0.1
    assert budget.reserve(0.2, max_wait=5.0, tokens=800) == 2.0


def test_headers_are_forgotten_after_their_reset() -> None:
    budget = HeaderBudget()
    budget.observe(0.0, remaining_requests=0, reset_requests=1.0)
    assert budget.reserve(0.5) is None
    assert budget.reserve(2.0) == 2.0
    assert math.isinf(budget.remaining_requests(2.0))


@settings(max_examples=300, deadline=None)
@given(
    remaining=st.integers(0, 30),
    reset=st.floats(0.05, 5.0),
    limit=st.one_of(st.none(), st.integers(1, 60)),
    asks=st.lists(st.tuples(st.floats(0.0, 0.3), st.floats(0.0, 3.0)), max_size=80),
)
def test_headers_never_spend_more_than_was_left_before_the_reset(
    remaining: int, reset: float, limit: int | None, asks: list[tuple[float, float]]
) -> None:
    budget = HeaderBudget()
    budget.observe(0.0, remaining_requests=remaining, reset_requests=reset, limit_requests=limit)
    now = 0.0
    before_reset = 0
    leaves: list[float] = []
    for step, wait in asks:
        now += step
        leave = budget.reserve(now, wait)
        if leave is None:
            continue
        assert now <= leave <= now + wait + 1e-9
        leaves.append(leave)
        before_reset += leave < reset
    assert before_reset <= remaining


def test_the_ramp_doubles_every_step() -> None:
    offsets = [ramp_offset(i) for i in range(15)]
    assert offsets == pytest.approx(
        [0.0] + [RAMP_STEP] * 2 + [2 * RAMP_STEP] * 4 + [3 * RAMP_STEP] * 8
    )
    assert ramp_offset(999) == pytest.approx(9 * RAMP_STEP)  # 1,000 waiters out in under 1 s
    with pytest.raises(ValueError, match="index must be >= 0"):
        ramp_offset(-1)
