"""The budgets' sync paths are generated from their async sources, and cannot drift.

``scripts/unasync.py`` writes every sync module of a pair from its async
source; ``--check`` (``.ci/run`` and this file) fails when a sync module is
not what its source generates.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breakerd.actor import ActorSystem
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError
from breakerd.clients._budget_link import DaemonBudgets
from breakerd.clients._budgeted import current_ticket
from breakerd.clients._budgets import Budgets, Ticket
from breakerd.protocol import BudgetExceededError, BudgetGrant

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "unasync.py"

#: (async source, generated sync module) of the budgets.
BUDGET_PAIRS = [
    ("clients/_admit_async.py", "clients/_admit_sync.py"),
    ("clients/_budgeted_async.py", "clients/_budgeted_sync.py"),
    ("clients/_budget_link_async.py", "clients/_budget_link_sync.py"),
    ("clients/_scope_first_async.py", "clients/_scope_first_sync.py"),
]


def _unasync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_check_covers_the_budgets_pairs() -> None:
    pairs = {(pair.source, pair.target) for pair in _unasync().PAIRS}
    assert set(BUDGET_PAIRS) <= pairs
    assert ("clients/_calls_async.py", "clients/_calls_sync.py") in pairs


def test_every_generated_module_is_what_its_source_generates() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("source", "target"), BUDGET_PAIRS)
def test_an_edit_to_one_side_only_fails_the_check(tmp_path: Path, source: str, target: str) -> None:
    # A copy of the tree's pairs, with the sync side edited by hand.
    unasync = _unasync()
    for pair in unasync.PAIRS:
        for name in (pair.source, pair.target):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, tmp_path / name)
    assert unasync.stale(tmp_path) == []
    edited = tmp_path / target
    edited.write_text(edited.read_text().replace("deadline", "dead_line", 1))
    found = unasync.stale(tmp_path)
    assert len(found) == 1
    assert target in found[0]
    assert f"edit {source} only" in found[0]


# -- the call path itself ----------------------------------------------------------------------


def test_a_nested_call_leaves_the_outer_calls_usage_to_the_outer_call(
    system: ActorSystem, clock: FakeClock
) -> None:
    # The outer call's usage, fed after a nested call of the same breaker
    # ended, corrects the outer call's own estimate.
    breaker = CircuitBreaker("nested-usage", system=system)
    breaker.observe_limits(remaining_tokens=1000, reset_tokens=60.0)

    def used(tokens: int, max_tokens: int) -> int:
        breaker.observe_limits(used_tokens=tokens)
        return tokens

    def outer(max_tokens: int) -> int:
        breaker.call_sync(used, 50, max_tokens=100)
        breaker.observe_limits(used_tokens=100)
        return 100

    assert breaker.call_sync(outer, max_tokens=600) == 100
    # 1000 - 100 - 50 = 850 left: room for 800 more.
    assert breaker.call_sync(used, 800, max_tokens=800) == 800


@pytest.mark.anyio
async def test_a_nested_async_call_leaves_the_outer_calls_usage_to_the_outer_call(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("nested-usage-async", system=system)
    breaker.observe_limits(remaining_tokens=1000, reset_tokens=60.0)

    async def used(tokens: int, max_tokens: int) -> int:
        breaker.observe_limits(used_tokens=tokens)
        return tokens

    async def outer(max_tokens: int) -> int:
        await breaker.call(used, 50, max_tokens=100)
        breaker.observe_limits(used_tokens=100)
        return 100

    assert await breaker.call(outer, max_tokens=600) == 100
    assert await breaker.call(used, 800, max_tokens=800) == 800


def test_a_finished_call_leaves_no_ticket_behind(system: ActorSystem, clock: FakeClock) -> None:
    breaker = CircuitBreaker("no-ticket-left", system=system)
    breaker.observe_limits(remaining_tokens=1000, reset_tokens=60.0)
    seen: list[Ticket | None] = []
    breaker.call_sync(lambda max_tokens: seen.append(current_ticket.get()), max_tokens=10)
    assert seen[0] is not None
    assert seen[0].cost == 10
    # Fed outside any call, the usage corrects nothing (it belongs to no call).
    assert current_ticket.get() is None


def test_calls_with_nothing_to_give_back_share_one_ticket(clock: FakeClock) -> None:
    budgets = Budgets(
        "shared-ticket", max_rate="1000/s", burst=10, max_concurrent=None, wait=0.0, clock=clock
    )
    first = budgets.admit_sync(clock())
    assert budgets.admit_sync(clock()) is first
    first.done()
    first.done()
    assert budgets.admit_sync(clock(), cost=5.0) is not first  # a cost to account for


@pytest.mark.anyio
async def test_the_fallback_answers_an_async_budget_refusal(system: ActorSystem) -> None:
    breaker = CircuitBreaker(
        "rate-fallback-async", max_rate="1/min", fallback=lambda x: f"later:{x}", system=system
    )

    async def now(x: int) -> str:
        return f"now:{x}"

    assert await breaker.call(now, 1) == "now:1"
    assert await breaker.call(now, 2) == "later:2"


def test_a_fallback_that_raises_runs_once(system: ActorSystem) -> None:
    # A rejected call answers with its fallback once, whatever the fallback does.
    ran: list[int] = []

    def fallback() -> int:
        ran.append(1)
        raise CircuitBreakerOpenError("elsewhere", None, "open", None, None)

    breaker = CircuitBreaker("fallback-once", max_rate="1000/s", fallback=fallback, system=system)
    breaker.force_open()
    with pytest.raises(CircuitBreakerOpenError):
        breaker.call_sync(lambda: 1)
    assert ran == [1]


# -- the two colours decide alike ----------------------------------------------------------------

Step = tuple[float, int]  # (seconds to let pass first, max_tokens or 0)


def _call_sync(breaker: CircuitBreaker, kwargs: dict[str, int]) -> object:
    return breaker.call_sync(lambda **_: "ran", **kwargs)


def _call_async(breaker: CircuitBreaker, kwargs: dict[str, int]) -> object:
    async def ran(**_: object) -> str:
        return "ran"

    # A loop per call: the budgets keep nothing of a loop between calls.
    return asyncio.run(breaker.call(ran, **kwargs))


def _trace(
    call: Callable[[CircuitBreaker, dict[str, int]], object],
    breaker: CircuitBreaker,
    clock: FakeClock,
    steps: list[Step],
) -> list[object]:
    start = clock()
    trace: list[object] = []
    for pause, tokens in steps:
        clock.advance(pause)
        try:
            trace.append(call(breaker, {"max_tokens": tokens} if tokens else {}))
        except BudgetExceededError as exc:
            retry = None if exc.retry_after is None else round(exc.retry_after, 6)
            trace.append((exc.reason, retry))
        trace.append(round(clock() - start, 6))
    return trace


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rate=st.sampled_from(["5/s", "20/s", "600/min"]),
    burst=st.integers(1, 3),
    wait=st.sampled_from([0.0, 0.3]),
    headers=st.booleans(),
    steps=st.lists(
        st.tuples(st.sampled_from([0.0, 0.01, 0.1, 0.5]), st.sampled_from([0, 50, 400])),
        max_size=12,
    ),
)
def test_sync_and_async_calls_are_admitted_alike(
    system: ActorSystem,
    clock: FakeClock,
    rate: str,
    burst: int,
    wait: float,
    headers: bool,
    steps: list[Step],
) -> None:
    # The same calls, one breaker each colour: the same answers at the same times.
    traces = []
    for call in (_call_sync, _call_async):
        breaker = CircuitBreaker(
            f"parity-{uuid.uuid4().hex}", max_rate=rate, burst=burst, wait=wait, system=system
        )
        if headers:
            breaker.observe_limits(
                remaining_requests=8, reset_requests=1.0, remaining_tokens=1000, reset_tokens=1.0
            )
        traces.append(_trace(call, breaker, clock, steps))
    assert traces[0] == traces[1]


class _HeldRequests:
    """A daemon client whose answers the test gives: it records each request."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, Callable[[Any, BaseException | None], None], bool]] = []
        self.one_asked = asyncio.Event()

    def request(
        self,
        message: Any,
        reply: Callable[[Any, BaseException | None], None],
        *,
        read: bool = False,
        read_timeout: float | None = None,
    ) -> bool:
        self.asked.append((message, reply, read))
        self.one_asked.set()
        return True


@pytest.mark.anyio
async def test_an_async_call_asks_for_its_ramp_place_without_blocking_the_loop() -> None:
    # The daemon's answer comes from another task on the same loop: a ramp
    # request that blocked the loop would never see it, time out and fall
    # back to the process's own ramp.
    client = _HeldRequests()
    clock = FakeClock(100.0)
    budgets = DaemonBudgets(
        "ramp-async",
        max_rate=None,
        burst=None,
        max_concurrent=None,
        wait=5.0,
        clock=clock,
        client=lambda: client,
        daemon_timeout=0.5,
    )

    async def answer() -> None:
        await client.one_asked.wait()
        message, reply, read = client.asked[0]
        assert message.ramp
        assert message.generation == 7
        assert not read  # the caller does not read the socket itself
        reply(BudgetGrant(ramp_at=123.25), None)

    answering = asyncio.ensure_future(answer())
    place = await budgets.ramp_slot_async(7, clock())
    await answering
    assert place == 123.25
