"""A breaker's budgets in one process: admission, waiting, and the tickets of admitted calls.

``Budgets`` combines the pure budgets of ``breakerd.actor._budget`` (a paced
``max_rate``, ``max_concurrent`` leases, and what the API's headers said is
left) behind one lock, and does the waiting: a call past a budget waits its
turn up to its deadline, or is refused with ``BudgetExceededError``.

Order of admission: a concurrency lease first, then the time to leave. A
call that got its slot in the rate's schedule must leave at that slot: if it
then waited for a lease, it would leave late, bunched with the slots after
it, and the rate's promise about arrivals would not hold.

Waiting: for a slot, the caller sleeps until it (its slot is reserved, so no
one can take it meanwhile). For a lease, waiters queue in order and the
release of a lease wakes the first of them (sync and async waiters alike).
On a ``FakeClock`` (anything with a ``sleep`` method) every wait goes
through that clock's ``sleep`` instead, so logic tests never sleep.

The waiting itself (``admit_async``) is written once, in ``_admit_async``;
``admit_sync`` is generated from it (``scripts/unasync.py``). What differs
between the colours is here: ``_sleep`` / ``_asleep``, ``_wait_turn`` /
``_await_turn``.

Host-wide (daemon mode), the same ``Budgets`` asks a ``SlotSource`` (the
daemon) for its slots and leases instead of the local budgets: see
``_budget_link``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Final, Protocol

import anyio
import anyio.lowlevel

from breakerd.actor._budget import (
    ConcurrencyBudget,
    HeaderBudget,
    RateBudget,
    parse_rate,
    ramp_offset,
)
from breakerd.actor._budget_status import budget_status
from breakerd.protocol import BudgetExceededError, BudgetStatus

from ._admit_async import AsyncAdmission
from ._admit_sync import SyncAdmission
from ._globals import shared_budget

__all__ = [
    "RECHECK",
    "Budgets",
    "Ticket",
    "attempt_only",
    "call_cost",
    "current_ticket",
    "estimate_cost",
    "shared_budgets",
]

#: Seconds a waiting call sleeps at most before it looks again at what it waits
#: for (a breaker's state, a lease on a fake clock): short enough that a
#: recovered breaker is seen within a blink, long enough to cost nothing.
RECHECK: Final = 0.02

Clock = Callable[[], float]


#: A call's token estimate when its caller said (the openai wrapper's ``cost=``).
call_cost: ContextVar[float | None] = ContextVar("breakerd_call_cost", default=None)
#: Set while a budgeted call tries the breaker: a rejection then raises
#: instead of answering with the fallback, so the call can wait and try again.
attempt_only: ContextVar[bool] = ContextVar("breakerd_budget_attempt", default=False)


def estimate_cost(kwargs: Mapping[str, Any]) -> float:
    """Tokens a call will spend at most: its ``cost=`` (``call_cost``), else its
    ``max_tokens``/``max_output_tokens``/``max_completion_tokens``, else 0."""
    given = call_cost.get()
    if given is not None:
        return float(given)
    if kwargs:  # most calls pass none: no lookups then
        for key in ("max_tokens", "max_output_tokens", "max_completion_tokens"):
            value = kwargs.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return float(value)
    return 0.0


class Books(Protocol):
    """What a ticket is given back to (``Budgets``)."""

    def finish(self, ticket: Ticket) -> None: ...


class Ticket:
    """An admitted call: give it back with ``done()`` when the call ends (exactly once)."""

    __slots__ = ("_budgets", "_done", "cost", "header", "lease", "remote", "used_tokens")

    def __init__(
        self, budgets: Books, lease: int, header: bool, cost: float, *, remote: bool = False
    ) -> None:
        self._budgets = budgets
        self.lease = lease
        self.header = header
        self.cost = cost
        #: Admitted by the daemon (host-wide), not by this process's budgets.
        self.remote = remote
        #: The tokens the call really used (from its response's ``usage``), once known.
        self.used_tokens: float | None = None
        self._done = False

    def belongs_to(self, budgets: Books) -> bool:
        return self._budgets is budgets

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        self._budgets.finish(self)


#: The ticket of the budgeted call running in this context (for its usage).
current_ticket: ContextVar[Ticket | None] = ContextVar("breakerd_budget_ticket", default=None)


class Budgets(AsyncAdmission, SyncAdmission):
    """The budgets of one breaker in this process (shared by its ``CircuitBreaker`` objects).

    Args:
        name: The breaker's name (for errors).
        max_rate: ``"500/min"``-style request rate, or None.
        burst: Calls that may leave at once after an idle spell (default 1).
        max_concurrent: Calls in flight at most, or None.
        wait: Default seconds a call may wait to be admitted.
        clock: The monotonic clock (the breaker's).
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
    ) -> None:
        if not (isinstance(wait, (int, float)) and math.isfinite(wait) and wait >= 0):
            raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
        if burst is not None and max_rate is None:
            raise ValueError("burst only applies with max_rate (say max_rate='20/s', burst=5)")
        self.name = name
        #: The scope key when these are a scope's budgets (``NAME/KEY``), for refusals.
        self.scope: str | None = None
        self.wait = float(wait)
        self.settings = (max_rate, burst, max_concurrent, float(wait))
        self._rate = None if max_rate is None else RateBudget(parse_rate(max_rate), burst or 1)
        self._concurrency = None if max_concurrent is None else ConcurrencyBudget(max_concurrent)
        self._headers = HeaderBudget()
        # False until a response's headers were seen: until then the header
        # budget is skipped (one attribute read on the path of every call).
        self.headers_seen = False
        #: The breaker's monotonic clock.
        self.clock = clock
        self._fake_sleep: Callable[[float], None] | None = getattr(clock, "sleep", None)
        #: Guards the budgets' state (a subclass's too).
        self.lock = threading.Lock()
        # Lease waiters in arrival order: each a wake-up callable.
        self._lease_waiters: deque[Callable[[], None]] = deque()
        # The recovery ramp: (generation it is for, when it began, next index).
        self._ramp: tuple[int, float, int] = (-1, 0.0, 0)
        # The ticket of every call with nothing to give back (no lease, no
        # header budget, no tokens): shared, as its ``done()`` does nothing,
        # so the common call builds none.
        self._free_ticket = Ticket(self, 0, False, 0.0)
        # Refusals by reason, for status() and the metrics. A lock of their
        # own: a refusal is made both under ``lock`` and outside it.
        self._refused: dict[str, int] = {}
        self._refused_lock = threading.Lock()

    @property
    def rate_interval(self) -> float | None:
        """Seconds between two calls of the paced ``max_rate`` (None without one)."""
        return None if self._rate is None else self._rate.interval

    def after_fork_in_child(self) -> None:
        """In a forked child: a parent thread may have held the lock, or waited."""
        self.lock = threading.Lock()
        self._refused_lock = threading.Lock()
        self._lease_waiters.clear()

    @property
    def max_concurrent(self) -> int | None:
        return None if self._concurrency is None else self._concurrency.limit

    @property
    def in_flight(self) -> int:
        """Leases held now (0 without ``max_concurrent``)."""
        return 0 if self._concurrency is None else self._concurrency.in_use

    # -- what the API said --------------------------------------------------------

    def observe(self, **limits: float) -> None:
        """Feed the API's counts (see ``CircuitBreaker.observe_limits``)."""
        with self.lock:
            self._headers.observe(self.clock(), **limits)
            self.headers_seen = True

    def ramp_slot(self, generation: int, now: float) -> float:
        """When the next call that waited through an outage may leave (see ``ramp_offset``).

        The ramp begins when the first waiter sees the breaker closed again
        at ``generation``.
        """
        with self.lock:
            ramp_generation, began, index = self._ramp
            if ramp_generation != generation:
                ramp_generation, began, index = generation, now, 0
            self._ramp = (ramp_generation, began, index + 1)
        return began + ramp_offset(index)

    async def ramp_slot_async(self, generation: int, now: float) -> float:
        """``ramp_slot`` on an event loop (the daemon's ramp asks without blocking it)."""
        return self.ramp_slot(generation, now)

    def status(self) -> BudgetStatus:
        """These budgets now (this process's), as ``breaker.status()`` shows them."""
        with self._refused_lock:
            refused = dict(self._refused)
        with self.lock:
            return budget_status(
                self.clock(),
                self._rate,
                self._concurrency,
                self._headers if self.headers_seen else None,
                queued=len(self._lease_waiters),
                rejections=refused,
            )

    # -- admission ------------------------------------------------------------------

    def _reserve(self, now: float, deadline: float, cost: float) -> tuple[float, bool]:
        # Under the lock. The headers first: the rate's slot is then taken at
        # the instant the call really leaves.
        leave = now
        header = False
        if self.headers_seen:
            planned = self._headers.reserve(now, deadline - now, cost)
            if planned is None:
                retry = self._headers.next_free(now, cost) - now
                raise self.refusal("rate_budget", retry)
            leave, header = planned, True
        rate = self._rate
        if rate is not None:
            slot = rate.reserve(leave, deadline - leave)
            if slot is None:
                if header:
                    self._headers.give_back(now, cost)
                raise self.refusal("rate_budget", rate.next_free(leave) - now)
            if header:
                self._headers.moved(leave, slot)
            leave = slot
        return leave, header

    def refusal(self, reason: str, retry_after: float | None) -> BudgetExceededError:
        with self._refused_lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1
        return BudgetExceededError(self.name, retry_after, "closed", None, self.scope, reason)

    # -- leases ---------------------------------------------------------------------------

    def _try_lease(self) -> int:
        concurrency = self._concurrency
        assert concurrency is not None
        with self.lock:
            # First come, first served: a newcomer does not jump the queue.
            if self._lease_waiters:
                return 0
            return concurrency.acquire(threading.get_ident()) or 0

    def _take_turn(self, wake: Callable[[], None]) -> int:
        """A lease if ``wake``'s waiter is first in the queue and one is free, else 0."""
        with self.lock:
            if not self._lease_waiters or self._lease_waiters[0] is not wake:
                return 0
            assert self._concurrency is not None
            lease = self._concurrency.acquire(threading.get_ident()) or 0
            if lease:
                self._lease_waiters.popleft()
                self._wake_next()
            return lease

    def _leave_queue(self, wake: Callable[[], None]) -> None:
        with self.lock:
            try:
                self._lease_waiters.remove(wake)
            except ValueError:
                return
            self._wake_next()  # it may have been the head: the next one looks

    def _wake_next(self) -> None:
        if self._lease_waiters:
            self._lease_waiters[0]()

    def _release_lease(self, lease: int) -> None:
        concurrency = self._concurrency
        assert concurrency is not None
        with self.lock:
            concurrency.release(lease)
            self._wake_next()

    def finish(self, ticket: Ticket) -> None:
        """The call of ``ticket`` ended: its lease back, its token estimate corrected."""
        if ticket.lease:
            self._release_lease(ticket.lease)
        if ticket.header:
            used = ticket.used_tokens if ticket.cost else None
            with self.lock:
                self._headers.done(self.clock(), ticket.cost, used)

    # -- waiting --------------------------------------------------------------------------

    def _wait_turn(self, event: threading.Event, left: float) -> None:
        # A release wakes a sync lease waiter at once (``event``); it looks
        # again now and then all the same, for a deadline or a queue change.
        if self._fake_sleep is not None:
            self._fake_sleep(min(left, RECHECK))
        else:
            event.wait(min(left, RECHECK * 5))
            event.clear()

    async def _await_turn(self, event: threading.Event, left: float) -> None:
        # A release wakes sync waiters at once; async ones look again every
        # RECHECK: a lease held by a thread cannot wake a loop it does not
        # know, and a poll costs nothing measurable.
        await self._asleep(min(left, RECHECK if not event.is_set() else 0.0))
        event.clear()

    def _sleep(self, seconds: float) -> None:
        if self._fake_sleep is not None:
            self._fake_sleep(seconds)
        else:
            time.sleep(seconds)

    async def _asleep(self, seconds: float) -> None:
        if self._fake_sleep is not None:
            self._fake_sleep(seconds)
            await anyio.lowlevel.checkpoint()
        else:
            await anyio.sleep(seconds)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this breaker's clock (a fake one moves at once)."""
        self._sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await self._asleep(seconds)


def shared_budgets(
    name: str,
    *,
    max_rate: str | None,
    burst: int | None,
    max_concurrent: int | None,
    wait: float,
    clock: Clock,
    daemon: tuple[str, Callable[[], Any], float] | None = None,
) -> Budgets:
    """The budgets of breaker ``name`` on ``clock`` in this process; the first settings win.

    ``daemon``: ``(socket path, client getter, daemon_timeout)`` in daemon
    mode, where the daemon's budgets are the host's (see ``_budget_link``).
    """
    budgets: Budgets
    if daemon is None:
        budgets = Budgets(
            name,
            max_rate=max_rate,
            burst=burst,
            max_concurrent=max_concurrent,
            wait=wait,
            clock=clock,
        )  # built first: bad settings raise even when the name is taken
        key: tuple[object, str] = (id(clock), name)
    else:
        from ._budget_link import DaemonBudgets

        path, client, daemon_timeout = daemon
        budgets = DaemonBudgets(
            name,
            max_rate=max_rate,
            burst=burst,
            max_concurrent=max_concurrent,
            wait=wait,
            clock=clock,
            client=client,
            daemon_timeout=daemon_timeout,
        )
        key = (path, name)
    return shared_budget(key, budgets)
