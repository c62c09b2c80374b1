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
tally; successes added to the old one after that are stale: they stay out of
the window and count in the totals, as any report from an older generation.

A success goes into the tally only while the snapshot says no run of
successes can change the state (``Snapshot.successes_safe``): the tally is
then keyed by the generation, otherwise by a key no permit carries, so the
proxy's one comparison fails and it asks instead, and waits for the answer
(read your own writes for a success that may trip the breaker).

Fire-and-forget reports do not wake a sleeping actor at once: the first one
schedules a drain ``REPORT_FLUSH_DELAY`` seconds later, so a busy caller pays
for one wake-up per batch rather than one per call. Requests wake it at once.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import anyio

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

from ._logging import library_logger
from ._machine import BreakerConfig, IllegalTransitionError, Machine, Transition
from ._reasons import ADMIN_REASONS, TransitionReason

__all__ = ["BreakerActor", "CallTimes", "Envelope", "Reply", "TransitionListener"]

#: Answers a request: ``reply(result, None)`` or ``reply(None, error)``.
Reply: TypeAlias = Callable[[Any, BaseException | None], None]
#: Called in the actor's thread after every transition.
TransitionListener: TypeAlias = Callable[[Transition, Snapshot], None]

ReportItem: TypeAlias = tuple[int, Outcome, float]


#: How long fire-and-forget reports may wait in the inbox before a drain.
REPORT_FLUSH_DELAY: Final = 0.002
#: The tally's key while a success may change the state: no permit has it.
_ASK_FOR_SUCCESSES: Final = -(1 << 62)
#: Tallies of older generations drained for the totals before they are dropped:
#: a proxy preempted between reading the tally and appending to it still counts.
_RETIRED_TALLIES: Final = 4

_logger = library_logger()

_EVENTS: Final[dict[tuple[CircuitState, CircuitState] | CircuitState, tuple[str, str]]] = {
    (CircuitState.CLOSED, CircuitState.OPEN): ("breaker_opened", "error"),
    (CircuitState.HALF_OPEN, CircuitState.OPEN): ("breaker_reopened", "warning"),
    (CircuitState.OPEN, CircuitState.HALF_OPEN): ("breaker_half_open", "info"),
    (CircuitState.HALF_OPEN, CircuitState.CLOSED): ("breaker_closed", "info"),
    (CircuitState.OPEN, CircuitState.OPEN): ("breaker_open_extended", "warning"),
    CircuitState.FORCED_OPEN: ("breaker_forced_open", "warning"),
    CircuitState.DISABLED: ("breaker_disabled", "warning"),
    CircuitState.CLOSED: ("breaker_reset", "info"),
}


class CallTimes:
    """Seconds and slow calls of the outcomes reported one by one, for metrics.

    Batched plain successes carry no duration and never reach this. The
    actor's thread writes it; another thread may read any one field (a
    float or int attribute read is atomic under the GIL).
    """

    __slots__ = ("failed", "ignored", "slow_failed", "slow_successful", "successful")

    def __init__(self) -> None:
        self.successful = 0.0
        self.failed = 0.0
        self.ignored = 0.0
        self.slow_successful = 0
        self.slow_failed = 0

    def add(self, outcome: Outcome, duration: float, slow_call_duration: float | None) -> None:
        if outcome is Outcome.SUCCESS:
            self.successful += duration
            if slow_call_duration is not None and duration > slow_call_duration:
                self.slow_successful += 1
        elif outcome is Outcome.FAILURE or outcome is Outcome.RATE_LIMITED:
            self.failed += duration
            if slow_call_duration is not None and duration > slow_call_duration:
                self.slow_failed += 1
        elif outcome is Outcome.IGNORED:
            self.ignored += duration


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
        first_lease: int = 1,
    ) -> None:
        self.name = name
        self.config = config
        self.machine = Machine(name, config, generation=generation, first_lease=first_lease)
        self._own_pid = os.getpid()
        self.snapshot: Snapshot = self.machine.snapshot()
        self.seen = self.snapshot  # the snapshot admit() answers from: the facade's slow path
        self._plain = _plain_generation(self.snapshot)
        self.max_inbox = max_inbox
        self.listeners: list[TransitionListener] = []
        #: Called with every snapshot the actor publishes, before listeners
        #: hear of a transition (the daemon's state table: the cheapest way
        #: to tell every client goes first).
        self.on_publish: Callable[[Snapshot], None] | None = None
        #: The fleet's say on a trial (the daemon's fleet link): asked with the
        #: breaker's name when an open breaker's time is up; False keeps it
        #: open and rejects the call, as another host holds the trial lease.
        self.trial_gate: Callable[[str], bool] | None = None
        self.restarts = 0
        #: Transitions since the actor started, by (from_state, to_state)
        #: values. Replaced at every transition, never mutated, so another
        #: thread (a metrics scrape) reads it whole.
        self.transition_counts: dict[tuple[str, str], int] = {}
        #: Durations and slow calls reported to this actor, stale reports too.
        self.call_times = CallTimes()
        self._clock = clock
        self._inbox: deque[InboxItem] = deque()
        # (key, tally): read as one attribute so a proxy never pairs one
        # generation's check with another generation's tally. The key is the
        # generation, or _ASK_FOR_SUCCESSES while successes must be asked.
        self._tally: tuple[int, list[int]] = (self.machine.generation, [])
        self._tally_generation = self.machine.generation
        self._retired: deque[tuple[int, list[int]]] = deque(maxlen=_RETIRED_TALLIES)
        self._stale_successes: list[int] = []
        self._rejections: list[int] = []
        self._asleep = False
        self._flush_scheduled = False
        self._stopped = False
        self._wake_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._log = _logger.bind(breaker=name)

    # -- any thread ------------------------------------------------------------

    def admit(self) -> int | None:
        """The generation a plain call (closed, not timed) runs under now, else None."""
        return self._plain  # set at every publish: the facade's fast path reads no snapshot

    def post_success(self, generation: int, count: int = 1, *, flush: bool = True) -> bool:
        """Count ``count`` plain successes admitted under ``generation``, without waiting.

        False when a success may change the state now: ``ask`` with the
        ``Report`` instead, and wait. ``flush=False`` (the actor's own loop
        thread only) arms no drain: the caller calls ``flush_soon()`` once it
        is done, unless a request served inline has applied the count meanwhile.
        """
        tally_key, tally = self._tally
        if tally_key == generation:
            tally.append(count)
            if flush and self._asleep and not self._flush_scheduled:
                self._schedule_flush()
            return True
        if generation == self._tally_generation:
            return False
        self.add_successes(generation, count, flush=flush)
        return True

    def add_successes(self, generation: int, count: int, *, flush: bool = True) -> None:
        """Count successes that were not waited for, whatever they may change.

        For the daemon, which applies what its clients sent: whether a success
        had to be waited for was the client's decision, made from the snapshot
        it had. ``flush`` as for ``post_success``.
        """
        tally_generation, tally = self._tally_generation, self._tally[1]
        if tally_generation != generation:
            tally = self._stale_successes  # the books only
        tally.append(count)
        if flush and self._asleep and not self._flush_scheduled:
            self._schedule_flush()

    def flush_soon(self) -> None:
        """Arm the drain that ``post_success(flush=False)`` left out, if still needed."""
        if (
            self._asleep
            and not self._flush_scheduled
            and (self._tally[1] or self._inbox or self._rejections or self._stale_successes)
        ):
            self._schedule_flush()

    def post_report(self, item: ReportItem) -> bool:
        """Any outcome, without waiting. False: inbox full, or a success that
        may change the state: ask instead."""
        if (
            item[1] is Outcome.SUCCESS
            and item[0] == self._tally_generation
            and self._tally[0] != item[0]
        ):
            return False
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
    def stopped(self) -> bool:
        """``stop()`` was called: the actor takes nothing more and its task ends."""
        return self._stopped

    @property
    def idle(self) -> bool:
        """Nothing waits for the actor: no inbox item, no counts to apply."""
        return not self._inbox and not self._tally[1] and not self._rejections

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
        while not self._stopped:
            self._flush_scheduled = False
            self._drain()
            self._asleep = True
            if inbox or self._tally[1] or self._stale_successes:
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
                try:
                    self._apply(self.machine.expire(self._clock()))
                except Exception as exc:  # a bug in breakerd: restart, never wedge
                    self._crash(None, exc)
            self._asleep = False
            event.clear()

    def _take_tallies(self) -> None:
        tally = self._tally[1]
        taken = len(tally)
        if taken:
            count = sum(tally[:taken])
            del tally[:taken]
            try:
                machine = self.machine
                transitions = machine.record_successes(self._tally_generation, count, self._clock())
                if transitions:
                    self._apply(transitions)
                elif not self.snapshot.successes_safe and machine.successes_safe():
                    self._publish()  # judged within the threshold: back to the fast path
            except Exception as exc:  # a bug in breakerd: restart, never go silent
                self._crash(None, exc)
        stale = self._stale_successes
        for _, retired in self._retired:
            if retired:
                taken = len(retired)
                stale.append(sum(retired[:taken]))
                del retired[:taken]
        taken = len(stale)
        if taken:
            self.machine.count_stale_successes(sum(stale[:taken]))
            del stale[:taken]
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
                    self.call_times.add(outcome, duration, self.config.slow_call_duration)
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
            self.call_times.add(message.outcome, message.duration, self.config.slow_call_duration)
            record = self.machine.record(
                message.generation,
                message.outcome,
                now,
                duration=message.duration,
                lease=message.lease,
                retry_after=message.retry_after,
                reason=message.reason,
                error_code=message.error_code,
                # The daemon names its peer; in-process, the reporter is us.
                pid=message.pid or self._own_pid,
            )
            self._apply(record.transitions)
            if not record.transitions and (
                message.lease or self.machine.successes_safe() != self.snapshot.successes_safe
            ):
                # A trial lease came back (proxies may see trial capacity
                # again), or successes may trip the window now, or no longer.
                self._publish()
            result = self.snapshot
        elif type(message) is Acquire:
            machine = self.machine
            gate = self.trial_gate
            if (
                gate is not None
                and machine.state is CircuitState.OPEN
                and machine.open_until is not None
                and now >= machine.open_until
                and not gate(self.name)
            ):
                # Another host runs the trials: no call leaves this one.
                machine.count_rejections(1)
                result = Admission(False, machine.generation, 0, self.snapshot, None)
                if envelope.reply is not None:
                    envelope.reply(result, None)
                return
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
            if transition is not None:
                self._apply((transition,))
            elif op == "reset":
                self._publish()  # the same state with an empty window
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
        counts = dict(self.transition_counts)
        for transition in transitions:
            key = (transition.from_state.value, transition.to_state.value)
            counts[key] = counts.get(key, 0) + 1
        self.transition_counts = counts
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
        generation = snapshot.generation
        tally = self._tally[1]
        if generation != self._tally_generation:
            # Successes still arriving for the old generation are stale: the
            # next drains count them in the totals.
            self._retired.append((self._tally_generation, tally))
            tally = []
            self._tally_generation = generation
        self._tally = (generation if snapshot.successes_safe else _ASK_FOR_SUCCESSES, tally)
        self.seen = snapshot
        self._plain = _plain_generation(snapshot)
        self.snapshot = snapshot
        on_publish = self.on_publish
        if on_publish is not None:
            on_publish(snapshot)

    def _log_transition(self, transition: Transition) -> None:
        key: tuple[CircuitState, CircuitState] | CircuitState = (
            transition.from_state,
            transition.to_state,
        )
        if key not in _EVENTS or transition.reason in ADMIN_REASONS:
            key = transition.to_state
        event, level = _EVENTS[key]
        fields: dict[str, Any] = {
            "from_state": transition.from_state.value,
            "to_state": transition.to_state.value,
            # The plain string: the stdlib route renders values with repr().
            "reason": transition.reason.value,
            "generation": transition.generation,
        }
        if transition.failure_rate is not None:
            fields["failure_rate"] = round(transition.failure_rate, 4)
        if transition.error_code is not None:
            fields["error_code"] = transition.error_code
        if transition.pid:
            fields["pid"] = transition.pid
        if transition.open_until is not None:
            fields["open_for"] = round(max(0.0, transition.open_until - self._clock()), 3)
        getattr(self._log, level)(event, **fields)

    def _crash(self, item: object, exc: Exception) -> None:
        """Supervision: log, answer the request, restart from the machine's successor."""
        if isinstance(item, Envelope):
            if isinstance(exc, BreakerError) and not isinstance(exc, IllegalTransitionError):
                # The request was bad, not the actor: answer and carry on
                # (an illegal transition is a bug in the machine: restart it).
                if item.reply is not None:
                    item.reply(None, exc)
                return
            if item.reply is not None:
                item.reply(None, BreakerError(f"breaker {self.name!r} crashed: {exc!r}"))
        self.restarts += 1
        old = self.machine
        now = self._clock()
        # A newer generation: permits from before the crash are stale and
        # their reports are dropped rather than misapplied. The state is kept
        # (half-open becomes open): a bug must never fail a breaker open.
        self.machine = old.successor(now)
        self._log.error(
            "actor_crashed",
            error=repr(exc),
            restarts=self.restarts,
            state=self.machine.state.value,
            exc_info=exc,
        )
        if old.state is not self.machine.state:
            # half-open -> open: tell the listeners (the daemon's pushes).
            self._apply(
                (
                    Transition(
                        old.state,
                        self.machine.state,
                        self.machine.generation,
                        TransitionReason.ACTOR_RESTARTED,
                        open_until=self.machine.open_until,
                    ),
                )
            )
        else:
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
        if self._loop is not None:
            self._wake()  # let run() see the flag and return

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

    def fleet_open(self, until: float) -> None:
        """Open until ``until`` (this clock) because of other hosts (``Machine.fleet_open``)."""
        self._take_tallies()
        deadline = self.machine.next_deadline()
        generation = self.machine.generation
        self._apply(self.machine.fleet_open(until, self._clock()))
        if self.machine.generation != generation:
            self._publish()
        if self.machine.next_deadline() != deadline:
            self._wake()

    def fleet_close(self) -> None:
        """Another host's trials succeeded: close (``Machine.fleet_close``)."""
        self._take_tallies()
        self._apply(self.machine.fleet_close(self._clock()))
        self._wake()

    def ping(self, reply: Reply) -> None:
        """Answer ``reply`` from the actor's own drain, never inline: proof that it drains."""
        if self._stopped:
            reply(None, ActorStoppedError(f"breaker {self.name!r}: the actor is stopped"))
            return
        self._inbox.append(Envelope(StatusRequest(self.name), reply))
        self._wake()


def _plain_generation(snapshot: Snapshot) -> int | None:
    # admit()'s answer (clients._plan.plain_generation: the actor cannot import it).
    plain = snapshot.state is CircuitState.CLOSED and snapshot.slow_call_duration is None
    return snapshot.generation if plain else None
