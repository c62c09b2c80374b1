"""Waiters for concurrency leases, served first come, first served. Pure: ``now`` is passed in.

A ``ConcurrencyBudget`` says who holds which lease; a ``LeaseQueue`` beside
it says who waits for one and until when. Whenever a lease may have come
free (a release, a holder gone), ``hand_over`` gives each free lease to the
oldest waiter still within its deadline, so a lease goes to whoever has
waited longest, never to whoever happens to ask right after it was freed.
A waiter whose deadline passes is taken out by ``expire`` (or by
``hand_over``, if it reaches the head first) and answered with a refusal by
the caller. Every waiter is named by a ``token`` of the caller's choosing
(the daemon's: the request's message id), unique per holder.

Invariant, kept by the caller asking ``hand_over`` after every release:
while anyone waits, every lease is held (a newcomer queues behind them).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._budget import ConcurrencyBudget

__all__ = ["Handed", "LeaseQueue", "Waiter"]


class Waiter(NamedTuple):
    holder: Hashable
    token: Hashable
    #: The instant (same clock as ``now``) after which it no longer waits.
    deadline: float


class Handed(NamedTuple):
    """What ``hand_over`` did: leases given to waiters, and waiters whose time ran out."""

    #: (waiter, the lease it now holds), oldest waiter first.
    granted: list[tuple[Waiter, int]]
    expired: list[Waiter]


class LeaseQueue:
    """The waiters for one ``ConcurrencyBudget``'s leases, oldest first."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: deque[Waiter] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    def park(self, holder: Hashable, token: Hashable, deadline: float) -> None:
        """``holder`` waits (as ``token``) for the next free lease, until ``deadline``."""
        self._waiters.append(Waiter(holder, token, deadline))

    def hand_over(self, leases: ConcurrencyBudget, now: float) -> Handed:
        """Give the free leases of ``leases`` to the oldest waiters still waiting."""
        handed = Handed([], [])
        waiters = self._waiters
        while waiters and leases.in_use < leases.limit:
            waiter = waiters.popleft()
            if waiter.deadline <= now:
                handed.expired.append(waiter)
                continue
            lease = leases.acquire(waiter.holder)
            assert lease is not None  # a lease was free
            handed.granted.append((waiter, lease))
        return handed

    def expire(self, now: float) -> list[Waiter]:
        """Take out the waiters whose deadline is at or before ``now``."""
        waiters = self._waiters
        if not any(waiter.deadline <= now for waiter in waiters):
            return []
        gone = [waiter for waiter in waiters if waiter.deadline <= now]
        self._waiters = deque(waiter for waiter in waiters if waiter.deadline > now)
        return gone

    def drop(self, holder: Hashable) -> int:
        """Take out every waiter of ``holder`` (it went away: nobody to answer); how many."""
        before = len(self._waiters)
        self._waiters = deque(waiter for waiter in self._waiters if waiter.holder != holder)
        return before - len(self._waiters)

    def next_deadline(self) -> float:
        """The earliest deadline of a waiter (``inf`` when nobody waits)."""
        return min((waiter.deadline for waiter in self._waiters), default=math.inf)
