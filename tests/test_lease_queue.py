"""Concurrency leases waiting in line, and the host's one recovery ramp: the daemon's table, pure.

The table (``BudgetTable.handle_or_park``, ``handed``, ``forget``) is run
against a model of a first-come, first-served line: asks, releases,
holders going away and time passing, in any order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor._budget import RAMP_STEP, ConcurrencyBudget, ramp_offset
from breakerd.actor._budget_table import BudgetTable
from breakerd.actor._lease_queue import LeaseQueue
from breakerd.protocol import (
    BudgetGrant,
    BudgetRequest,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
)
from breakerd.protocol._codec import decode_message, encode_request, encode_response

NAME = "bulkhead"


def ask(limit: int, wait: float) -> BudgetRequest:
    return BudgetRequest(NAME, max_concurrent=limit, lease=True, wait=wait)


def test_a_lease_asked_for_with_a_wait_waits_in_line_and_gets_the_next_one_freed() -> None:
    table = BudgetTable()
    held = table.handle_or_park("a", 1, ask(1, 5.0), 0.0)
    assert held is not None
    assert held.lease
    # None free: parked, not refused; a second waiter lines up behind it.
    assert table.handle_or_park("b", 7, ask(1, 5.0), 0.1) is None
    assert table.handle_or_park("c", 8, ask(1, 5.0), 0.2) is None
    assert table.handed(0.3) == []
    assert table.next_deadline() == pytest.approx(5.1)
    # A newcomer that finds the line does not jump it, even with a lease
    # freed in the same request.
    assert table.handle_or_park("a", 2, BudgetRequest(NAME, release=(held.lease,)), 0.4)
    [(holder, token, grant)] = table.handed(0.4)
    assert (holder, token, grant.reason) == ("b", 7, None)
    assert grant.lease
    assert table.in_use(NAME) == 1
    assert table.handle_or_park("a", 3, ask(1, 5.0), 0.5) is None  # behind c
    # b's process goes away: its lease to the oldest waiter, c.
    assert table.forget("b", 0.6) == 1
    [(holder, token, grant)] = table.handed(0.6)
    assert (holder, token) == ("c", 8)
    assert grant.lease


def test_a_waiter_whose_wait_runs_out_is_refused_at_its_deadline() -> None:
    table = BudgetTable()
    assert table.handle_or_park("a", 1, ask(1, 5.0), 0.0) is not None
    assert table.handle_or_park("b", 2, ask(1, 0.5), 0.0) is None
    assert table.handed(0.49) == []
    [(holder, token, grant)] = table.handed(0.5)
    assert (holder, token) == ("b", 2)
    assert grant == BudgetGrant((), 0, "concurrency", None)
    assert table.next_deadline() == math.inf  # the timer is armed only while someone waits


def test_without_a_wait_or_a_token_a_lease_is_refused_at_once() -> None:
    table = BudgetTable()
    assert table.handle("a", ask(1, 0.0), 0.0).lease
    assert table.handle_or_park("b", 1, ask(1, 0.0), 0.0) == BudgetGrant((), 0, "concurrency", None)
    assert table.handle("b", ask(1, 5.0), 0.0).reason == "concurrency"  # handle never parks


def test_a_closing_connections_waiters_are_dropped_unanswered() -> None:
    table = BudgetTable()
    assert table.handle_or_park("a", 1, ask(1, 5.0), 0.0) is not None
    assert table.handle_or_park("b", 2, ask(1, 5.0), 0.0) is None
    assert table.handle_or_park("c", 3, ask(1, 5.0), 0.0) is None
    table.forget("b", 0.1)
    assert table.handed(10.0) == [("c", 3, BudgetGrant((), 0, "concurrency", None))]


@dataclass
class Model:
    """A first-come, first-served line in front of ``limit`` leases."""

    limit: int
    held: dict[int, str] = field(default_factory=dict)
    line: list[tuple[str, int, float]] = field(default_factory=list)

    def hand_over(self, now: float, answers: list[tuple[str, int, str]]) -> None:
        while self.line and len(self.held) < self.limit:
            holder, token, deadline = self.line.pop(0)
            answers.append((holder, token, "granted" if deadline > now else "refused"))
            if deadline > now:
                self.held[-token] = holder  # its lease id is learned from the table

    def expire(self, now: float, answers: list[tuple[str, int, str]]) -> None:
        for holder, token, deadline in list(self.line):
            if deadline <= now:
                self.line.remove((holder, token, deadline))
                answers.append((holder, token, "refused"))


HOLDERS = ("p0", "p1", "p2", "p3")
actions = st.lists(
    st.one_of(
        st.tuples(st.just("ask"), st.sampled_from(HOLDERS), st.sampled_from([0.0, 0.3, 1.0])),
        st.tuples(st.just("release"), st.integers(0, 7), st.just(0.0)),
        st.tuples(st.just("forget"), st.sampled_from(HOLDERS), st.just(0.0)),
        st.tuples(st.just("tick"), st.just(""), st.sampled_from([0.05, 0.2, 0.6])),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 3), steps=actions)
def test_leases_go_first_come_first_served_and_never_over_the_limit(
    limit: int, steps: list[tuple[str, str | int, float]]
) -> None:
    table = BudgetTable()
    model = Model(limit)
    tokens = itertools.count(1)
    now = 0.0
    for action, who, amount in steps:
        expected: list[tuple[str, int, str]] = []
        if action == "ask":
            holder = str(who)
            token = next(tokens)
            answer = table.handle_or_park(holder, token, ask(limit, amount), now)
            if not model.line and len(model.held) < limit:
                assert answer is not None
                assert answer.lease
                assert answer.lease not in model.held
                model.held[answer.lease] = holder
            elif amount > 0:
                assert answer is None  # waits in line
                model.line.append((holder, token, now + amount))
            else:
                assert answer is not None
                assert answer.reason == "concurrency"
        elif action == "release":
            if not model.held:
                continue
            lease = sorted(model.held)[int(who) % len(model.held)]
            holder = model.held.pop(lease)
            table.handle(holder, BudgetRequest(NAME, release=(lease,)), now)
            model.hand_over(now, expected)
        elif action == "forget":
            holder = str(who)
            model.line = [w for w in model.line if w[0] != holder]
            mine = [lease for lease, owner in model.held.items() if owner == holder]
            for lease in mine:
                del model.held[lease]
            assert table.forget(holder, now) == len(mine)
            model.hand_over(now, expected)
        else:
            now += amount
        model.expire(now, expected)
        got = table.handed(now)
        assert [(h, t, "refused" if g.reason else "granted") for h, t, g in got] == expected
        for owner, ticket, grant in got:
            if grant.reason is None:
                assert isinstance(ticket, int)
                assert grant.lease not in model.held
                assert model.held.pop(-ticket) == owner
                model.held[grant.lease] = str(owner)
        assert table.in_use(NAME) == len(model.held) <= limit
        deadlines = [deadline for _, _, deadline in model.line]
        assert table.next_deadline() == min(deadlines, default=math.inf)


def test_the_queue_alone_hands_leases_to_the_oldest_waiter_within_its_deadline() -> None:
    leases = ConcurrencyBudget(1)
    queue = LeaseQueue()
    first = leases.acquire("a")
    assert first is not None
    queue.park("b", 1, 1.0)
    queue.park("c", 2, 3.0)
    leases.release(first)
    granted, expired = queue.hand_over(leases, 2.0)
    assert [w.token for w in expired] == [1]  # its wait had run out
    assert [(w.token, leases.owner(lease)) for w, lease in granted] == [(2, "c")]
    assert len(queue) == 0


def test_the_hosts_recovery_ramp_is_one_for_every_process() -> None:
    table = BudgetTable()

    def place(holder: str, generation: int, now: float) -> float | None:
        return table.handle(
            holder, BudgetRequest(NAME, ramp=True, generation=generation), now
        ).ramp_at

    # Waiters of four processes, asking in turn: one ramp, not four.
    places = [place(f"p{i % 4}", 6, 10.0 + i * 0.001) for i in range(8)]
    assert places == [10.0 + ramp_offset(i) for i in range(8)]
    assert places.count(10.0) == 1
    assert place("p0", 8, 20.0) == 20.0  # a new recovery, a new ramp
    assert place("p1", 8, 20.01) == 20.0 + RAMP_STEP
    assert table.handle("p0", BudgetRequest(NAME), 20.0).ramp_at is None


def test_a_ramp_place_travels_both_ways_and_bad_ones_are_refused() -> None:
    request = BudgetRequest(NAME, ramp=True, generation=2**40)
    decoded = decode_message(msgpack.unpackb(msgpack.packb(encode_request(5, request))))
    assert isinstance(decoded, RequestReceived)
    assert decoded.message == request
    grant = BudgetGrant(ramp_at=12.5)
    answer = decode_message(msgpack.unpackb(msgpack.packb(encode_response(5, grant))))
    assert isinstance(answer, ResponseReceived)
    assert answer.result == grant
    for bad in ({"name": "x", "ramp": 1}, {"name": "x", "generation": -1}):
        with pytest.raises(RemoteProtocolError, match=r"ramp|generation"):
            decode_message([0, 1, "budget", bad])
    with pytest.raises(RemoteProtocolError, match="ramp_at"):
        decode_message([1, 5, None, {"type": "budget_grant", "ramp_at": "soon"}])
