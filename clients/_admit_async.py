"""``Budgets.admit_async``: waiting for admission, and the source of ``admit_sync``.

``scripts/unasync.py`` writes ``_admit_sync.py`` from this file, and
``--check`` (run by ``.ci/run`` and the tests) fails when the two differ:
edit this file, then run ``python scripts/unasync.py``. The decisions (which
slot, whose turn for a lease) are ``Budgets``'s, taken under its lock; this
file only orders them and waits. What differs between the colours is in
``Budgets``: ``_asleep`` / ``_sleep`` (a pause on the breaker's clock) and
``_await_turn`` / ``_wait_turn`` (how a lease waiter waits to be woken).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from breakerd.protocol import BudgetExceededError

from . import _budgets

if TYPE_CHECKING:
    from breakerd.actor._budget import ConcurrencyBudget

    from ._budgets import Ticket

__all__ = ["AsyncAdmission"]


class AsyncAdmission:
    """The async admission of ``Budgets``."""

    lock: threading.Lock
    clock: Callable[[], float]
    _concurrency: ConcurrencyBudget | None
    _lease_waiters: deque[Callable[[], None]]
    _free_ticket: Ticket

    if TYPE_CHECKING:

        def refusal(self, reason: str, retry_after: float | None) -> BudgetExceededError: ...

        def finish(self, ticket: Ticket) -> None: ...

        def _reserve(self, now: float, deadline: float, cost: float) -> tuple[float, bool]: ...

        def _try_lease(self) -> int: ...

        def _take_turn(self, wake: Callable[[], None]) -> int: ...

        def _leave_queue(self, wake: Callable[[], None]) -> None: ...

        def _release_lease(self, lease: int) -> None: ...

        async def _asleep(self, seconds: float) -> None: ...

        async def _await_turn(self, event: threading.Event, left: float) -> None: ...

    async def admit_async(self, deadline: float, cost: float = 0.0) -> Ticket:
        """Wait (up to the monotonic instant ``deadline``) for admission; raise if refused."""
        lease = await self._lease_async(deadline) if self._concurrency is not None else 0
        try:
            with self.lock:
                now = self.clock()
                leave, header = self._reserve(now, deadline, cost)
            if leave > now:
                await self._asleep(leave - now)
        except BaseException:
            if lease:
                self._release_lease(lease)
            raise
        if not (lease or header or cost):
            return self._free_ticket
        return _budgets.Ticket(self, lease, header, cost)

    async def _lease_async(self, deadline: float) -> int:
        lease = self._try_lease()
        if lease:
            return lease
        event = threading.Event()
        wake = event.set  # one bound method: the queue compares by identity
        with self.lock:
            self._lease_waiters.append(wake)
        try:
            while True:
                lease = self._take_turn(wake)
                if lease:
                    return lease
                left = deadline - self.clock()
                if left <= 0:
                    raise self.refusal("concurrency", None)
                await self._await_turn(event, left)
        finally:
            self._leave_queue(wake)
