# Generated from _budget_link_async.py by scripts/unasync.py: do not edit.
# Edit the async source and run `python scripts/unasync.py`.
"""``DaemonBudgets.admit_sync``: the host's slots and leases, from any thread.

Generated from ``_budget_link_async.py`` (``DaemonBudgets.admit_async``) by
``scripts/unasync.py``: edit that file, never this one. The waiting is
``DaemonBudgets._ask_sync``, ``DaemonBudgets._next_slot_sync`` and
``Budgets.sleep``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._budgets import Budgets, Ticket

if TYPE_CHECKING:
    from breakerd.protocol import BudgetExceededError, BudgetGrant, BudgetRequest

__all__ = ["SyncDaemonAdmission"]


class SyncDaemonAdmission(Budgets):
    """The sync admission of ``DaemonBudgets``."""

    _client: Callable[[], Any]
    _slot_ready: threading.Condition
    _slot_waiters: int

    if TYPE_CHECKING:

        def _needs_slots(self) -> bool: ...

        def _send_nowait(self, **fields: Any) -> None: ...

        def _ramp_request(self, generation: int) -> BudgetRequest: ...

        def _granted(self, grant: BudgetGrant | None) -> None: ...

        def _refusal_of(self, grant: BudgetGrant, now: float) -> BudgetExceededError: ...

        def _unslotted(self, lease: int, cost: float) -> Ticket: ...

        def _lease_message(
            self, client: Any, deadline: float
        ) -> tuple[BudgetRequest, float, float]: ...

        def _lease_refused(self, deadline: float, lap_end: float) -> float: ...

        def _ask_sync(
            self, client: Any, message: BudgetRequest, timeout: float | None = None
        ) -> BudgetGrant | None: ...

        def _next_slot_sync(
            self, deadline: float, cost: float
        ) -> tuple[float | None, BudgetRequest | None, float]: ...

    def ramp_slot(self, generation: int, now: float) -> float:
        """The place of a call that waited through an outage in the host's one ramp.

        The daemon hands the places out, so the waiting calls of every
        process leave in one doubling ramp, not one ramp a process (which
        would release one call per process at once). Without an answer from
        the daemon, the process ramps its own waiters.
        """
        client = self._client()
        if client is not None:
            grant = self._ask_sync(client, self._ramp_request(generation))
            if grant is not None and grant.ramp_at is not None:
                return grant.ramp_at
        return super().ramp_slot(generation, now)

    def admit_sync(self, deadline: float, cost: float = 0.0) -> Ticket:
        client = self._client()
        if client is None:
            return super().admit_sync(deadline, cost)
        lease = 0
        if self.max_concurrent is not None:
            got = self._lease_remote_sync(client, deadline)
            if got is None:
                return super().admit_sync(deadline, cost)
            lease = got
        try:
            if self._needs_slots():
                leave = self._slot_sync(client, deadline, cost)
                if leave is None:
                    if lease:
                        self._send_nowait(release=(lease,))
                    return super().admit_sync(deadline, cost)
                now = self.clock()
                if leave > now:
                    self.sleep(leave - now)
                return Ticket(self, lease, True, cost, remote=True)
        except BaseException:
            if lease:
                self._send_nowait(release=(lease,))
            raise
        return self._unslotted(lease, cost)

    def _slot_sync(self, client: Any, deadline: float, cost: float) -> float | None:
        with self._slot_ready:
            self._slot_waiters += 1
        try:
            while True:
                slot, message, now = self._next_slot_sync(deadline, cost)
                if slot is not None:
                    return slot
                if message is None:
                    continue  # waited for a slot, or for another call's request
                grant = None
                try:
                    grant = self._ask_sync(client, message)
                finally:
                    self._granted(grant)
                if grant is None:
                    return None
                if not grant.slots:
                    raise self._refusal_of(grant, now)
        finally:
            with self._slot_ready:
                self._slot_waiters -= 1

    def _lease_remote_sync(self, client: Any, deadline: float) -> int | None:
        while True:
            message, timeout, lap_end = self._lease_message(client, deadline)
            grant = self._ask_sync(client, message, timeout)
            if grant is None:
                return None
            if grant.lease or grant.reason is None:
                return grant.lease  # 0: the host's budgets have no max_concurrent
            pause = self._lease_refused(deadline, lap_end)
            if pause > 0:
                self.sleep(pause)
