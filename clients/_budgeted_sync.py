# Generated from _budgeted_async.py by scripts/unasync.py: do not edit.
# Edit the async source and run `python scripts/unasync.py`.
"""``BudgetedCalls.call_sync``: a call with budgets, from any thread.

Generated from ``_budgeted_async.py`` (``BudgetedCalls.call_async``) by
``scripts/unasync.py``: edit that file, never this one. The waiting is
``Budgets.sleep`` and ``Budgets.admit_sync``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from breakerd.protocol import BudgetExceededError, CircuitBreakerOpenError, CircuitState, Snapshot

from ._budgets import RECHECK, Budgets, Ticket, attempt_only, current_ticket

__all__ = ["SyncBudgetedCalls"]


class SyncBudgetedCalls:
    """The sync call path of ``BudgetedCalls``."""

    budgets: Budgets
    wait: float
    _snapshot: Callable[[], Snapshot]
    _clock: Callable[[], float]

    if TYPE_CHECKING:

        def _recovery_wait(self, deadline: float) -> tuple[float, bool]: ...

    def call_sync(
        self,
        inner: Callable[..., Any],
        reject: Callable[..., Any],
        func: Callable[..., Any],
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
                admitted = budgets.admit_sync(self._clock(), 0.0)
            except BudgetExceededError as exc:
                return reject(exc, args, kwargs)
            try:
                return inner(func, *args, **kwargs)
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
                budgets.sleep(pause)
                continue
            if pause < 0:
                deadline = clock()
            snapshot = self._snapshot()
            if outage and snapshot.state is CircuitState.CLOSED:
                leave = min(budgets.ramp_slot(snapshot.generation, clock()), deadline)
                if leave > clock():
                    budgets.sleep(leave - clock())
                outage = False
            try:
                ticket = run.ticket = budgets.admit_sync(deadline, cost)
            except BudgetExceededError as exc:
                return reject(exc, args, kwargs)
            token = attempt_only.set(clock() < deadline)
            try:
                return inner(run, *args, **kwargs)
            except CircuitBreakerOpenError as exc:
                if run.ran:
                    raise
                if clock() >= deadline:
                    return reject(exc, args, kwargs)
                outage = True  # rejected before it ran: wait for the breaker
                budgets.sleep(min(RECHECK, deadline - clock()))
            finally:
                attempt_only.reset(token)
                ticket.done()


class _Attempt:
    """A waiting call's function as the breaker runs it, telling whether it ran."""

    __slots__ = ("func", "ran", "ticket")

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.ran = False
        self.ticket: Ticket | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.ran = True
        attempt_only.set(False)  # calls made inside it are not ours
        token = current_ticket.set(self.ticket)
        try:
            return self.func(*args, **kwargs)
        finally:
            # Not left behind: a later call in this context must not take it
            # for its own (nor miss the fast case for it).
            current_ticket.reset(token)
