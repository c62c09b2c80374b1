"""``DaemonBudgets.admit_async``: the host's slots and leases, and the source of the sync path.

``scripts/unasync.py`` writes ``_budget_link_sync.py`` from this file, and
``--check`` (run by ``.ci/run`` and the tests) fails when the two differ:
edit this file, then run ``python scripts/unasync.py``. The decisions (which
slot is due, when to ask, how long a lease waits in line) are
``DaemonBudgets``'s, taken under its lock; this file only orders them and
waits. What differs between the colours is in ``DaemonBudgets``:
``_ask_async`` / ``_ask_sync`` (waiting for the daemon's answer),
``_next_slot_async`` / ``_next_slot_sync`` (waiting for a slot to come due)
and ``Budgets.asleep`` / ``Budgets.sleep``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._budgets import Budgets, Ticket

if TYPE_CHECKING:
    from breakerd.protocol import BudgetExceededError, BudgetGrant, BudgetRequest

__all__ = ["AsyncDaemonAdmission"]


class AsyncDaemonAdmission(Budgets):
    """The async admission of ``DaemonBudgets``."""

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

        async def _ask_async(
            self, client: Any, message: BudgetRequest, answer_within: float | None = None
        ) -> BudgetGrant | None: ...

        async def _next_slot_async(
            self, deadline: float, cost: float
        ) -> tuple[float | None, BudgetRequest | None, float]: ...

    async def ramp_slot_async(self, generation: int, now: float) -> float:
        """The place of a call that waited through an outage in the host's one ramp.

        The daemon hands the places out, so the waiting calls of every
        process leave in one doubling ramp, not one ramp a process (which
        would release one call per process at once). Without an answer from
        the daemon, the process ramps its own waiters.
        """
        client = self._client()
        if client is not None:
            grant = await self._ask_async(client, self._ramp_request(generation))
            if grant is not None and grant.ramp_at is not None:
                return grant.ramp_at
        return super().ramp_slot(generation, now)

    async def admit_async(self, deadline: float, cost: float = 0.0) -> Ticket:
        client = self._client()
        if client is None:
            return await super().admit_async(deadline, cost)
        lease = 0
        if self.max_concurrent is not None:
            got = await self._lease_remote_async(client, deadline)
            if got is None:
                return await super().admit_async(deadline, cost)
            lease = got
        try:
            if self._needs_slots():
                leave = await self._slot_async(client, deadline, cost)
                if leave is None:
                    if lease:
                        self._send_nowait(release=(lease,))
                    return await super().admit_async(deadline, cost)
                now = self.clock()
                if leave > now:
                    await self.asleep(leave - now)
                return Ticket(self, lease, True, cost, remote=True)
        except BaseException:
            if lease:
                self._send_nowait(release=(lease,))
            raise
        return self._unslotted(lease, cost)

    async def _slot_async(self, client: Any, deadline: float, cost: float) -> float | None:
        with self._slot_ready:
            self._slot_waiters += 1
        try:
            while True:
                slot, message, now = await self._next_slot_async(deadline, cost)
                if slot is not None:
                    return slot
                if message is None:
                    continue  # waited for a slot, or for another call's request
                grant = None
                try:
                    grant = await self._ask_async(client, message)
                finally:
                    self._granted(grant)
                if grant is None:
                    return None
                if not grant.slots:
                    raise self._refusal_of(grant, now)
        finally:
            with self._slot_ready:
                self._slot_waiters -= 1

    async def _lease_remote_async(self, client: Any, deadline: float) -> int | None:
        while True:
            message, timeout, lap_end = self._lease_message(client, deadline)
            grant = await self._ask_async(client, message, timeout)
            if grant is None:
                return None
            if grant.lease or grant.reason is None:
                return grant.lease  # 0: the host's budgets have no max_concurrent
            pause = self._lease_refused(deadline, lap_end)
            if pause > 0:
                await self.asleep(pause)
