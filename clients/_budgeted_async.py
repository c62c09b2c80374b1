"""``BudgetedCalls.call_async``: a call with budgets, and the source of ``call_sync``.

``scripts/unasync.py`` writes ``_budgeted_sync.py`` from this file, and
``--check`` (run by ``.ci/run`` and the tests) fails when the two differ:
edit this file, then run ``python scripts/unasync.py``. The decisions are
``BudgetedCalls._recovery_wait`` and the budgets' (``Budgets``); this file
only orders them and waits. What differs between the colours is in
``Budgets``: ``asleep`` / ``sleep`` and ``admit_async`` / ``admit_sync``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from breakerd.protocol import BudgetExceededError, CircuitBreakerOpenError, CircuitState, Snapshot

from ._budgets import RECHECK, Budgets, Ticket, attempt_only, current_ticket

__all__ = ["AsyncBudgetedCalls"]


class AsyncBudgetedCalls:
    """The async call path of ``BudgetedCalls``."""

    budgets: Budgets
    wait: float
    _snapshot: Callable[[], Snapshot]
    _clock: Callable[[], float]

    if TYPE_CHECKING:

        def _recovery_wait(self, deadline: float) -> tuple[float, bool]: ...

    async def call_async(
        self,
        inner: Callable[..., Awaitable[Any]],
        reject: Callable[..., Awaitable[Any]],
        func: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cost: float,
    ) -> Any:
        budgets = self.budgets
        if not (self.wait or cost or attempt_only.get() or current_ticket.get() is not None):
            # The fast case, most calls: no time to wait and no tokens to
            # account for. One admission, then the breaker's own path, which
            # answers its own rejection at once; no retry loop, so nothing to
            # learn whether the function ran and no context variable to set.
            try:
                admitted = await budgets.admit_async(self._clock(), 0.0)
            except BudgetExceededError as exc:
                return await reject(exc, args, kwargs)
            try:
                return await inner(func, *args, **kwargs)
            finally:
                admitted.done()
        # A call that may wait (for a slot, a lease, the breaker's recovery)
        # and tries the breaker again while time is left.
        clock = self._clock
        deadline = clock() + self.wait
        outage = False
        run = _Attempt(func)
        while True:
            pause, waiting = self._recovery_wait(deadline)
            outage = outage or waiting
            if pause > 0:
                await budgets.asleep(pause)
                continue
            if pause < 0:
                deadline = clock()
            snapshot = self._snapshot()
            if outage and snapshot.state is CircuitState.CLOSED:
                leave = min(await budgets.ramp_slot_async(snapshot.generation, clock()), deadline)
                if leave > clock():
                    await budgets.asleep(leave - clock())
                outage = False
            try:
                ticket = run.ticket = await budgets.admit_async(deadline, cost)
            except BudgetExceededError as exc:
                return await reject(exc, args, kwargs)
            token = attempt_only.set(clock() < deadline)
            try:
                return await inner(run, *args, **kwargs)
            except CircuitBreakerOpenError as exc:
                if run.ran:
                    raise
                if clock() >= deadline:
                    return await reject(exc, args, kwargs)
                outage = True  # rejected before it ran: wait for the breaker
                await budgets.asleep(min(RECHECK, deadline - clock()))
            finally:
                attempt_only.reset(token)
                ticket.done()


class _Attempt:
    """A waiting call's function as the breaker runs it, telling whether it ran."""

    __slots__ = ("func", "ran", "ticket")

    def __init__(self, func: Callable[..., Awaitable[Any]]) -> None:
        self.func = func
        self.ran = False
        self.ticket: Ticket | None = None

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.ran = True
        attempt_only.set(False)  # calls made inside it are not ours
        token = current_ticket.set(self.ticket)
        try:
            return await self.func(*args, **kwargs)
        finally:
            # Not left behind: a later call in this context must not take it
            # for its own (nor miss the fast case for it).
            current_ticket.reset(token)
