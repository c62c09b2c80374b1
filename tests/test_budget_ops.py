"""Budgets in operation: the daemon's entries are reclaimed, budgets show in status,
and the token count's rules (end to end in test_budgets_tokens.py).

Logic on the daemon's ``BudgetTable`` and a breaker's ``Budgets`` with
``now`` passed in (fake clocks); the daemon's side with a real daemon and
real sockets; the command line as a real process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, RawClient, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor import ActorSystem
from breakerd.actor._budget import HeaderBudget, RateBudget
from breakerd.actor._budget_table import ACTIVE_WINDOW, BudgetTable
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker
from breakerd.protocol import BudgetExceededError, BudgetRequest, BudgetStatus

# -- the daemon's table: reclaimed when quiet ------------------------------------------


def test_a_quiet_entry_is_reclaimed_and_the_next_asker_fixes_its_settings() -> None:
    table = BudgetTable()
    ask = BudgetRequest("LLM", rate=20.0, burst=1, max_concurrent=2, want=1, wait=5.0)
    assert table.answer("a", ask, 0.0).slots == (0.0,)
    lease = table.answer("a", BudgetRequest("LLM", lease=True), 0.0).lease
    assert lease
    assert not table.quiet("LLM", 0.5)  # asked a moment ago
    assert not table.reclaim("LLM", 100.0)  # a lease is held
    table.answer("a", BudgetRequest("LLM", release=(lease,)), 100.0)
    assert not table.reclaim("LLM", 100.0 + ACTIVE_WINDOW / 2)  # asked within ACTIVE_WINDOW
    assert table.reclaim("LLM", 100.0 + ACTIVE_WINDOW * 2)
    assert len(table) == 0
    assert table.status("LLM", 200.0) is None
    # Whoever asks next fixes the settings again.
    table.answer("b", BudgetRequest("LLM", rate=5.0, want=1), 200.0)
    status = table.status("LLM", 200.0)
    assert status is not None
    assert (status.max_rate, status.max_concurrent) == (5.0, None)


def test_an_entry_with_slots_reserved_ahead_is_kept_until_they_are_past() -> None:
    table = BudgetTable()
    ask = BudgetRequest("LLM", rate=1.0, want=1, wait=100.0)
    leaves = [table.answer("a", ask, 0.0).slots[0] for _ in range(5)]
    assert leaves[-1] > 4.0
    table.forget("a")  # its process went away: its slots stay reserved
    assert not table.reclaim("LLM", 3.0)
    assert table.reclaim("LLM", leaves[-1] + 2.0)


def test_forgetting_a_holder_does_not_reclaim_what_others_hold() -> None:
    table = BudgetTable()
    table.answer("a", BudgetRequest("LLM", max_concurrent=1, lease=True), 0.0)
    table.forget("b")
    assert not table.reclaim("LLM", 50.0)
    assert table.forget("a") == 1
    assert table.reclaim("LLM", 50.0)


# -- what status shows -------------------------------------------------------------------


def test_the_tables_status_shows_settings_leases_headers_and_refusals() -> None:
    table = BudgetTable()
    limits = (
        ("remaining_requests", 50.0),
        ("reset_requests", 2.0),
        ("remaining_tokens", 9000.0),
        ("reset_tokens", 30.0),
    )
    ask = BudgetRequest("LLM", rate=2.0, burst=1, max_concurrent=1, limits=limits)
    table.answer("a", ask, 0.0)
    assert table.answer("a", BudgetRequest("LLM", lease=True), 0.0).lease
    refused = table.answer("b", BudgetRequest("LLM", lease=True), 0.0)
    assert refused.reason == "concurrency"
    # Two slots: the first now, the next waits its turn; a third is refused.
    assert len(table.answer("a", BudgetRequest("LLM", want=1, wait=5.0), 0.0).slots) == 1
    assert len(table.answer("a", BudgetRequest("LLM", want=1, wait=5.0), 0.0).slots) == 1
    assert table.answer("b", BudgetRequest("LLM", want=1, wait=0.0), 0.0).reason == "rate_budget"
    status = table.status("LLM", 0.5)
    assert status == BudgetStatus(
        max_rate=2.0,
        burst=1,
        max_concurrent=1,
        leases_in_use=1,
        waiters=1,
        remaining_requests=48.0,
        remaining_tokens=9000.0,
        reset_requests=1.5,
        reset_tokens=29.5,
        rate_rejections=1,
        concurrency_rejections=1,
    )
    # Past the resets the headers say nothing any more: absent, not stale.
    later = table.status("LLM", 40.0)
    assert later is not None
    assert (later.remaining_requests, later.reset_requests) == (None, None)
    assert (later.remaining_tokens, later.reset_tokens) == (None, None)
    assert later.waiters == 0


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 50.0),
    burst=st.integers(1, 5),
    asks=st.lists(st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 3.0)), max_size=40),
    look=st.floats(0.0, 5.0),
)
def test_backlog_counts_the_reserved_slots_still_ahead(
    rate: float, burst: int, asks: list[tuple[float, float]], look: float
) -> None:
    budget = RateBudget(rate, burst)
    now = 0.0
    leaves = []
    for step, wait in asks:
        now += step
        leave = budget.reserve(now, wait)
        if leave is not None:
            leaves.append(leave)
    at = now + look
    # Within rounding of the slot instants.
    ahead = sum(leave > at + 1e-6 for leave in leaves)
    assert budget.backlog(at) in range(ahead, sum(leave > at - 1e-6 for leave in leaves) + 1)


def test_an_embedded_breakers_status_shows_its_budgets(
    system: ActorSystem, clock: FakeClock
) -> None:
    plain = CircuitBreaker("plain", system=system)
    assert plain.status().budget is None
    breaker = CircuitBreaker("api", max_rate="2/s", max_concurrent=3, system=system)
    breaker.call_sync(lambda: 1)
    with pytest.raises(BudgetExceededError):
        breaker.call_sync(lambda: 1)  # the next slot is half a second away
    breaker.observe_limits(remaining_requests=7, reset_requests=4.0)
    budget = breaker.status().budget
    assert budget is not None
    assert (budget.max_rate, budget.burst, budget.max_concurrent) == (2.0, 1, 3)
    assert budget.leases_in_use == 0
    assert budget.remaining_requests == 7
    assert budget.reset_requests == 4.0
    assert budget.remaining_tokens is None
    assert (budget.rate_rejections, budget.concurrency_rejections) == (1, 0)


def test_an_embedded_breakers_status_counts_lease_refusals_and_waiters(system: ActorSystem) -> None:
    breaker = CircuitBreaker("bulkhead", max_concurrent=1, system=system)
    seen: list[BudgetStatus | None] = []

    def inner() -> int:
        seen.append(breaker.status().budget)
        with pytest.raises(BudgetExceededError):
            breaker.call_sync(lambda: 2)
        return 1

    assert breaker.call_sync(inner) == 1
    during = seen[0]
    assert during is not None
    assert (during.leases_in_use, during.max_rate) == (1, None)
    after = breaker.status().budget
    assert after is not None
    assert (after.leases_in_use, after.concurrency_rejections) == (0, 1)


# -- tokens: what a count says, and who waits for which window --------------------------


def test_calls_in_flight_are_subtracted_from_a_token_count() -> None:
    budget = HeaderBudget()
    budget.observe(0.0, remaining_tokens=1000, reset_tokens=2.0, limit_tokens=1000)
    for _ in range(3):
        assert budget.reserve(0.0, tokens=100) == 0.0
    # The first call's response: it arrived before the other two.
    budget.observe(0.01, remaining_tokens=900, reset_tokens=2.0)
    assert budget.remaining_tokens(0.01) == 700


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(100, 2000),
    window=st.floats(0.5, 5.0),
    asks=st.lists(
        st.tuples(st.floats(0.0, 0.3), st.integers(1, 400), st.floats(0.0, 12.0)), max_size=60
    ),
)
def test_calls_waiting_for_the_token_reset_never_overspend_a_window(
    limit: int, window: float, asks: list[tuple[float, int, float]]
) -> None:
    # A fresh window as the API said it: ``limit`` tokens, empty again
    # ``window`` seconds after its last call (a sliding window).
    budget = HeaderBudget()
    budget.observe(0.0, remaining_tokens=limit, reset_tokens=window, limit_tokens=limit)
    now = 0.0
    sent: list[tuple[float, int]] = []
    for step, asked, wait in asks:
        now += step
        tokens = min(asked, limit)  # (a call costing more than a window never fits one)
        leave = budget.reserve(now, wait, tokens)
        if leave is not None:
            assert leave >= now
            sent.append((leave, tokens))
    sent.sort()
    for i, (start, _) in enumerate(sent):
        spent = sum(tokens for at, tokens in sent[i:] if at < start + window)
        assert spent <= limit or math.isclose(spent, limit)


# -- the daemon ----------------------------------------------------------------------------


def configured_daemon(tmp_short: Path, daemon_section: str) -> DaemonProcess:
    config = tmp_short / "d.toml"
    config.write_text(f"[daemon]\n{daemon_section}\n")
    return DaemonProcess(tmp_short / "s.sock", config=config).wait_ready(started_log=True)


def test_the_daemon_reclaims_an_idle_breakers_budgets_with_it(tmp_short: Path) -> None:
    process = configured_daemon(tmp_short, "breaker_idle_timeout = 0.2")
    try:
        keeper = RawClient(process.socket_path)
        keeper.register("held")
        leaver = RawClient(process.socket_path)
        leaver.register("LLM")
        grant = leaver.request(BudgetRequest("LLM", rate=20.0, max_concurrent=2, lease=True))
        assert grant.lease
        budget = keeper.status("LLM").breakers[0].budget
        assert budget is not None
        assert (budget.max_rate, budget.leases_in_use) == (20.0, 1)
        leaver.close()  # its lease goes with it, then the idle breaker, then its budgets

        def names() -> set[str]:
            return {b.snapshot.name for b in keeper.status().breakers}

        wait_for(lambda: "LLM" not in names(), what="the idle breaker to be reclaimed")
        # Registered again: new budgets, fixed by whoever asks first now.
        keeper.register("LLM")
        keeper.request(BudgetRequest("LLM", rate=5.0, want=1))
        again = keeper.status("LLM").breakers[0].budget
        assert again is not None
        assert (again.max_rate, again.max_concurrent, again.leases_in_use) == (5.0, None, 0)
        keeper.close()
        assert process.terminate() == 0
    finally:
        process.kill()


def test_breakerd_status_shows_the_host_wide_budgets(tmp_short: Path) -> None:
    process = DaemonProcess(tmp_short / "s.sock").wait_ready(started_log=True)
    try:
        client = RawClient(process.socket_path)
        client.register("LLM")
        client.register("plain")
        limits = (("remaining_tokens", 5000.0), ("reset_tokens", 60.0))
        client.request(BudgetRequest("LLM", max_concurrent=3, lease=True, limits=limits))

        def run(*args: str) -> str:
            return subprocess.run(
                [sys.executable, "-m", "breakerd.clients", "status", *args],
                capture_output=True,
                text=True,
                check=True,
                env={"BREAKERD_SOCKET": str(process.socket_path), "PATH": "/usr/bin:/bin"},
            ).stdout

        records = {r["name"]: r for r in json.loads(run("--json"))}
        assert "budget" not in records["plain"]
        budget = records["LLM"]["budget"]
        assert budget["max_concurrent"] == 3
        assert budget["leases_in_use"] == 1
        assert budget["max_rate"] is None
        assert budget["remaining_tokens"] == 5000.0
        assert 0 < budget["reset_tokens"] <= 60.0
        table = run()
        header, *rows = table.splitlines()
        assert header.split()[-1] == "BUDGET"
        llm = next(row for row in rows if row.startswith("LLM"))
        assert "leases 1/3" in llm
        assert "5000 tok left" in llm
        client.close()
    finally:
        process.kill()


def test_a_lease_waiting_in_line_shows_in_status_and_its_refusal_is_counted() -> None:
    table = BudgetTable()
    ask = BudgetRequest("line", max_concurrent=1, lease=True, wait=1.0)
    held = table.answer_or_park("a", 1, ask, 0.0)
    assert held is not None
    assert held.lease
    assert table.answer_or_park("b", 2, ask, 0.0) is None  # waits in line
    status = table.status("line", 0.5)
    assert status is not None
    assert status.waiters == 1
    assert status.concurrency_rejections == 0
    # Its wait runs out: answered with the refusal, and counted as one.
    assert [grant.reason for _, _, grant in table.handed(1.5)] == ["concurrency"]
    status = table.status("line", 1.5)
    assert status is not None
    assert status.waiters == 0
    assert status.concurrency_rejections == 1
