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

An actor is no task: the system's dispatcher (``_dispatcher.py``) gives it a
*turn* when it has work; between turns it is *asleep*. Its inbox, lists and
call times are made on first use: a daemon holds 100,000 mostly quiet ones.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

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

from ._admit import AdmitsPlainCalls
from ._dispatcher import REPORT_FLUSH_DELAY
from ._envelope import NO_CALL_TIMES as _NO_CALL_TIMES
from ._envelope import NO_TRANSITIONS_YET as _NO_TRANSITIONS_YET
from ._envelope import TRANSITION_EVENTS as _EVENTS
from ._envelope import CallTimes, Envelope, InboxItem, Reply, ReportItem
from ._logging import LibraryLogger, library_logger
from ._machine import BreakerConfig, IllegalTransitionError, Machine, Transition
from ._reasons import ADMIN_REASONS, TransitionReason

if TYPE_CHECKING:
    from ._dispatcher import Dispatcher

__all__ = [
    "REPORT_FLUSH_DELAY",
    "BreakerActor",
    "CallTimes",
    "Envelope",
    "Reply",
    "TransitionListener",
]

#: Called in the actor's thread after every transition.
TransitionListener: TypeAlias = Callable[[Transition, Snapshot], None]

#: The tally's key while a success may change the state: no permit has it.
_ASK_FOR_SUCCESSES: Final = -(1 << 62)
#: Tallies of older generations drained for the totals before they are dropped:
#: a proxy preempted between reading the tally and appending to it still counts.
_RETIRED_TALLIES: Final = 4

_logger = library_logger()
#: Guards the first use of the lazily made containers that other threads
#: append to (two threads making one each would lose one's items). Taken once
#: per container in a breaker's life, never on the call path after that.
_MAKE_LOCK = threading.Lock()


class BreakerActor(AdmitsPlainCalls):
    """The single owner of one breaker's machine.

    Proxies read ``snapshot`` (replaced, never mutated) to admit locally, and
    talk to the actor through ``post_success``, ``post_report``, ``post_rejection`` and
    ``ask``; all three are safe from any thread.
    """

    # Slots: 100,000 breakers in one daemon; a dict each would cost ~1 KiB more.
    # fmt: off
    __slots__ = (
        "_asleep", "_call_times", "_clock", "_flush_scheduled", "_inbox", "_rejections",
        "_retired", "_stale_successes", "_stopped", "_tally", "_tally_generation", "config",
        "dispatcher", "listeners", "loop_thread", "machine", "max_inbox", "name", "on_publish",
        "queued", "restarts", "snapshot", "timer", "transition_counts", "trial_gate",
    )
    # fmt: on

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
        self.snapshot: Snapshot = self.machine.snapshot()
        self.keep_for_admit(self.snapshot)
        self.max_inbox = max_inbox
        self.listeners: list[TransitionListener] = []
        #: Called with every snapshot the actor publishes and the one it
        #: replaces, before listeners hear of a transition (the daemon's state
        #: table: the cheapest way to tell every client goes first).
        self.on_publish: Callable[[Snapshot, Snapshot | None], None] | None = None
        #: The fleet's say on a trial (the daemon's fleet link): asked with the
        #: breaker's name when an open breaker's time is up; False keeps it
        #: open and rejects the call, as another host holds the trial lease.
        self.trial_gate: Callable[[str], bool] | None = None
        self.restarts = 0
        #: Transitions since the actor started, by (from_state, to_state)
        #: values. Replaced at every transition, never mutated, so another
        #: thread (a metrics scrape) reads it whole.
        self.transition_counts: dict[tuple[str, str], int] = _NO_TRANSITIONS_YET
        self._call_times: CallTimes | None = None
        self._clock = clock
        # Made on first use (see _MAKE_LOCK); None until then.
        self._inbox: deque[InboxItem] | None = None
        # (key, tally): read as one attribute so a proxy never pairs one
        # generation's check with another generation's tally. The key is the
        # generation, or _ASK_FOR_SUCCESSES while successes must be asked.
        self._tally: tuple[int, list[int]] = (self.machine.generation, [])
        self._tally_generation = self.machine.generation
        # The last _RETIRED_TALLIES tallies, oldest first (the loop thread only).
        self._retired: list[tuple[int, list[int]]] | None = None
        self._stale_successes: list[int] | None = None
        self._rejections: list[int] | None = None
        # Asleep: between two turns, nothing queued for it. False until the
        # dispatcher's first turn: whatever is sent before that waits for it.
        self._asleep = False
        self._flush_scheduled = False
        self._stopped = False
        #: The dispatcher that gives it turns, once the system runs; its thread.
        self.dispatcher: Dispatcher | None = None
        self.loop_thread: int | None = None
        #: In the dispatcher's run queue (the dispatcher's thread only).
        self.queued = False
        #: The timer armed for the machine's next deadline, if any.
        self.timer: asyncio.TimerHandle | None = None

    @property
    def call_times(self) -> CallTimes:
        """Durations and slow calls reported to this actor, stale reports too."""
        times = self._call_times
        return _NO_CALL_TIMES if times is None else times

    def _add_call_time(self, outcome: Outcome, duration: float) -> None:
        times = self._call_times or self._make("_call_times", CallTimes)
        times.add(outcome, duration, self.config.slow_call_duration)

    @property
    def _log(self) -> LibraryLogger:
        # Bound when needed (a transition, a crash): a binding per breaker
        # would cost three objects for every quiet breaker.
        return _logger.bind(breaker=self.name)

    def _make(self, slot: str, factory: Callable[[], Any]) -> Any:
        with _MAKE_LOCK:
            made = getattr(self, slot)
            if made is None:
                made = factory()
                setattr(self, slot, made)
            return made

    # -- any thread ------------------------------------------------------------

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
            stale = self._stale_successes
            tally = self._make("_stale_successes", list) if stale is None else stale  # books only
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
        if inbox is None:
            inbox = self._make("_inbox", deque)
        if len(inbox) >= self.max_inbox or self._stopped:
            return False
        inbox.append(item)
        if self._asleep and not self._flush_scheduled:
            self._schedule_flush()
        return True

    def post_rejection(self, count: int = 1) -> None:
        rejections = self._rejections
        if rejections is None:
            rejections = self._make("_rejections", list)
        rejections.append(count)

    @property
    def stopped(self) -> bool:
        """``stop()`` was called: the actor takes nothing more and gets no more turns."""
        return self._stopped

    @property
    def idle(self) -> bool:
        """Nothing waits for the actor: no inbox item, no counts to apply."""
        return not self._inbox and not self._tally[1] and not self._rejections

    @property
    def backlog(self) -> int:
        """Items waiting in the inbox (tallies not included: they are counts)."""
        inbox = self._inbox
        return 0 if inbox is None else len(inbox)

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None:
        """Queue a request; ``reply`` is called exactly once, from the actor's thread.

        Raises ``InboxFullError`` when the inbox is full (unless ``force``, used
        for reports that must not be lost) and ``ActorStoppedError`` once the
        actor is stopped.
        """
        if self._stopped:
            raise ActorStoppedError(f"breaker {self.name!r}: the actor system is stopped")
        inbox = self._inbox
        if inbox is None:
            inbox = self._make("_inbox", deque)
        if not force and len(inbox) >= self.max_inbox:
            raise InboxFullError(
                f"breaker {self.name!r}: inbox full ({self.max_inbox} pending messages)"
            )
        if self._asleep and not inbox and threading.get_ident() == self.loop_thread:
            # Run to completion: the actor is asleep and we are on its loop's
            # thread, so serving the request here is still serving it alone --
            # and saves a loop iteration per request.
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
            self.crash(envelope, exc)
        if self.machine.next_deadline() != deadline:
            # The timer was armed for the old deadline: re-arm it.
            self._arm_timer()

    def _wake(self) -> None:
        """A turn soon (whatever the flags say: the caller knows there is work)."""
        self._asleep = False
        dispatcher = self.dispatcher
        if dispatcher is not None:  # else its first turn drains whatever is queued
            dispatcher.wake(self)

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        dispatcher = self.dispatcher
        if dispatcher is not None:
            dispatcher.flush_later(self)

    # -- the dispatcher's turns (its thread only) --------------------------------

    def turn(self, budget: int) -> bool:
        """Handle up to ``budget`` inbox items; True when there is more to do.

        Raises only on a bug outside the handling of one message (the
        dispatcher supervises that); a message's own failure is answered.
        """
        self._flush_scheduled = False
        machine = self.machine
        if machine.next_deadline() is not None:
            # A trial lease may be overdue: its verdict comes before anything else.
            try:
                self._apply(machine.expire(self._clock()))
            except Exception as exc:  # a bug in breakerd: restart, never wedge
                self.crash(None, exc)
        self._drain(budget)
        inbox = self._inbox
        if inbox:
            return True  # its budget is spent: back of the queue, the others first
        self._asleep = True
        if inbox or self._tally[1] or self._stale_successes:
            # A producer added something between our drain and the flag.
            self._asleep = False
            return True
        self._arm_timer()
        return False

    def _arm_timer(self) -> None:
        """A turn at the machine's next deadline (a trial lease running out)."""
        dispatcher = self.dispatcher
        if dispatcher is not None and not self._stopped:
            dispatcher.arm(self, self.machine.next_deadline(), self._clock())

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
                self.crash(None, exc)
        retired = self._retired
        if retired is not None:
            for _, old in retired:
                if old:
                    taken = len(old)
                    count = sum(old[:taken])
                    del old[:taken]
                    stale = self._stale_successes
                    (self._make("_stale_successes", list) if stale is None else stale).append(count)
        stale = self._stale_successes
        if stale:
            taken = len(stale)
            self.machine.count_stale_successes(sum(stale[:taken]))
            del stale[:taken]
        rejections = self._rejections
        if rejections:
            taken = len(rejections)
            self.machine.count_rejections(sum(rejections[:taken]))
            del rejections[:taken]

    def _drain(self, budget: int | None = None) -> None:
        """Apply the tallies and up to ``budget`` inbox items (None: all of them)."""
        self._take_tallies()
        inbox = self._inbox
        if not inbox:
            return
        popleft = inbox.popleft
        left = -1 if budget is None else budget
        while inbox and left:
            left -= 1
            item = popleft()
            try:
                if type(item) is tuple:
                    generation, outcome, duration = item
                    self._add_call_time(outcome, duration)
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
                self.crash(item, exc)

    def _serve(self, envelope: Envelope) -> None:
        message = envelope.message
        now = self._clock()
        result: object
        if type(message) is Report:
            self._add_call_time(message.outcome, message.duration)
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
                pid=message.pid or os.getpid(),
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
            retired = self._retired
            if retired is None:
                retired = self._retired = []
            elif len(retired) == _RETIRED_TALLIES:
                del retired[0]
            retired.append((self._tally_generation, tally))
            tally = []
            self._tally_generation = generation
        self._tally = (generation if snapshot.successes_safe else _ASK_FOR_SUCCESSES, tally)
        self.keep_for_admit(snapshot)
        previous, self.snapshot = self.snapshot, snapshot
        on_publish = self.on_publish
        if on_publish is not None:
            on_publish(snapshot, previous)

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

    def crash(self, item: object, exc: Exception) -> None:
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
        inbox = self._inbox
        while inbox:
            item = inbox.popleft()
            if isinstance(item, Envelope) and item.reply is not None:
                try:
                    item.reply(None, error)
                except Exception:
                    self._log.exception("reply_failed_on_stop")
        timer = self.timer
        if timer is not None and threading.get_ident() == self.loop_thread:
            # From another thread the timer is left to fire: a stopped actor
            # gets no turn (TimerHandle.cancel is not thread-safe).
            timer.cancel()
            self.timer = None

    # -- the daemon's state file, reloads and watchdog (the loop thread only) ------

    def settle(self) -> None:
        """Apply whatever is queued (tallies, inbox) now, as its next turn would.

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
        """Answer ``reply`` from the actor's own turn, never inline: proof that it gets turns."""
        if self._stopped:
            reply(None, ActorStoppedError(f"breaker {self.name!r}: the actor is stopped"))
            return
        inbox = self._inbox
        if inbox is None:
            inbox = self._make("_inbox", deque)
        inbox.append(Envelope(StatusRequest(self.name), reply))
        self._wake()
