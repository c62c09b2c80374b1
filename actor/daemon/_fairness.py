"""What one connection's traffic may cost the others: read budgets, and repeated warnings.

The daemon's one loop thread serves every connection. A connection that
streams big frames would have the loop spend each turn decoding them while
the others' small requests wait; a connection that sends items the daemon
warns about would have it write a log line per item.

* ``ReadScheduler``: each connection may send ``read_budget`` bytes per loop
  turn (the connection keeps the count); one that sent more is *throttled*,
  not read until later turns pay back what it overdrew, and while the daemon
  has just been busy with such connections, what they sent is *deferred*
  to a later turn. Small requests are never held back.
* ``RepeatedEvents``: per connection, the first of each warning is logged in
  full, the rest are counted and summarized.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Final, Generic, Protocol, TypeVar

__all__ = ["LOG_SUMMARY_INTERVAL", "TURN_BUDGET", "ReadScheduler", "Reader", "RepeatedEvents"]

#: Seconds per loop turn for handling the data of connections past their
#: read budget; once spent, more of it waits for a later turn. A 1 MiB frame
#: of reports takes ~100 ms to decode, in one piece: after such a piece the
#: others get as long again (see ``ReadScheduler.spent``).
TURN_BUDGET: Final = 0.005
#: Seconds between two summaries of one connection's repeated log event.
LOG_SUMMARY_INTERVAL: Final = 10.0


class Reader(Protocol):
    """A connection as the scheduler sees it."""

    def hold(self) -> None:
        """Stop reading (until as many releases as holds)."""

    def repaid(self) -> bool:
        """One more turn has passed: True once reading resumed (or it is closed)."""

    def handle_deferred(self) -> None:
        """Handle what was received but left for later, then release the hold."""


R = TypeVar("R", bound=Reader)


class ReadScheduler(Generic[R]):
    """Throttled and deferred connections, and the turns that release them.

    Turns are counted only while a connection is over its budget: a turn
    more per request would cost every client a spare trip round the loop.
    """

    def __init__(self) -> None:
        #: Advances once per loop turn while a connection is over its budget.
        self.turn = 0
        self._turn_armed = False
        #: Connections paused until the turns have paid back what they overdrew.
        self.throttled: set[R] = set()
        #: Seconds spent this turn handling what connections sent.
        self.turn_spent = 0.0
        #: Connections whose received bytes wait for a turn with time left.
        self.deferred: collections.deque[R] = collections.deque()
        # perf_counter() before which deferred connections wait (see spent()).
        self._rest_until = 0.0
        self._rest_armed = False

    def throttle(self, reader: R) -> None:
        """``reader`` went over its budget: not read until ``repaid()`` says so."""
        if reader not in self.throttled:
            reader.hold()
            self.throttled.add(reader)
        self._next_turn_soon()

    def forget(self, reader: R) -> None:
        """``reader`` is closed (a deferred one is skipped when its turn comes)."""
        self.throttled.discard(reader)

    def may_work_for_big_readers(self) -> bool:
        """Whether data of connections past their read budget may be handled now."""
        return self.turn_spent < TURN_BUDGET and time.perf_counter() >= self._rest_until

    def spent(self, started: float) -> None:
        """Account for the time since ``started`` spent handling a connection's data."""
        now = time.perf_counter()
        spent = now - started
        self.turn_spent += spent
        if spent >= TURN_BUDGET:
            # One long piece of work (a big frame's decoding cannot be cut):
            # as long again for everyone else before the next one.
            self._rest_until = now + spent

    def defer(self, reader: R) -> None:
        """Handle what ``reader`` sent in a later turn; it is not read meanwhile."""
        reader.hold()
        self.deferred.append(reader)
        self._next_turn_soon()

    def _next_turn_soon(self) -> None:
        if not self._turn_armed:
            self._turn_armed = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._turn_armed = False
        self.turn += 1
        self.turn_spent = 0.0
        throttled = self.throttled
        if throttled:
            for reader in tuple(throttled):
                if reader.repaid():
                    throttled.discard(reader)
        deferred = self.deferred
        # First come, first served, while there is time for them.
        while deferred and self.may_work_for_big_readers():
            deferred.popleft().handle_deferred()
        if throttled:
            self._next_turn_soon()
        elif deferred and not self._rest_armed:
            self._rest_armed = True
            delay = max(0.0, self._rest_until - time.perf_counter())
            asyncio.get_running_loop().call_later(delay, self._rested)

    def _rested(self) -> None:
        self._rest_armed = False
        self._next_turn_soon()


class RepeatedEvents:
    """One connection's repeated warnings: the first logged in full, the rest counted.

    A client can make the daemon warn once per item it sends (a report for
    a breaker nobody registered); a line per item would turn a flood into
    megabytes of log and seconds of stall. Repeats are summed and logged as
    one ``summary`` line of the same event per ``LOG_SUMMARY_INTERVAL``, and
    at close.
    """

    __slots__ = ("_since", "counts", "pending")

    def __init__(self) -> None:
        self._since = time.monotonic()
        #: Event -> repeats not yet summarized (present once logged in full).
        self.counts: dict[str, int] = {}
        self.pending = False

    def warning(self, log: Any, event: str, **fields: Any) -> None:
        count = self.counts.get(event)
        if count is None:
            self.counts[event] = 0
            log.warning(event, **fields)
        else:
            self.counts[event] = count + 1
            self.pending = True

    def summarize(self, log: Any, *, final: bool = False) -> None:
        """Log what was counted, if ``LOG_SUMMARY_INTERVAL`` has passed (or ``final``)."""
        now = time.monotonic()
        if not self.pending or (not final and now - self._since < LOG_SUMMARY_INTERVAL):
            return
        for event, count in self.counts.items():
            if count:
                log.warning(event, summary=True, count=count, seconds=round(now - self._since, 3))
                self.counts[event] = 0
        self._since = now
        self.pending = False
