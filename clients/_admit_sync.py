# Generated from _admit_async.py by scripts/unasync.py: do not edit.
# Edit the async source and run `python scripts/unasync.py`.
"""``Budgets.admit_sync``: waiting for admission, from any thread.

Generated from ``_admit_async.py`` (``Budgets.admit_async``) by
``scripts/unasync.py``: edit that file, never this one. The waiting is
``Budgets._sleep`` and ``Budgets._wait_turn``.
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

__all__ = ["SyncAdmission"]


class SyncAdmission:
    """The sync admission of ``Budgets``."""

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

        def _sleep(self, seconds: float) -> None: ...

        def _wait_turn(self, event: threading.Event, left: float) -> None: ...

    def admit_sync(self, deadline: float, cost: float = 0.0) -> Ticket:
        """Wait (up to the monotonic instant ``deadline``) for admission; raise if refused."""
        lease = self._lease_sync(deadline) if self._concurrency is not None else 0
        try:
            with self.lock:
                now = self.clock()
                leave, header = self._reserve(now, deadline, cost)
            if leave > now:
                self._sleep(leave - now)
        except BaseException:
            if lease:
                self._release_lease(lease)
            raise
        if not (lease or header or cost):
            return self._free_ticket
        return _budgets.Ticket(self, lease, header, cost)

    def _lease_sync(self, deadline: float) -> int:
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
                self._wait_turn(event, left)
        finally:
            self._leave_queue(wake)
