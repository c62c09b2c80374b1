"""Host-wide budgets: a process's share of them, from the daemon.

In daemon mode the daemon owns a breaker's budgets (``BudgetTable``): one
schedule of slots for ``max_rate`` and the API's headers, shared by every
process of the host, and ``max_concurrent`` leases held per connection
(released when the connection closes, as when its process is killed).

Admission does not cost a round trip per call: a process asks for slots
only when its stock is empty, and asks for as many as it has callers
waiting, plus ``PREFETCH``; the daemon hands out at most a share of
``SHARE_HORIZON`` seconds of the schedule per request, split between the
processes asking, so each gets slots in turn (none starves). A slot is an
instant on the host's monotonic clock; a call leaves at its slot, and a slot
nobody used within ``GRACE`` of its instant is dropped (used later, calls
would bunch up behind it). A concurrency lease is one round trip when a call
starts: one that finds none free waits in line at the daemon (first come,
first served, host-wide) and is answered when a lease is handed to it, or
refused when its wait runs out; no polling. Its release, what the API's
headers said and the calls finished travel without waiting, one frame per
call, when the call ends. The recovery ramp is the host's: a call that
waited through an outage asks the daemon for its place in it.

While the daemon cannot be reached, the process's own budgets stand in (a
per-process rate, not the host's), as ``on_unavailable="local"`` does for
the breaker itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from breakerd.actor._budget import parse_rate
from breakerd.protocol import BudgetExceededError, BudgetGrant, BudgetRequest

from ._budget_link_async import AsyncDaemonAdmission
from ._budget_link_sync import SyncDaemonAdmission
from ._budgets import RECHECK, Clock, Ticket

__all__ = ["GRACE", "PREFETCH", "DaemonBudgets"]

#: Slots asked for beyond the callers waiting, so the next calls find one in
#: stock instead of asking the daemon.
PREFETCH: Final = 2
#: Seconds after its instant a slot may still be used, at most: half the
#: rate's spacing (so a late slot bunches with the next by at most half a
#: spacing), and this much without a rate.
GRACE: Final = 0.02
#: Seconds before the end of its turn in line within which a lease refused
#: counts as refused at the end of it (the daemon's timer fires a little late,
#: never early).
LAP_SLACK: Final = 0.001


def _ignore(result: Any, error: BaseException | None) -> None:
    pass  # a fire-and-forget request: nobody waits for its answer


class DaemonBudgets(SyncDaemonAdmission, AsyncDaemonAdmission):
    """``Budgets`` whose slots and leases come from the daemon.

    Args:
        client: Returns the process's ``DaemonClient`` for the breaker's
            socket (started), or None when there is none.
        daemon_timeout: Seconds to wait for the daemon's answer before the
            local budgets answer instead.
        Others: as ``Budgets``.
    """

    def __init__(
        self,
        name: str,
        *,
        max_rate: str | None,
        burst: int | None,
        max_concurrent: int | None,
        wait: float,
        clock: Clock,
        client: Callable[[], Any],
        daemon_timeout: float,
    ) -> None:
        super().__init__(
            name,
            max_rate=max_rate,
            burst=burst,
            max_concurrent=max_concurrent,
            wait=wait,
            clock=clock,
        )
        self._client = client
        self._daemon_timeout = daemon_timeout
        self._request = BudgetRequest(
            name,
            0.0 if max_rate is None else parse_rate(max_rate),
            burst or 1,
            max_concurrent or 0,
        )
        self._stock: deque[float] = deque()
        # Guards the stock (the budgets' lock): a grant wakes the calls waiting.
        self._slot_ready = threading.Condition(self.lock)
        self._asking = False
        interval = self.rate_interval
        self._grace = GRACE if interval is None else min(GRACE, interval / 2)
        #: Slots dropped unused (for the benchmark).
        self.slots_dropped = 0
        self._slot_waiters = 0
        # What travels with the next request: finished calls, tokens to give
        # back, the newest limits seen.
        self._done = 0
        self._started = 0
        self._tokens_back = 0.0
        self._limits: dict[str, float] = {}
        #: Requests sent to the daemon (for the benchmark's round-trip count).
        self.requests_sent = 0

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's slots and leases are the parent's."""
        super().after_fork_in_child()
        self._slot_ready = threading.Condition(self.lock)
        self._asking = False
        self._slot_waiters = 0
        self._stock.clear()
        self._done = 0
        self._started = 0
        self._tokens_back = 0.0
        self._limits = {}

    def _needs_slots(self) -> bool:
        return self.rate_interval is not None or self.headers_seen

    # -- what the API said ----------------------------------------------------------------

    def observe(self, **limits: float) -> None:
        super().observe(**limits)  # the stand-in, should the daemon go away
        with self.lock:
            self._limits.update(limits)

    # -- talking to the daemon ------------------------------------------------------------------

    def _message(self, **fields: Any) -> BudgetRequest:
        # Under the lock: takes what is pending.
        base = self._request
        message = BudgetRequest(
            base.name,
            base.rate,
            base.burst,
            base.max_concurrent,
            done=self._done,
            started=self._started,
            tokens_back=self._tokens_back,
            limits=tuple(self._limits.items()),
            **fields,
        )
        self._done = 0
        self._started = 0
        self._tokens_back = 0.0
        self._limits = {}
        return message

    def _restore(self, message: BudgetRequest) -> None:
        # Not sent: what it carried waits for the next one.
        with self.lock:
            self._done += message.done
            self._started += message.started
            self._tokens_back += message.tokens_back
            for key, value in message.limits:
                self._limits.setdefault(key, value)

    def _late(self, result: Any) -> None:
        # The daemon answered a caller that had given up on it: a lease it
        # granted would be held by nobody until the connection closes.
        if isinstance(result, BudgetGrant) and result.lease:
            self._send_nowait(release=(result.lease,))

    def _ask_sync(
        self, client: Any, message: BudgetRequest, timeout: float | None = None
    ) -> BudgetGrant | None:
        # ``timeout``: how long to wait for the answer (``daemon_timeout``
        # unless the daemon may hold the request, as a lease waiting in line).
        timeout = self._daemon_timeout if timeout is None else timeout
        event = threading.Event()
        answer: list[Any] = []
        lock = threading.Lock()
        gave_up = False

        def reply(result: Any, error: BaseException | None) -> None:
            with lock:
                late = gave_up
                answer.append(result if error is None else None)
                event.set()
            if late:
                self._late(result)

        self.requests_sent += 1
        if not client.request(message, reply, read=True, read_timeout=self._daemon_timeout):
            self._restore(message)
            return None
        try:
            answered = event.wait(timeout)
        except BaseException:
            # Interrupted: a lease granted, now or later, goes back.
            with lock:
                gave_up = True
                early = answer[0] if answer else None
            self._late(early)
            raise
        if not answered:
            with lock:
                gave_up = not answer
            if gave_up:
                return None  # a hung daemon: the local budgets answer this call
        grant = answer[0]
        return grant if isinstance(grant, BudgetGrant) else None

    async def _ask_async(
        self, client: Any, message: BudgetRequest, answer_within: float | None = None
    ) -> BudgetGrant | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any) -> None:
            if future.done():
                self._late(result)  # the caller gave up on it
            else:
                future.set_result(result)

        def reply(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(settle, result if error is None else None)

        self.requests_sent += 1
        if not client.request(message, reply):
            self._restore(message)
            return None
        try:
            grant = await asyncio.wait_for(
                future, self._daemon_timeout if answer_within is None else answer_within
            )
        except TimeoutError:
            return None
        return grant if isinstance(grant, BudgetGrant) else None

    def _send_nowait(self, **fields: Any) -> None:
        client = self._client()
        if client is None:
            return
        with self.lock:
            message = self._message(**fields)
        if not client.request(message, _ignore):
            self._restore(message)

    # -- the recovery ramp ------------------------------------------------------------------

    def _ramp_request(self, generation: int) -> BudgetRequest:
        with self.lock:
            return self._message(ramp=True, generation=generation)

    # -- admission -------------------------------------------------------------------------

    def _due_slot(self, now: float, deadline: float) -> float | None:
        # Under the lock. Slots are not claimed ahead: the earliest one goes
        # to whichever waiting call finds it due, so no slot is left unused
        # while a call sleeps on a later one. Stale slots are dropped.
        stock = self._stock
        while stock and stock[0] < now - self._grace:
            stock.popleft()
            self.slots_dropped += 1
            self._done += 1  # never used: the daemon counts it as finished
        if stock and stock[0] <= now:
            return stock.popleft()
        if stock and stock[0] > deadline:
            raise self.refusal("rate_budget", stock[0] - now)
        return None

    def _ask_now(self, deadline: float, cost: float, now: float) -> BudgetRequest | None:
        # Under the lock: the request for more slots, if this call should ask
        # (one request at a time, and only when the stock falls short of the
        # calls waiting for it).
        if self._asking or len(self._stock) > self._slot_waiters:
            return None
        self._asking = True
        want = self._slot_waiters + 1 + PREFETCH - len(self._stock)
        return self._message(want=want, wait=max(deadline - now, 0.0), tokens=cost)

    def _look(
        self, deadline: float, cost: float
    ) -> tuple[float | None, BudgetRequest | None, float, float | None]:
        # Under the lock: (a slot due now, the request this call should send,
        # the time looked, how long to wait before looking again: None when
        # there is a slot to take or a request to send).
        now = self.clock()
        slot = self._due_slot(now, deadline)
        if slot is not None:
            return slot, None, now, None
        if now >= deadline:
            raise self.refusal("rate_budget", None)
        message = self._ask_now(deadline, cost, now)
        if message is not None:
            return None, message, now, None
        until = self._stock[0] if self._stock else now + RECHECK
        return None, None, now, max(min(until, deadline) - now, 0.0)

    def _next_slot_sync(
        self, deadline: float, cost: float
    ) -> tuple[float | None, BudgetRequest | None, float]:
        # (a slot, or a request to send, or neither after a wait; the time looked).
        with self._slot_ready:
            slot, message, now, pause = self._look(deadline, cost)
            if pause is not None:
                self._slot_ready.wait(pause)
        return slot, message, now

    async def _next_slot_async(
        self, deadline: float, cost: float
    ) -> tuple[float | None, BudgetRequest | None, float]:
        with self._slot_ready:
            slot, message, now, pause = self._look(deadline, cost)
        if pause is not None:
            # A loop cannot wait on a thread's condition: it sleeps until the
            # next slot is due (or a moment) and looks again.
            await self.asleep(pause)
        return slot, message, now

    def _granted(self, grant: BudgetGrant | None) -> None:
        with self._slot_ready:
            self._asking = False
            if grant is not None:
                self._stock.extend(grant.slots)
                self._stock = deque(sorted(self._stock))
            self._slot_ready.notify_all()

    def _refusal_of(self, grant: BudgetGrant, now: float) -> BudgetExceededError:
        return self.refusal(grant.reason or "rate_budget", grant.retry_after)

    def _unslotted(self, lease: int, cost: float) -> Ticket:
        # A call let go without a slot: the daemon hears of it, so that what
        # the API says is left can be read with it in flight.
        with self.lock:
            self._started += 1
        return Ticket(self, lease, True, cost, remote=True)

    def _lease_message(self, client: Any, deadline: float) -> tuple[BudgetRequest, float, float]:
        # (the request, how long to wait for its answer, when its turn ends).
        # The daemon holds it in line up to ``wait``: at most half the
        # client's request timeout, for a request unanswered that long breaks
        # the connection. A longer wait asks again, at the back of the line.
        lap = min(max(deadline - self.clock(), 0.0), getattr(client, "request_timeout", 5.0) / 2)
        with self.lock:
            message = self._message(lease=True, wait=lap)
        return message, lap + self._daemon_timeout, self.clock() + lap

    def _lease_refused(self, deadline: float, lap_end: float) -> float:
        # Seconds to pause before asking again; raises once the wait is over.
        now = self.clock()
        if now >= deadline:
            raise self.refusal("concurrency", None)
        # Refused before its turn ended: a daemon that does not hold
        # requests in line (an older one), looked at again soon.
        return min(deadline - now, RECHECK) if now < lap_end - LAP_SLACK else 0.0

    def finish(self, ticket: Ticket) -> None:
        if not ticket.remote:
            super().finish(ticket)
            return
        release: tuple[int, ...] = ()
        with self.lock:
            if ticket.header:
                self._done += 1
                if ticket.cost and ticket.used_tokens is not None:
                    self._tokens_back += max(ticket.cost - ticket.used_tokens, 0.0)
            if ticket.lease:
                release = (ticket.lease,)
            pending = release or self._limits
        if pending:
            # A lease another process may be waiting for, or news of the
            # API's limits: now, without waiting for an answer.
            self._send_nowait(release=release)
