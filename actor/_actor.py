"""One breaker actor: owns one ``Machine`` and drains one inbox.

Proxies in any thread hand things over without a lock, relying on operations
that are atomic under the GIL:

* plain successes go into a *tally*: a list bound to the current generation,
  to which a proxy appends a count (``list.append``); the actor takes what is
  there with ``len`` and ``del tally[:n]`` and applies it in bulk. No inbox
  item, no allocation, no per-success work in the actor;
* local rejections go into a second tally, for status only;
* everything else goes into the inbox, a ``deque`` (``append``/``popleft``):
  ``(generation, outcome, duration)`` for other fire-and-forget reports, and
  an ``Envelope`` for a request and the callable that answers it.

The actor applies the tally before every inbox item, so a thread's successes
always count before its own later failure. A transition swaps in a fresh
tally; successes added to the old one after that are stale and dropped, as
any report from an older generation is.

Fire-and-forget reports do not wake a sleeping actor at once: the first one
schedules a drain ``REPORT_FLUSH_DELAY`` seconds later, so a busy caller pays
for one wake-up per batch rather than one per call. Requests wake it at once.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import anyio
import structlog

from breakerd.protocol import (
    Acquire,
    ActorStoppedError,
    Admin,
    Admission,
    BreakerError,
    BreakerStatus,
    CircuitState,
    InboxFullError,
    InvalidRequestError,
    Outcome,
    Report,
    Snapshot,
    StatusRequest,
)

from ._machine import BreakerConfig, Machine, Transition

__all__ = ["BreakerActor", "Envelope", "Reply", "TransitionListener"]

#: Answers a request: ``reply(result, None)`` or ``reply(None, error)``.
Reply: TypeAlias = Callable[[Any, BaseException | None], None]
#: Called in the actor's thread after every transition.
TransitionListener: TypeAlias = Callable[[Transition, Snapshot], None]

ReportItem: TypeAlias = tuple[int, Outcome, float]


#: How long fire-and-forget reports may wait in the inbox before a drain.
REPORT_FLUSH_DELAY: Final = 0.002

_logger = structlog.get_logger("breakerd")

_EVENTS: Final[dict[tuple[CircuitState, CircuitState] | CircuitState, tuple[str, str]]] = {
    (CircuitState.CLOSED, CircuitState.OPEN): ("breaker_opened", "error"),
    (CircuitState.HALF_OPEN, CircuitState.OPEN): ("breaker_reopened", "warning"),
    (CircuitState.OPEN, CircuitState.HALF_OPEN): ("breaker_half_open", "info"),
    (CircuitState.HALF_OPEN, CircuitState.CLOSED): ("breaker_closed", "info"),
    CircuitState.FORCED_OPEN: ("breaker_forced_open", "warning"),
    CircuitState.DISABLED: ("breaker_disabled", "warning"),
    CircuitState.CLOSED: ("breaker_reset", "info"),
}


class Envelope:
    """A request and its reply channel, travelling together (as in pykka)."""

    __slots__ = ("message", "reply")

    def __init__(self, message: object, reply: Reply | None) -> None:
        self.message = message
        self.reply = reply


InboxItem: TypeAlias = ReportItem | Envelope


class BreakerActor:
    """The single owner of one breaker's machine.

    Proxies read ``snapshot`` (replaced, never mutated) to admit locally, and
    talk to the actor through ``post_success``, ``post_report``, ``post_rejection`` and
    ``ask``; all three are safe from any thread.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        *,
        clock: Callable[[], float],
        max_inbox: int = 10_000,
        generation: int = 0,
    ) -> None:
        self.name = name
        self.config = config
        self.machine = Machine(name, config, generation=generation)
        self.snapshot: Snapshot = self.machine.snapshot()
        self.max_inbox = max_inbox
        self.listeners: list[TransitionListener] = []
        #: Called with every snapshot the actor publishes, before listeners
        #: hear of a transition (the daemon's state table: the cheapest way
        #: to tell every client goes first).
        self.on_publish: Callable[[Snapshot], None] | None = None
        self.restarts = 0
        self._clock = clock
        self._inbox: deque[InboxItem] = deque()
        # (generation, tally): read as one attribute so a proxy never pairs
        # one generation's check with another generation's tally.
        self._tally: tuple[int, list[int]] = (self.machine.generation, [])
        self._rejections: list[int] = []
        self._asleep = False
        self._flush_scheduled = False
        self._stopped = False
        self._wake_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._log = _logger.bind(breaker=name)

    # -- any thread ------------------------------------------------------------

    def post_success(self, generation: int, count: int = 1, *, flush: bool = True) -> bool:
        """Count ``count`` plain successes admitted under ``generation``, without waiting.

        ``flush=False`` (the actor's own loop thread only) arms no drain: the
        caller calls ``flush_soon()`` once it is done, unless a request served
        inline has applied the count meanwhile.
        """
        tally_generation, tally = self._tally
        if tally_generation == generation:
            tally.append(count)
            if flush and self._asleep and not self._flush_scheduled:
                self._schedule_flush()
        return True

    def flush_soon(self) -> None:
        """Arm the drain that ``post_success(flush=False)`` left out, if still needed."""
        if (
            self._asleep
            and not self._flush_scheduled
            and (self._tally[1] or self._inbox or self._rejections)
        ):
            self._schedule_flush()

    def post_report(self, item: ReportItem) -> bool:
        """Any outcome, without waiting. False: inbox full, ask instead."""
        inbox = self._inbox
        if len(inbox) >= self.max_inbox or self._stopped:
            return False
        inbox.append(item)
        if self._asleep and not self._flush_scheduled:
            self._schedule_flush()
        return True

    def post_rejection(self, count: int = 1) -> None:
        self._rejections.append(count)

    @property
    def backlog(self) -> int:
        """Items waiting in the inbox (tallies not included: they are counts)."""
        return len(self._inbox)

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None:
        """Queue a request; ``reply`` is called exactly once, from the actor's thread.

        Raises ``InboxFullError`` when the inbox is full (unless ``force``, used
        for reports that must not be lost) and ``ActorStoppedError`` once the
        actor is stopped.
        """
        if self._stopped:
            raise ActorStoppedError(f"breaker {self.name!r}: the actor system is stopped")
        inbox = self._inbox
        if not force and len(inbox) >= self.max_inbox:
            raise InboxFullError(
                f"breaker {self.name!r}: inbox full ({self.max_inbox} pending messages)"
            )
        if self._asleep and not inbox and threading.get_ident() == self._loop_thread:
            # Run to completion: the actor is parked in its own loop, which is
            # the thread we are on, so serving the request here is still
            # serving it alone -- and saves a loop iteration per request.
            self._serve_inline(Envelope(message, reply))
            return
        inbox.append(Envelope(message, reply))
        if self._stopped:
            # stop() ran between our check and the append: fail it ourselves.
            self.stop()
        elif self._asleep:
            self._wake()

    def _serve_inline(self, envelope: Envelope) -> None:
        deadline = self.machine.next_deadline()
        self._take_tallies()
        try:
            self._serve(envelope)
        except Exception as exc:  # a bug in breakerd: restart, never go silent
            self._crash(envelope, exc)
        if self.machine.next_deadline() != deadline:
            # The parked actor sleeps until the old deadline: let it re-arm.
            self._wake()

    def _wake(self) -> None:
        self._asleep = False
        loop, event = self._loop, self._wake_event
        if loop is None or event is None:
            return  # not started yet: run() drains whatever is queued on start
        if threading.get_ident() == self._loop_thread:
            # The daemon's connections live on the actor's own loop: no need
            # for the self-pipe round trip that call_soon_threadsafe costs.
            event.set()
            return
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:
            pass  # loop closed: stop() fails whatever is left

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        loop, event = self._loop, self._wake_event
        if loop is None or event is None:
            return
        if threading.get_ident() == self._loop_thread:
            # The daemon's connections post from the actor's own loop: arm the
            # timer directly, not through the self-pipe (a send, a wake-up and
            # a recv for a timer this thread could set itself).
            loop.call_later(REPORT_FLUSH_DELAY, event.set)
            return
        try:
            loop.call_soon_threadsafe(loop.call_later, REPORT_FLUSH_DELAY, event.set)
        except RuntimeError:
            pass

    # -- the actor's own task ------------------------------------------------------

    async def run(self) -> None:
        """Drain the inbox until cancelled. Never raises because of one message."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        event = self._wake_event = asyncio.Event()
        inbox = self._inbox
        while True:
            self._flush_scheduled = False
            self._drain()
            self._asleep = True
            if inbox or self._tally[1]:
                # A producer added something between our drain and the flag.
                self._asleep = False
                continue
            deadline = self.machine.next_deadline()
            if deadline is None:
                await event.wait()
            else:
                delay = deadline - self._clock()
                if delay > 0:
                    with anyio.move_on_after(delay if math.isfinite(delay) else 86_400.0):
                        await event.wait()
                self._apply(self.machine.expire(self._clock()))
            self._asleep = False
            event.clear()

    def _take_tallies(self) -> None:
        generation, tally = self._tally
        taken = len(tally)
        if taken:
            count = sum(tally[:taken])
            del tally[:taken]
            try:
                transitions = self.machine.record_successes(generation, count, self._clock())
                if transitions:
                    self._apply(transitions)
            except Exception as exc:  # a bug in breakerd: restart, never go silent
                self._crash(None, exc)
        rejections = self._rejections
        taken = len(rejections)
        if taken:
            self.machine.count_rejections(sum(rejections[:taken]))
            del rejections[:taken]

    def _drain(self) -> None:
        inbox = self._inbox
        popleft = inbox.popleft
        self._take_tallies()
        while inbox:
            item = popleft()
            try:
                if type(item) is tuple:
                    generation, outcome, duration = item
                    result = self.machine.record(
                        generation, outcome, self._clock(), duration=duration
                    )
                    if result.transitions:
                        self._apply(result.transitions)
                else:
                    assert isinstance(item, Envelope)
                    self._take_tallies()
                    self._serve(item)
            except Exception as exc:  # a bug in breakerd: restart, never go silent
                self._crash(item, exc)

    def _serve(self, envelope: Envelope) -> None:
        message = envelope.message
        now = self._clock()
        result: object
        if type(message) is Report:
            record = self.machine.record(
                message.generation,
                message.outcome,
                now,
                duration=message.duration,
                lease=message.lease,
                retry_after=message.retry_after,
            )
            self._apply(record.transitions)
            if message.lease and not record.transitions:
                # A trial lease came back: proxies may see trial capacity again.
                self._publish()
            result = self.snapshot
        elif type(message) is Acquire:
            decision = self.machine.acquire(now)
            self._apply(decision.transitions)
            if decision.lease:
                self._publish()
            result = Admission(
                decision.admitted,
                decision.generation,
                decision.lease,
                self.snapshot,
                decision.retry_after,
            )
        elif type(message) is Admin:
            op = message.op
            if op == "force_open":
                transition = self.machine.force_open(now)
            elif op == "disable":
                transition = self.machine.disable(now)
            elif op == "reset":
                transition = self.machine.reset(now)
            else:
                raise InvalidRequestError(f"unknown admin operation {op!r}")
            self._apply((transition,))
            result = self.snapshot
        elif type(message) is StatusRequest:
            self._apply(self.machine.expire(now))
            self.machine.age(now)
            result = self.status()
        else:
            raise InvalidRequestError(f"a breaker actor cannot handle {type(message).__name__}")
        if envelope.reply is not None:
            envelope.reply(result, None)

    def status(self, clients: int = 0) -> BreakerStatus:
        machine = self.machine
        return BreakerStatus(
            snapshot=machine.snapshot(),
            successes=machine.successes,
            failures=machine.failures,
            rejections=machine.rejections,
            ignored=machine.ignored,
            clients=clients,
        )

    def _apply(self, transitions: tuple[Transition, ...]) -> None:
        if not transitions:
            return
        self._publish()
        snapshot = self.snapshot
        for transition in transitions:
            # Listeners first (the daemon's pushes to every client), the log
            # line after: formatting it must not delay the trip's propagation.
            for listener in tuple(self.listeners):
                try:
                    listener(transition, snapshot)
                except Exception:
                    self._log.exception("transition_listener_failed")
            self._log_transition(transition)

    def _publish(self) -> None:
        snapshot = self.machine.snapshot()
        if snapshot.generation != self._tally[0]:
            # Successes still arriving for the old generation are stale.
            self._tally = (snapshot.generation, [])
        self.snapshot = snapshot
        on_publish = self.on_publish
        if on_publish is not None:
            on_publish(snapshot)

    def _log_transition(self, transition: Transition) -> None:
        key: tuple[CircuitState, CircuitState] | CircuitState = (
            transition.from_state,
            transition.to_state,
        )
        if key not in _EVENTS or transition.reason.startswith("admin_"):
            key = transition.to_state
        event, level = _EVENTS[key]
        fields: dict[str, Any] = {
            "from_state": transition.from_state.value,
            "to_state": transition.to_state.value,
            "reason": transition.reason,
            "generation": transition.generation,
        }
        if transition.failure_rate is not None:
            fields["failure_rate"] = round(transition.failure_rate, 4)
        if transition.open_until is not None:
            fields["open_for"] = round(max(0.0, transition.open_until - self._clock()), 3)
        getattr(self._log, level)(event, **fields)

    def _crash(self, item: object, exc: Exception) -> None:
        """Supervision: log, answer the request, restart from a fresh machine."""
        if isinstance(item, Envelope):
            if isinstance(exc, BreakerError):
                # The request was bad, not the actor: answer and carry on.
                if item.reply is not None:
                    item.reply(None, exc)
                return
            if item.reply is not None:
                item.reply(None, BreakerError(f"breaker {self.name!r} crashed: {exc!r}"))
        self.restarts += 1
        old = self.machine
        self._log.error(
            "actor_crashed",
            error=repr(exc),
            restarts=self.restarts,
            exc_info=exc,
        )
        # A fresh machine, a newer generation: permits from before the crash
        # are stale and their reports are dropped rather than misapplied.
        self.machine = Machine(self.name, self.config, generation=old.generation + 1)
        self._publish()

    def stop(self) -> None:
        """Refuse new messages and fail every pending request (never a hang)."""
        self._stopped = True
        error = ActorStoppedError(f"breaker {self.name!r}: the actor system is shutting down")
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, Envelope) and item.reply is not None:
                try:
                    item.reply(None, error)
                except Exception:
                    self._log.exception("reply_failed_on_stop")

    # -- the daemon's state file, reloads and watchdog (the loop thread only) ------

    def settle(self) -> None:
        """Apply whatever is queued (tallies, inbox) now, as the actor's own task would.

        Not from inside a transition listener, which runs in the middle of
        serving a message.
        """
        self._drain()

    def export_state(self) -> dict[str, Any]:
        """The machine's state for the state file (``Machine.export_state``)."""
        return self.machine.export_state(self._clock())

    def restore(self, machine: Machine) -> None:
        """Carry on from a machine restored from the state file (before serving)."""
        self.machine = machine
        self.config = machine.config
        self._publish()

    def reconfigure(self, config: BreakerConfig) -> None:
        """Apply new settings now, keeping the breaker's state (see ``Machine.reconfigure``)."""
        self._take_tallies()
        self.config = config
        self._apply(self.machine.reconfigure(config, self._clock()))
        self._publish()

    def ping(self, reply: Reply) -> None:
        """Answer ``reply`` from the actor's own drain, never inline: proof that it drains."""
        if self._stopped:
            reply(None, ActorStoppedError(f"breaker {self.name!r}: the actor is stopped"))
            return
        self._inbox.append(Envelope(StatusRequest(self.name), reply))
        self._wake()
