"""The dispatcher: every breaker actor of a system, run on one event loop without a task each.

A breaker actor is a mailbox (its inbox and tallies) and a few flags, not an
asyncio task: a task, its wake-up event and their futures cost about 3 KiB a
breaker, and a daemon holds 100,000 of them. The dispatcher keeps a *run
queue* of the actors that have work and gives each a *turn* (the pattern of
Akka's dispatchers):

* An actor is in the run queue at most once (``BreakerActor.queued``) and only
  the loop's thread touches the queue, so one actor's messages are handled
  one at a time, in order, by one thread: no lock, as with a task each.
* A turn handles at most ``THROUGHPUT`` inbox items; an actor with more goes
  to the back of the queue. A busy breaker delays the others by one turn at
  most; it cannot starve them.
* One loop callback runs the turns of the actors queued when it starts; those
  queued meanwhile (the same actors included) wait for the next callback, so
  the connections' IO gets the loop in between.
* A turn that raises outside the handling of one message (a bug in breakerd:
  a message's own failure is answered by the actor) is supervised here: the
  actor is restarted from its machine's successor (``BreakerActor.crash``),
  logged, and the others carry on.
* Time: an actor's deadline (a trial lease's) is a loop timer, armed only while
  it has one; fire-and-forget reports wait for one timer shared by every
  actor, ``REPORT_FLUSH_DELAY`` seconds, so that a busy caller pays one turn
  per batch rather than one per call.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from typing import TYPE_CHECKING, Final

from ._logging import library_logger

if TYPE_CHECKING:
    from ._actor import BreakerActor

__all__ = ["REPORT_FLUSH_DELAY", "THROUGHPUT", "Dispatcher"]

#: Inbox items one actor handles per turn. Each takes 1-2 us: a busy breaker
#: holds the others up for well under a millisecond, and a bulk of reports
#: pays a loop turn per 256 items, not per item.
THROUGHPUT: Final = 256
#: How long fire-and-forget reports may wait in an inbox before a turn.
REPORT_FLUSH_DELAY: Final = 0.002
#: The longest timer armed for a deadline (an infinite one waits as long, again).
_LONGEST_WAIT: Final = 86_400.0

_logger = library_logger()


class Dispatcher:
    """Runs the turns of one system's actors on one event loop (its thread only,
    except for the ``*_threadsafe`` methods)."""

    __slots__ = ("_armed", "_later", "_later_armed", "_queue", "loop", "thread_id")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread_id = threading.get_ident()
        self._queue: deque[BreakerActor] = deque()
        # A callback to run the queue is pending.
        self._armed = False
        # Actors whose fire-and-forget reports wait for the shared flush timer.
        self._later: list[BreakerActor] = []
        self._later_armed = False

    def attach(self, actor: BreakerActor) -> None:
        """Start running ``actor``: a first turn drains what it was sent meanwhile."""
        actor.dispatcher = self
        actor.loop_thread = self.thread_id
        self.schedule(actor)

    def schedule(self, actor: BreakerActor) -> None:
        """Give ``actor`` a turn soon (once, however often asked before it runs)."""
        if actor.queued or actor.stopped:
            return
        actor.queued = True
        self._queue.append(actor)
        if not self._armed:
            self._armed = True
            self.loop.call_soon(self._run)

    def wake(self, actor: BreakerActor) -> None:
        """``schedule`` from any thread."""
        if threading.get_ident() == self.thread_id:
            # The daemon's connections live on the loop's own thread: no need
            # for the self-pipe round trip that call_soon_threadsafe costs.
            self.schedule(actor)
            return
        try:
            self.loop.call_soon_threadsafe(self._schedule_and_run, actor)
        except RuntimeError:
            pass  # the loop is closed: stop() fails whatever is left

    def _schedule_and_run(self, actor: BreakerActor) -> None:
        # Already a loop callback of its own: run the turn now rather than
        # queue another callback for it (a second trip round the loop).
        self.schedule(actor)
        self._run()

    def flush_later(self, actor: BreakerActor) -> None:
        """A turn for ``actor`` once the shared flush timer fires (from any thread)."""
        if threading.get_ident() != self.thread_id:
            try:
                self.loop.call_soon_threadsafe(self.flush_later, actor)
            except RuntimeError:
                pass
            return
        # The daemon's connections post from the loop's own thread: they join
        # the timer directly, not through the self-pipe (a send, a wake-up and
        # a recv for a timer this thread could set itself).
        self._later.append(actor)
        if not self._later_armed:
            self._later_armed = True
            self.loop.call_later(REPORT_FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        self._later_armed = False
        later, self._later = self._later, []
        for actor in later:
            self.schedule(actor)

    def arm(self, actor: BreakerActor, deadline: float | None, now: float) -> None:
        """Give ``actor`` a turn at ``deadline`` (its clock's, read as ``now``), the
        timer it had cancelled; None: no turn at any time."""
        timer = actor.timer
        if timer is not None:
            timer.cancel()
            actor.timer = None
        if deadline is not None:
            delay = deadline - now
            if not math.isfinite(delay):
                delay = _LONGEST_WAIT
            actor.timer = self.loop.call_later(max(0.0, delay), self._due, actor)

    def _due(self, actor: BreakerActor) -> None:
        actor.timer = None
        self.schedule(actor)

    def _run(self) -> None:
        self._armed = False
        queue = self._queue
        for _ in range(len(queue)):
            actor = queue.popleft()
            actor.queued = False
            if actor.stopped:
                continue
            try:
                more = actor.turn(THROUGHPUT)
            except Exception as exc:  # a bug in breakerd: restart, never lose the breaker
                more = self._supervise(actor, exc)
            if more:
                self.schedule(actor)
        if queue and not self._armed:
            self._armed = True
            self.loop.call_soon(self._run)

    def _supervise(self, actor: BreakerActor, exc: Exception) -> bool:
        try:
            actor.crash(None, exc)
        except Exception as again:
            # Not even a restart worked: log it; the next turn tries again.
            actor.restarts += 1
            _logger.error(
                "actor_crashed",
                breaker=actor.name,
                restarts=actor.restarts,
                error=repr(again),
                exc_info=again,
            )
        return True
