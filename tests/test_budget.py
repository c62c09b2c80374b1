"""The pure budgets: rates parsed, paced admissions, leases, header-fed pacing, the ramp."""

from __future__ import annotations

import itertools
import math

import msgpack
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
from breakerd.actor._budget_table import BudgetTable
from breakerd.actor._tokens import SLACK
from breakerd.protocol import (
    BudgetGrant,
    BudgetRequest,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
)
from breakerd.protocol._codec import decode_message, encode_request, encode_response


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
    budget.observe(0.0, remaining_requests=100, reset_requests=60.0)
    assert [budget.reserve(0.0) for _ in range(10)] == [0.0] * 10
    assert budget.remaining_requests(0.0) == 90


def test_a_known_limit_is_never_outpaced() -> None:
    # 20 a second: even with all of it left, calls leave at the limit's own
    # pace (at the margin), not in one burst that would fill the window.
    budget = HeaderBudget()
    budget.observe(0.0, remaining_requests=20, reset_requests=1.0, limit_requests=20)
    leaves = [budget.reserve(0.0, max_wait=5.0) for _ in range(5)]
    gap = 1.0 / (20 * SAFETY_MARGIN)
    assert leaves == pytest.approx([i * gap for i in range(5)])


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
    # The call at 0.1 keeps the window from emptying for a window after it
    # (as a sliding window's reset moves), at the safety margin or SLACK more.
    gap = max(2.0 / SAFETY_MARGIN, 2.0 + SLACK)
    assert budget.reserve(0.2, max_wait=5.0, tokens=800) == pytest.approx(0.1 + gap)


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


def test_budget_messages_round_trip_and_bad_ones_are_refused() -> None:
    request = BudgetRequest(
        "LLM",
        20.0,
        2,
        3,
        want=4,
        wait=1.5,
        tokens=100.0,
        lease=True,
        release=(7, 9),
        done=2,
        started=1,
        tokens_back=50.0,
        limits=(("remaining_requests", 3.0), ("reset_requests", 0.5)),
    )
    decoded = decode_message(msgpack.unpackb(msgpack.packb(encode_request(5, request))))
    assert isinstance(decoded, RequestReceived)
    assert decoded.message == request
    grant = BudgetGrant((1.0, 1.05), 4, "rate_budget", 0.2)
    answer = decode_message(msgpack.unpackb(msgpack.packb(encode_response(5, grant))))
    assert isinstance(answer, ResponseReceived)
    assert answer.result == grant
    for bad in (
        {"name": "x", "release": [0]},
        {"name": "x", "limits": {"remaining_bananas": 1}},
        {"name": "x", "want": -1},
        {"name": "x", "rate": float("nan")},
        {"name": 3},
    ):
        with pytest.raises(RemoteProtocolError):
            decode_message([0, 1, "budget", bad])


def test_the_daemons_table_shares_slots_in_turn_and_frees_a_leavers_leases() -> None:
    table = BudgetTable()
    ask = BudgetRequest("LLM", 20.0, 1, 2, want=10, wait=5.0)
    first = table.handle("a", ask, 0.0)
    second = table.handle("b", ask, 0.0)
    # Alone, a process gets 20/s * 0.25 s; with two asking, half that each,
    # and the second's slots come after the first's (in turn).
    assert len(first.slots) == 5
    assert len(second.slots) == 3
    assert min(second.slots) > max(first.slots)
    lease_a = table.handle("a", BudgetRequest("LLM", lease=True), 0.0).lease
    lease_b = table.handle("b", BudgetRequest("LLM", lease=True), 0.0).lease
    assert lease_a
    assert lease_b
    refused = table.handle("c", BudgetRequest("LLM", lease=True), 0.0)
    assert (refused.lease, refused.reason) == (0, "concurrency")
    # Another's lease cannot be released by a stranger; a leaver's are freed.
    table.handle("c", BudgetRequest("LLM", release=(lease_a,)), 0.0)
    assert table.in_use("LLM") == 2
    assert table.forget("a") == 1
    assert table.handle("c", BudgetRequest("LLM", lease=True), 0.0).lease
    # Past the wait: refused with when to ask again.
    late = table.handle("d", BudgetRequest("LLM", want=1, wait=0.0), 0.0)
    assert late.slots == ()
    assert late.reason == "rate_budget"
    assert late.retry_after is not None
    assert late.retry_after > 0
