"""The daemon's budgets: every breaker's by name, the answer to each ``BudgetRequest``.

Pure, as the budgets it combines (``_budget``): every method takes ``now``.
Slots come from one schedule shared in turn, leases are owned by the asking
connection and handed to the waiters in their order of asking, and the
places in a recovery ramp are one ramp for the host.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Final

from breakerd.protocol import BudgetGrant, BudgetRequest, BudgetStatus

from ._budget import ConcurrencyBudget, HeaderBudget, RateBudget, ramp_offset
from ._budget_status import budget_status
from ._lease_queue import LeaseQueue, Waiter

__all__ = ["ACTIVE_WINDOW", "SHARE_HORIZON", "BudgetTable"]

#: Seconds of a rate's schedule one process may hold at once when several
#: want slots: its share is ``rate * SHARE_HORIZON / processes asking``
#: slots (at least one). Small, so a newcomer waits at most this long for
#: its first slot; large enough that a busy process asks the daemon about
#: once per few calls, not once per call.
SHARE_HORIZON: Final = 0.25
#: Seconds a process counts as asking after its last request for slots.
ACTIVE_WINDOW: Final = 1.0


class _Entry:
    """One breaker's host-wide budgets in the daemon."""

    __slots__ = ("asking", "concurrency", "headers", "name", "queue", "ramp", "rate")

    def __init__(self, request: BudgetRequest) -> None:
        self.name = request.name
        self.rate = RateBudget(request.rate, request.burst) if request.rate > 0 else None
        self.concurrency = (
            ConcurrencyBudget(request.max_concurrent) if request.max_concurrent > 0 else None
        )
        self.headers = HeaderBudget()
        # holder -> the instant it last asked for slots.
        self.asking: dict[Hashable, float] = {}
        # Who waits for a lease, oldest first.
        self.queue = LeaseQueue()
        # The recovery ramp: (generation it is for, when it began, next place).
        self.ramp: tuple[int, float, int] = (-1, 0.0, 0)


@dataclass(slots=True)
class _Usage:
    """When a breaker's budgets were last asked for, and how often they refused."""

    last: float = -math.inf
    refused: dict[str, int] = field(default_factory=dict)


class BudgetTable:
    """The daemon's budgets, by breaker name: the answer to every ``BudgetRequest``.

    Slots come from one schedule per breaker (so calls from every process
    are paced together, not each process on its own) and are handed out in
    order of asking, at most a share per request: every process that asks
    gets slots in turn, none starves. Leases are held by a holder (a
    connection) and all released when it goes (``forget``). A lease asked
    for with a ``wait`` (``handle_or_park``) that finds none free waits in
    line: each lease released goes to the oldest waiter, whose answer is
    then collected with ``handed``; one whose wait runs out is answered
    with the ``concurrency`` refusal at its deadline.

    Entries are reclaimed (``reclaim``) once ``quiet``: no lease held, no
    process asking, nothing asked for ``ACTIVE_WINDOW`` seconds, and no slot
    reserved beyond now, so a fresh entry can promise no more than the old
    one would have. The daemon reclaims a breaker's entry with the breaker
    itself (after ``breaker_idle_timeout`` with no connection holding it):
    whoever asks next fixes the settings again, and what the API's headers
    said is forgotten until the next response says it again.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        # Answers to parked requests, not collected yet: (holder, token, grant).
        self._handed: list[tuple[Hashable, Hashable, BudgetGrant]] = []
        # Names of the breakers whose queue may hold a waiter.
        self._queued: set[str] = set()
        self._usage: dict[str, _Usage] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def handle(self, holder: Hashable, request: BudgetRequest, now: float) -> BudgetGrant:
        """The answer, now: a lease asked for and not free is refused at once."""
        grant = self._handle(holder, request, now, None)
        assert grant is not None  # nothing is parked without a token
        return grant

    def handle_or_park(
        self, holder: Hashable, token: Hashable, request: BudgetRequest, now: float
    ) -> BudgetGrant | None:
        """The answer, or None: the lease asked for waits in line (see ``handed``).

        Only a request for a lease alone (no slots wanted), with a ``wait``,
        is parked; ``token`` names it in ``handed`` (unique per holder).
        """
        return self._handle(holder, request, now, token)

    def _handle(
        self, holder: Hashable, request: BudgetRequest, now: float, token: Hashable
    ) -> BudgetGrant | None:
        entry = self._entries.get(request.name)
        if entry is None:
            # The first to ask fixes the settings, as for a breaker's config.
            entry = self._entries[request.name] = _Entry(request)
        concurrency = entry.concurrency
        if concurrency is not None and request.release:
            for lease in request.release:
                if concurrency.owner(lease) == holder:
                    concurrency.release(lease)
            self._hand_over(entry, concurrency, now)
        headers = entry.headers
        headers.started(request.started)
        # What a response said, before the calls that ended with it are done:
        # the calls still in flight are subtracted from it.
        if request.limits:
            headers.observe(now, **dict(request.limits))
        for _ in range(min(request.done, headers.in_flight)):
            headers.done(now)
        if request.tokens_back:
            headers.credit(now, request.tokens_back)
        ramp_at = self._ramp(entry, request.generation, now) if request.ramp else None
        lease = 0
        if request.lease and concurrency is not None:
            # Nobody jumps the line: while anyone waits, every lease is held.
            lease = 0 if entry.queue else concurrency.acquire(holder) or 0
            if not lease:
                if token is not None and request.wait > 0 and not request.want:
                    entry.queue.park(holder, token, now + request.wait)
                    self._queued.add(request.name)
                    return None
                return BudgetGrant((), 0, "concurrency", None, ramp_at)
        slots: list[float] = []
        reason: str | None = None
        retry: float | None = None
        if request.want:
            entry.asking[holder] = now
            for other, last in list(entry.asking.items()):
                if now - last > ACTIVE_WINDOW:
                    del entry.asking[other]
            rate = entry.rate
            share = request.want
            if rate is not None:
                per_process = rate.rate * SHARE_HORIZON / len(entry.asking)
                share = min(request.want, max(1, math.ceil(per_process)))
            for _ in range(share):
                leave = self._reserve(entry, now, request.wait, request.tokens)
                if leave is None:
                    break
                slots.append(leave)
            if not slots:
                reason = "rate_budget"
                retry = self._next_free(entry, now, request.tokens) - now
        return BudgetGrant(tuple(slots), lease, reason, retry, ramp_at)

    @staticmethod
    def _ramp(entry: _Entry, generation: int, now: float) -> float:
        # One ramp per recovery, whichever process asks: it begins when the
        # first waiter of any process asks for a place after the breaker
        # closed at ``generation``.
        ramp_generation, began, place = entry.ramp
        if ramp_generation != generation:
            ramp_generation, began, place = generation, now, 0
        entry.ramp = (ramp_generation, began, place + 1)
        return began + ramp_offset(place)

    def _hand_over(self, entry: _Entry, concurrency: ConcurrencyBudget, now: float) -> None:
        if not entry.queue:
            return
        granted, expired = entry.queue.hand_over(concurrency, now)
        self._answer_expired(entry.name, expired)
        self._handed.extend(
            (waiter.holder, waiter.token, BudgetGrant(lease=lease)) for waiter, lease in granted
        )

    def _answer_expired(self, name: str, expired: list[Waiter]) -> None:
        if expired:
            refused = self._usage_of(name).refused
            refused["concurrency"] = refused.get("concurrency", 0) + len(expired)
        refusal = BudgetGrant((), 0, "concurrency", None)
        self._handed.extend((waiter.holder, waiter.token, refusal) for waiter in expired)

    def handed(self, now: float) -> list[tuple[Hashable, Hashable, BudgetGrant]]:
        """The answers to parked requests due by ``now``, each once: (holder, token, grant).

        A lease handed over, or the ``concurrency`` refusal of a waiter whose
        wait ran out.
        """
        for name in list(self._queued):
            entry = self._entries.get(name)
            if entry is None or not entry.queue:
                self._queued.discard(name)
                continue
            self._answer_expired(name, entry.queue.expire(now))
        answers, self._handed = self._handed, []
        return answers

    def next_deadline(self) -> float:
        """The earliest instant a parked request must be answered by (``inf``: none)."""
        return min(
            (self._entries[name].queue.next_deadline() for name in self._queued),
            default=math.inf,
        )

    def _reserve(self, entry: _Entry, now: float, wait: float, tokens: float) -> float | None:
        # As a process's own budgets do it: the headers first, then the
        # rate's slot at the instant the call really leaves.
        headers = entry.headers
        leave = headers.reserve(now, wait, tokens)
        if leave is None:
            return None
        rate = entry.rate
        if rate is not None:
            slot = rate.reserve(leave, now + wait - leave)
            if slot is None:
                headers.give_back(now, tokens)
                return None
            headers.moved(leave, slot)
            leave = slot
        return leave

    def _next_free(self, entry: _Entry, now: float, tokens: float) -> float:
        leave = entry.headers.next_free(now, tokens)
        if entry.rate is not None:
            leave = entry.rate.next_free(leave)
        return leave

    def forget(self, holder: Hashable, now: float = -math.inf) -> int:
        """``holder`` went away (its connection closed): its leases back; how many.

        Its leases go to the oldest waiters (collect the answers with
        ``handed``); ``now`` says which of those waited past their deadline.
        """
        released = 0
        for entry in self._entries.values():
            # Its waiters first (nobody is left to answer), then its leases,
            # to the oldest of the others waiting.
            entry.queue.drop(holder)
            if entry.concurrency is not None:
                released += entry.concurrency.release_holder(holder)
                self._hand_over(entry, entry.concurrency, now)
            entry.asking.pop(holder, None)
        return released

    def in_use(self, name: str) -> int:
        """Leases of ``name`` held now."""
        entry = self._entries.get(name)
        return 0 if entry is None or entry.concurrency is None else entry.concurrency.in_use

    def answer(self, holder: Hashable, request: BudgetRequest, now: float) -> BudgetGrant:
        """``handle``, keeping the books ``status`` and ``quiet`` read."""
        grant = self.handle(holder, request, now)
        self._book(request.name, grant, now)
        return grant

    def answer_or_park(
        self, holder: Hashable, token: Hashable, request: BudgetRequest, now: float
    ) -> BudgetGrant | None:
        """``handle_or_park``, keeping the books (the daemon's entry)."""
        grant = self.handle_or_park(holder, token, request, now)
        self._book(request.name, grant, now)
        return grant

    def _book(self, name: str, grant: BudgetGrant | None, now: float) -> None:
        usage = self._usage_of(name)
        usage.last = now
        if grant is not None and grant.reason is not None:
            usage.refused[grant.reason] = usage.refused.get(grant.reason, 0) + 1

    def _usage_of(self, name: str) -> _Usage:
        usage = self._usage.get(name)
        if usage is None:
            usage = self._usage[name] = _Usage()
        return usage

    def status(self, name: str, now: float) -> BudgetStatus | None:
        """``name``'s budgets at ``now`` (None: nobody asked for any, or reclaimed)."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        usage = self._usage.get(name)
        return budget_status(
            now,
            entry.rate,
            entry.concurrency,
            entry.headers,
            queued=len(entry.queue),
            rejections=None if usage is None else usage.refused,
        )

    def quiet(self, name: str, now: float) -> bool:
        """Whether ``name``'s entry may be reclaimed at ``now`` (see the class doc)."""
        entry = self._entries.get(name)
        if entry is None:
            return True
        if entry.queue or (entry.concurrency is not None and entry.concurrency.in_use):
            return False
        if entry.rate is not None and not entry.rate.settled(now):
            return False
        if any(now - last <= ACTIVE_WINDOW for last in entry.asking.values()):
            return False
        usage = self._usage.get(name)
        return usage is None or now - usage.last > ACTIVE_WINDOW

    def reclaim(self, name: str, now: float) -> bool:
        """Drop ``name``'s entry if it is ``quiet``; whether it is gone."""
        if not self.quiet(name, now):
            return False
        self._entries.pop(name, None)
        self._usage.pop(name, None)
        return True
