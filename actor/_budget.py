"""Budgets: how many calls may leave, and when. Pure: no IO, no clock, no threads.

Every method takes ``now`` (monotonic seconds). A budget answers a request
for admission with the *instant* the call may leave (``now`` or later), or
None when that instant is further away than the caller may wait; the
caller (the embedded proxy, or the daemon on behalf of a process) does the
waiting. Three kinds, combined by the caller:

* ``RateBudget``: a paced request rate (GCRA, the virtual scheduling
  algorithm of ATM networks and of most API gateways). Each admission
  reserves the next slot of a schedule spaced ``1 / (rate * margin)``
  apart; ``burst`` slots may be taken at once after an idle spell. So in
  any window of ``t`` seconds at most ``rate * margin * t + burst`` calls
  leave. Calls are *paced* rather than released in bursts, and at
  ``SAFETY_MARGIN`` (95 %) of the rate: a server counts arrivals by its own
  clock, and calls released at exactly the rate bunch in transit (measured
  against a server that enforces exactly 20 per sliding second: 5 to 9
  429s in 6 s at 100 %), so a schedule with no slack is a schedule of 429s.
* ``ConcurrencyBudget``: at most ``limit`` leases held at once (a bulkhead),
  each owned by a holder so that every lease of a holder that goes away
  (a dead process) can be released at once.
* ``HeaderBudget``: what the API said is left (``x-ratelimit-remaining-*``
  and ``x-ratelimit-reset-*``). While plenty is left calls leave at once;
  once the requests left fall to ``low_water``, the calls left are spread
  evenly over the time to the reset instead of spent at once, and with none
  left a call waits for the reset. Calls admitted but not finished yet
  were probably not counted in the numbers a response carried, so they are
  subtracted from them (the estimate errs low, never high). Tokens: each
  call debits its estimated cost; a response's ``usage`` corrects it (the
  rules of the token count are ``_tokens.TokenLimit``'s).

The daemon's side, the budgets of every breaker by name, is
``_budget_table.BudgetTable``.

``parse_rate`` reads ``"500/min"``-style rates with errors that say what is
accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

from ._tokens import TokenLimit

__all__ = [
    "RAMP_STEP",
    "SAFETY_MARGIN",
    "ConcurrencyBudget",
    "HeaderBudget",
    "RateBudget",
    "parse_rate",
    "ramp_offset",
]

#: Fraction of a ``max_rate`` that is actually scheduled (see the module's doc).
SAFETY_MARGIN: Final = 0.95

# Floating-point slack when comparing instants (a nanosecond).
_EPSILON: Final = 1e-9

#: Seconds between two doublings of the recovery ramp (see ``ramp_offset``).
RAMP_STEP: Final = 0.1

_UNITS: Final[dict[str, float]] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*(\d+(?:\.\d*)?)?\s*([a-z]+?)s?\s*")


def parse_rate(rate: object) -> float:
    """Calls per second from ``"500/min"``, ``"20/s"``, ``"1000/h"``, ``"3/10s"``.

    Raises ``ValueError`` naming the accepted forms for anything else
    (a number alone is refused: "per what" must be said).
    """
    if isinstance(rate, str):
        match = _RATE.fullmatch(rate.lower())
        if match is not None:
            count, multiple, unit = match.groups()
            seconds = _UNITS.get(unit)
            if seconds is not None:
                period = seconds * float(multiple) if multiple else seconds
                calls = float(count)
                if calls > 0 and period > 0 and math.isfinite(calls):
                    return calls / period
    raise ValueError(
        f"max_rate must be a string like '500/min', '20/s', '1000/hour' or '3/10s' "
        f"(a count > 0 per s, min, h or day), got {rate!r}"
    )


def ramp_offset(index: int, step: float = RAMP_STEP) -> float:
    """Seconds after a recovery at which the ``index``-th waiting call (from 0) is released.

    A doubling ramp, like TCP's slow start: 1 call at once, 2 more after
    ``step``, 4 more after ``2 * step``... so 1,000 waiters are all out
    within a second, while a service that just came back (cold caches,
    empty connection pools) first sees a trickle, and if those calls fail
    again the breaker reopens before the rest have left.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index!r}")
    return step * int(math.log2(index + 1))


class RateBudget:
    """A paced request rate: GCRA (virtual scheduling) at ``SAFETY_MARGIN`` of ``rate``.

    Args:
        rate: Calls per second promised (see ``parse_rate``).
        burst: Calls that may leave together after an idle spell (>= 1).
        margin: Fraction of ``rate`` scheduled (default ``SAFETY_MARGIN``).
    """

    __slots__ = ("_tat", "_tolerance", "burst", "interval", "margin", "rate")

    def __init__(self, rate: float, burst: int = 1, margin: float = SAFETY_MARGIN) -> None:
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a number of calls per second > 0, got {rate!r}")
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        if not (0 < margin <= 1):
            raise ValueError(f"margin must be in (0, 1], got {margin!r}")
        self.rate = float(rate)
        self.burst = burst
        self.margin = margin
        #: Seconds between two scheduled calls.
        self.interval = 1.0 / (rate * margin)
        self._tolerance = (burst - 1) * self.interval
        # The theoretical arrival time: when the schedule is free again.
        self._tat = -math.inf

    def reserve(self, now: float, max_wait: float = 0.0) -> float | None:
        """The instant the next call may leave, reserved; None if past ``now + max_wait``.

        A refused call reserves nothing (``next_free`` says when to come back).
        """
        tat = max(self._tat, now)
        leave = tat - self._tolerance
        if leave - now <= _EPSILON:
            leave = now  # rounding must not cost a burst its last slot
        elif leave - now > max_wait:
            return None
        self._tat = tat + self.interval
        return leave

    def backlog(self, now: float) -> int:
        """Slots reserved that leave after ``now``: calls waiting for their turn."""
        if self._tat <= now:
            return 0  # (-inf before the first call)
        ahead = (self._tat - self._tolerance - now) / self.interval - 1
        return max(0, math.ceil(ahead - _EPSILON))

    def settled(self, now: float) -> bool:
        """Nothing reserved reaches past ``now``: a new schedule would promise no more."""
        return self._tat <= now

    def next_free(self, now: float) -> float:
        """The instant a call asking now would leave (nothing reserved)."""
        return max(now, max(self._tat, now) - self._tolerance)

    def give_back(self, leave: float) -> None:
        """Return the slot reserved for ``leave`` if it is the last one (a waiter gave up).

        Any other slot stays spent: freeing it would let the later ones
        bunch up, and a spent slot only costs throughput, never a 429.
        """
        if self._tat - self.interval <= leave + 1e-12 and self._tat > leave:
            self._tat -= self.interval


class ConcurrencyBudget:
    """At most ``limit`` leases held at once, each by a holder (a process, a thread...)."""

    __slots__ = ("_held", "_next_id", "limit")

    def __init__(self, limit: int) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"max_concurrent must be an integer >= 1, got {limit!r}")
        self.limit = limit
        self._held: dict[int, Hashable] = {}
        self._next_id = 1

    @property
    def in_use(self) -> int:
        return len(self._held)

    def acquire(self, holder: Hashable = None) -> int | None:
        """A lease id (> 0), or None when all ``limit`` are held."""
        if len(self._held) >= self.limit:
            return None
        lease = self._next_id
        self._next_id += 1
        self._held[lease] = holder
        return lease

    def release(self, lease: int) -> bool:
        """Give a lease back; False if it was not held (released twice, or its holder left)."""
        return self._held.pop(lease, self) is not self

    def owner(self, lease: int) -> Hashable:
        """The holder of ``lease`` (None if it is not held)."""
        return self._held.get(lease)

    def release_holder(self, holder: Hashable) -> int:
        """Release every lease of ``holder`` (it went away); how many there were."""
        mine = [lease for lease, owner in self._held.items() if owner == holder]
        for lease in mine:
            del self._held[lease]
        return len(mine)


@dataclass(slots=True)
class _Limit:
    """What is left of the API's request limit, as estimated."""

    remaining: float = math.inf
    reset_at: float = -math.inf
    #: The length of the window the last observation reported (its reset time).
    window: float = 1.0
    limit: float | None = None

    def known(self, now: float) -> bool:
        return now < self.reset_at


class HeaderBudget:
    """Admissions paced by what the API's headers said is left.

    Args:
        low_water: Fraction of the request limit (when the API sent
            ``x-ratelimit-limit-requests``) at or below which the calls left
            are spread over the time to the reset.
        min_low_water: The least number of requests counted as "low" (all of
            it without a known limit).
    """

    __slots__ = (
        "_in_flight",
        "_next",
        "_paced",
        "_requests",
        "_tokens",
        "low_water",
        "min_low_water",
    )

    def __init__(self, low_water: float = 0.2, min_low_water: int = 2) -> None:
        if not 0 <= low_water < 1:
            raise ValueError(f"low_water must be in [0, 1), got {low_water!r}")
        if not isinstance(min_low_water, int) or min_low_water < 0:
            raise ValueError(f"min_low_water must be an integer >= 0, got {min_low_water!r}")
        self.low_water = low_water
        self.min_low_water = min_low_water
        self._requests = _Limit()
        self._tokens = TokenLimit(SAFETY_MARGIN)
        # Calls admitted and not finished: not in the numbers a response carried yet.
        self._in_flight = 0
        # The instant the next call may leave while pacing (-inf: not pacing).
        self._next = -math.inf
        # The instant the next call may leave at the limit's own pace.
        self._paced = -math.inf

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def remaining_requests(self, now: float) -> float:
        """Requests estimated left before the reset (``inf`` when nothing is known)."""
        return self._requests.remaining if self._requests.known(now) else math.inf

    def remaining_tokens(self, now: float) -> float:
        """Tokens estimated left before the reset (``inf`` when nothing is known)."""
        return self._tokens.left(now)

    def reset_requests_in(self, now: float) -> float | None:
        """Seconds until the request count resets, as last said (None: unknown or past)."""
        return self._requests.reset_at - now if self._requests.known(now) else None

    def reset_tokens_in(self, now: float) -> float | None:
        """Seconds until the token count resets, as estimated (None: unknown or past)."""
        return self._tokens.reset_in(now)

    def observe(
        self,
        now: float,
        *,
        remaining_requests: float | None = None,
        reset_requests: float | None = None,
        remaining_tokens: float | None = None,
        reset_tokens: float | None = None,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
    ) -> None:
        """Take in what one response's headers said (reset times in seconds from now).

        Call it before ``done`` for the call that carried them. A count
        without its reset time is kept for one second, the shortest window
        an API counts in.
        """
        # The calls still in flight, but for the one that carried these.
        others = max(self._in_flight - 1, 0)
        self._tokens.observe(now, remaining_tokens, reset_tokens, limit_tokens, others)
        limit = self._requests
        if limit_requests is not None and limit_requests > 0:
            limit.limit = float(limit_requests)
        if remaining_requests is not None and remaining_requests >= 0:
            reset = reset_requests
            seconds = 1.0 if reset is None or not math.isfinite(reset) else max(reset, 0.0)
            limit.remaining = max(float(remaining_requests) - others, 0.0)
            limit.reset_at = now + seconds
            # The longest reset seen: the window's length (a sliding window's
            # reset is shorter by the age of its newest call).
            limit.window = max(limit.window, seconds, 1e-3)
        requests = self._requests
        if requests.known(now):
            left = requests.remaining
            if left > self._low():
                self._next = -math.inf
            elif left >= 1 and self._next > now:
                # More is left than when the waiting calls were spaced: sooner.
                self._next = min(self._next, now + (requests.reset_at - now) / (left + 1))

    def _low(self) -> float:
        limit = self._requests.limit
        floor = float(self.min_low_water)
        return floor if limit is None else max(floor, limit * self.low_water)

    def _spacing_after_reset(self) -> float:
        # Calls that waited for a reset leave spread over a window's length,
        # not as one stampede at the reset.
        # At the safety margin, as a max_rate is paced: calls released at
        # exactly the limit bunch in transit and earn the odd 429.
        requests = self._requests
        count = requests.limit if requests.limit is not None else max(self._low(), 1.0)
        return requests.window / (count * SAFETY_MARGIN)

    def _plan(self, now: float, tokens: float) -> tuple[float, float]:
        # (when the call may leave, the spacing to the next one while pacing)
        leave = now
        requests = self._requests
        spacing = 0.0
        if requests.known(now):
            left = requests.remaining
            if left < 1:
                leave = max(requests.reset_at, self._next)
                spacing = self._spacing_after_reset()
            elif left <= self._low():
                leave = max(now, self._next)
                spacing = (requests.reset_at - leave) / (left + 1)
        elif self._next > now:
            leave = self._next  # still leaving one by one after a reset
            spacing = self._spacing_after_reset()
        if requests.limit is not None:
            leave = max(leave, self._paced)
        leave = max(leave, self._tokens.earliest(now, tokens))
        return leave, spacing

    def next_free(self, now: float, tokens: float = 0.0) -> float:
        """The instant a call asking now would leave (nothing reserved)."""
        self._tokens.prepare(now, tokens)
        return self._plan(now, tokens)[0]

    def reserve(self, now: float, max_wait: float = 0.0, tokens: float = 0.0) -> float | None:
        """The instant the call may leave (``tokens`` debited), or None past ``max_wait``.

        Nothing is reserved for a refused call.
        """
        self._tokens.prepare(now, tokens)
        leave, spacing = self._plan(now, tokens)
        if leave - now > max_wait:
            return None
        requests = self._requests
        if requests.known(now):
            requests.remaining -= 1
        if spacing > 0:
            self._next = leave + spacing
        if requests.limit is not None:
            # Never faster than the limit itself allows over its window (at
            # the safety margin): a burst spent because much was left at one
            # instant would still fill a sliding window for a whole window.
            self._paced = leave + requests.window / (requests.limit * SAFETY_MARGIN)
        self._tokens.debit(now, tokens, leave)
        self._in_flight += 1
        return leave

    def done(
        self, now: float, estimated_tokens: float = 0.0, used_tokens: float | None = None
    ) -> None:
        """A call admitted here finished; ``used_tokens`` (its ``usage``) corrects its estimate."""
        self._in_flight = max(self._in_flight - 1, 0)
        if used_tokens is not None:
            self._tokens.correct(now, estimated_tokens - used_tokens)

    def started(self, calls: int) -> None:
        """``calls`` left without being admitted here (before any budget was known)."""
        self._in_flight += calls

    def moved(self, planned: float, leave: float) -> None:
        """The call admitted for ``planned`` leaves at ``leave`` instead (a rate's slot):
        the pacing counts from when it really leaves."""
        if leave > planned:
            if self._paced > -math.inf:
                self._paced += leave - planned
            if self._next > -math.inf:
                self._next += leave - planned

    def credit(self, now: float, tokens: float) -> None:
        """Tokens estimated for calls that turned out to use fewer (their ``usage``)."""
        self._tokens.correct(now, tokens)

    def give_back(self, now: float, tokens: float = 0.0) -> None:
        """The call admitted last never left (its waiter gave up): undo its debit."""
        self._in_flight = max(self._in_flight - 1, 0)
        if self._requests.known(now):
            self._requests.remaining += 1
        self._tokens.give_back(now, tokens)
