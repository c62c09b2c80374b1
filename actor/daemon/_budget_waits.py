"""The daemon's answers to lease requests that waited in line (``BudgetTable.handle_or_park``).

A request for a concurrency lease that finds none free is parked in the
budget table, not refused, and answered later: when a lease is handed to it
(a release, or a connection closing), or at its deadline with the
``concurrency`` refusal. ``settle`` delivers what the table has handed out
since and keeps one loop timer armed for the earliest deadline, only while
anyone waits.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, Protocol, cast

from breakerd.actor._budget_table import BudgetTable
from breakerd.protocol import BudgetGrant

__all__ = ["BudgetWaits"]


class _Holder(Protocol):
    def answer_budget(self, token: Any, grant: BudgetGrant) -> None: ...


class BudgetWaits:
    """Delivers the parked requests' answers; one timer for the next deadline."""

    def __init__(self, table: BudgetTable, clock: Callable[[], float]) -> None:
        self.table = table
        self.clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def settle(self) -> None:
        """Deliver every answer due now, then arm the timer for the next deadline."""
        table = self.table
        for holder, token, grant in table.handed(self.clock()):
            cast(_Holder, holder).answer_budget(token, grant)
        deadline = table.next_deadline()
        if deadline == self._armed_for:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = deadline
        if deadline < math.inf:
            delay = max(deadline - self.clock(), 0.0)
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_for = math.inf
        self.settle()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._armed_for = math.inf
