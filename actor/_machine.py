"""The breaker state machine: pure, synchronous, no clock.

Every method that depends on time takes ``now`` (monotonic seconds) from its
caller; the machine never reads a clock, never logs and never awaits. It
returns what it decided as values, so the actor can log and publish them and
tests can drive it with any sequence of instants. This module holds the rules;
the state they work on, its books and its persistence are ``MachineState``'s
(``_machine_state.py``), the settings ``_config.py``'s, the windows
``_windows.py``'s.

Rules
-----
* ``closed`` admits every call. Outcomes go into a window (the last
  ``window_size`` outcomes, or the last ``window_seconds`` bucketed by
  second). Once the window holds ``min_calls`` outcomes, the breaker opens
  when the failure rate is *greater than* ``failure_threshold`` or, with slow
  calls enabled, the slow-call rate is greater than ``slow_call_threshold``.
* ``open`` rejects until its deadline. The first acquire at or after the
  deadline moves to ``half_open``.
* ``half_open`` hands out at most ``half_open_calls`` trial leases. When that
  many trials have reported, it closes if their failure (and slow) rate is
  within the thresholds and re-opens otherwise. A lease not reported within
  ``half_open_max_wait`` counts as a failure. An ignored or cancelled trial
  gives its lease back.
* ``forced_open`` and ``disabled`` are administrative: the first rejects
  everything, the second admits everything and records nothing. ``reset``
  returns to ``closed`` with an empty window.
* Every transition bumps ``generation``. A permit remembers its generation;
  a report from another generation stays out of the window and the trials
  (it cannot change today's state) but still counts in the lifetime totals:
  the books match what callers and the upstream saw. So does a trial whose
  lease a verdict or an admin move cut short (once); an expired lease was
  counted as a failure when it expired, so its late report is not.
* An administrative move to the state the breaker is already in is no move:
  no transition, the same generation (``reset`` of a closed breaker still
  empties its window).
* ``successes_safe`` says whether any run of plain successes could open the
  breaker; proxies wait for the acknowledgement of a success only when it
  could.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from breakerd.protocol import BreakerError, CircuitState, Outcome

from ._config import DEFAULT_MAX_TIMEOUT, DEFAULT_QUOTA_TIMEOUT, BreakerConfig
from ._config import backoff_duration as _backoff_duration
from ._machine_state import NO_LEASES as _NO_LEASES
from ._machine_state import NO_ORPHANS as _NO_ORPHANS
from ._machine_state import MachineState
from ._reasons import KEY_WIDE_REASONS, TransitionReason, rate_limit_reason
from ._windows import TimeWindow, new_window

__all__ = [
    "DEFAULT_MAX_TIMEOUT",
    "DEFAULT_QUOTA_TIMEOUT",
    "KEY_WIDE_REASONS",
    "BreakerConfig",
    "Decision",
    "IllegalTransitionError",
    "Machine",
    "RecordResult",
    "Transition",
]

CLOSED: Final = CircuitState.CLOSED
OPEN: Final = CircuitState.OPEN
HALF_OPEN: Final = CircuitState.HALF_OPEN
FORCED_OPEN: Final = CircuitState.FORCED_OPEN
DISABLED: Final = CircuitState.DISABLED

# The whitelist. Administrative moves (to forced_open, disabled, or closed by
# reset) are legal from anywhere; everything else must be listed here.
_AUTOMATIC: Final[frozenset[tuple[CircuitState, CircuitState]]] = frozenset(
    {
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (HALF_OPEN, CLOSED),
        # A later rate-limit deadline extends an open period: a new generation,
        # so every proxy and the state table see the new deadline.
        (OPEN, OPEN),
    }
)
_ADMIN_TARGETS: Final = frozenset({FORCED_OPEN, DISABLED, CLOSED})
#: Trials cut short by a transition whose late report still counts in the
#: totals. Bounded: a flood of unreported trials cannot grow it without end.
_MAX_ORPHAN_LEASES: Final = 1024


_R: Final = TransitionReason
# What a snapshot says about an opening, from the transition's reason
# (the others say their own name).
_SNAPSHOT_REASONS: Final[dict[TransitionReason, str]] = {
    _R.FAILURE_RATE_EXCEEDED: "failure_rate",
    _R.SLOW_CALL_RATE_EXCEEDED: "slow_call_rate",
    _R.ADMIN_FORCE_OPEN: "forced_open",
    _R.ADMIN_DISABLE: "disabled",
}


class IllegalTransitionError(BreakerError, RuntimeError):
    """The machine tried a transition outside its whitelist: a bug in breakerd."""


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, as the actor logs and publishes it."""

    from_state: CircuitState
    to_state: CircuitState
    generation: int
    reason: TransitionReason
    failure_rate: float | None = None
    slow_call_rate: float | None = None
    open_until: float | None = None
    #: The provider's error code behind an opening, if any.
    error_code: str | None = None
    #: The process whose outcome caused the transition (0: none, or an administrator).
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to ``acquire``."""

    admitted: bool
    generation: int
    #: Non-zero only for a half-open trial lease.
    lease: int = 0
    retry_after: float | None = None
    transitions: tuple[Transition, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordResult:
    #: False when the report was stale (another generation) or unknown lease.
    counted: bool
    transitions: tuple[Transition, ...] = ()


_NO_TRANSITIONS: Final[tuple[Transition, ...]] = ()


class Machine(MachineState):
    """One breaker's state machine: every decision and transition (its state
    and books are ``MachineState``'s). Not thread-safe by design: one actor
    owns it."""

    __slots__ = ()

    # -- commands ----------------------------------------------------------

    def acquire(self, now: float) -> Decision:
        """Decide whether one call may run now."""
        state = self.state
        if state is CLOSED or state is DISABLED:
            return Decision(True, self.generation)
        if state is FORCED_OPEN:
            self.rejections += 1
            return Decision(False, self.generation)
        transitions: tuple[Transition, ...]
        if state is OPEN:
            assert self.open_until is not None
            if now < self.open_until:
                self.rejections += 1
                return Decision(False, self.generation, retry_after=self.open_until - now)
            transitions = (self._move(HALF_OPEN, _R.OPEN_TIMEOUT_ELAPSED, now),)
        else:
            transitions = self.expire(now)
            if self.state is not HALF_OPEN:
                # An overdue lease just decided the trial; answer from the new state.
                decision = self.acquire(now)
                return Decision(
                    decision.admitted,
                    decision.generation,
                    decision.lease,
                    decision.retry_after,
                    transitions + decision.transitions,
                )
        trials = len(self._leases) + self._trial_successes + self._trial_failures
        if trials >= self.config.half_open_calls:
            self.rejections += 1
            # No deadline to promise: the trials in flight decide.
            return Decision(False, self.generation, transitions=transitions)
        lease = self._next_lease
        self._next_lease += 1
        leases = self._leases
        if leases is _NO_LEASES:
            leases = self._leases = {}
        leases[lease] = now + self.config.half_open_max_wait
        return Decision(True, self.generation, lease=lease, transitions=transitions)

    def record(
        self,
        generation: int,
        outcome: Outcome,
        now: float,
        *,
        duration: float = 0.0,
        lease: int = 0,
        retry_after: float | None = None,
        reason: str | None = None,
        error_code: str | None = None,
        pid: int = 0,
    ) -> RecordResult:
        """Apply the outcome of a call admitted under ``generation``.

        ``reason`` is a rate limit's class (``rate_limited``, ``quota``,
        ``auth``), ``error_code`` the provider's code, ``pid`` the reporter.
        """
        if not pid:
            return self._record(
                generation, outcome, now, duration, lease, retry_after, reason, error_code
            )
        self._pid = pid
        try:
            return self._record(
                generation, outcome, now, duration, lease, retry_after, reason, error_code
            )
        finally:
            self._pid = 0

    def _record(
        self,
        generation: int,
        outcome: Outcome,
        now: float,
        duration: float,
        lease: int,
        retry_after: float | None,
        reason: str | None,
        error_code: str | None,
    ) -> RecordResult:
        if generation != self.generation:
            counted = generation < self.generation and self._count_stale(outcome, lease)
            if counted and outcome is Outcome.RATE_LIMITED and self.state is OPEN:
                # Calls admitted before the opening answer late: their
                # deadlines merge with max(), never shortening the open.
                return RecordResult(False, self._extend(now, reason, retry_after, error_code))
            return RecordResult(False)
        state = self.state
        if state is HALF_OPEN:
            return self._record_trial(
                lease, outcome, duration, retry_after, now, reason, error_code
            )
        if state is not CLOSED:
            # disabled records nothing; open/forced_open admitted nobody under
            # this generation, so there is nothing legitimate to count.
            if state is DISABLED and outcome is not Outcome.CANCELLED:
                self._count_total(outcome)
                return RecordResult(True)
            return RecordResult(False)
        settled = self._settle_neutral(outcome, retry_after, now, reason, error_code)
        if settled is not None:
            return settled
        failed = outcome is Outcome.FAILURE
        slow_limit = self.config.slow_call_duration
        slow = slow_limit is not None and duration > slow_limit
        window = self._window
        window.add(failed, slow, now)
        return RecordResult(True, self._judge_window(now))

    def record_successes(self, generation: int, count: int, now: float) -> tuple[Transition, ...]:
        """Apply ``count`` plain (not slow) successes admitted under ``generation``.

        Same result as ``count`` calls of ``record(generation, SUCCESS, now)``,
        at a cost independent of ``count``: successes only lower the rates,
        so of a run of them only the first judged one can trip the window.
        """
        if count <= 0:
            return _NO_TRANSITIONS
        state = self.state
        if generation != self.generation or state is DISABLED:
            if generation <= self.generation:
                self.successes += count  # stale, or disabled: the books only
            return _NO_TRANSITIONS
        if state is not CLOSED:
            return _NO_TRANSITIONS  # open and half-open admit no plain call
        self.successes += count
        window = self._window
        window.expire(now)
        first_judged = max(1, self.config.min_calls - window.total)
        if first_judged > count:
            window.add_successes(count, now)
            return _NO_TRANSITIONS
        window.add_successes(first_judged, now)
        transitions = self._judge_window(now)
        if not transitions and count > first_judged:
            # Every later success is judged at a lower rate: none can trip.
            window.add_successes(count - first_judged, now)
        # After a trip the rest are stale: counted above, out of the window.
        return transitions

    def _count_stale(self, outcome: Outcome, lease: int) -> bool:
        """Count an outcome of another generation in the totals, never twice.

        A plain outcome counts. A trial's counts only if a transition cut its
        lease short; an expired lease was counted as a failure when it expired.
        False for a report that is a repeat (a lease settled already): it
        counts for nothing, not even a late rate limit's deadline.
        """
        if lease:
            if lease not in self._orphans:
                return False
            del self._orphans[lease]  # its first report settles it, whatever it says
        if outcome is not Outcome.CANCELLED:
            self._count_total(outcome)
        return True

    def _settle_neutral(
        self,
        outcome: Outcome,
        retry_after: float | None,
        now: float,
        reason: str | None = None,
        error_code: str | None = None,
    ) -> RecordResult | None:
        """Outcomes that a closed window and a trial take alike; None for success and failure.

        Cancelled records nothing; ignored is counted in the totals only; a
        rate limit opens the breaker for ``retry_after``.
        """
        if outcome is Outcome.CANCELLED:
            return RecordResult(True)
        self._count_total(outcome)
        if outcome is Outcome.IGNORED:
            return RecordResult(True)
        if outcome is Outcome.RATE_LIMITED:
            opened = self._open(now, rate_limit_reason(reason), retry_after, error_code=error_code)
            return RecordResult(True, (opened,))
        return None

    def _count_total(self, outcome: Outcome) -> None:
        if outcome is Outcome.SUCCESS:
            self.successes += 1
        elif outcome is Outcome.FAILURE:
            self.failures += 1
        elif outcome is Outcome.IGNORED:
            self.ignored += 1
        elif outcome is Outcome.RATE_LIMITED:
            self.failures += 1

    def _judge_window(self, now: float) -> tuple[Transition, ...]:
        window = self._window
        if isinstance(window, TimeWindow):
            window.expire(now)
        config = self.config
        total = window.total
        if total < config.min_calls:
            return _NO_TRANSITIONS
        if window.failures / total > config.failure_threshold:
            return (self._open(now, _R.FAILURE_RATE_EXCEEDED),)
        if config.slow_call_duration is not None and window.slow / total > (
            config.slow_call_threshold
        ):
            return (self._open(now, _R.SLOW_CALL_RATE_EXCEEDED),)
        return _NO_TRANSITIONS

    def _record_trial(
        self,
        lease: int,
        outcome: Outcome,
        duration: float,
        retry_after: float | None,
        now: float,
        reason: str | None = None,
        error_code: str | None = None,
    ) -> RecordResult:
        expired = self.expire(now)
        if expired:
            # The lease ran out before this report came: its verdict is given.
            return RecordResult(False, expired)
        if self._leases.pop(lease, None) is None:
            # Unknown or already expired lease: its verdict was given already.
            return RecordResult(False)
        settled = self._settle_neutral(outcome, retry_after, now, reason, error_code)
        if settled is not None:
            return settled
        slow_limit = self.config.slow_call_duration
        if slow_limit is not None and duration > slow_limit:
            self._trial_slow += 1
        if outcome is Outcome.FAILURE:
            self._trial_failures += 1
        else:
            self._trial_successes += 1
        return RecordResult(True, self._judge_trials(now))

    def _judge_trials(self, now: float) -> tuple[Transition, ...]:
        config = self.config
        done = self._trial_successes + self._trial_failures
        if done < config.half_open_calls:
            return _NO_TRANSITIONS
        failure_rate = self._trial_failures / done
        slow_rate = self._trial_slow / done
        # The verdict reports the trials' own rates, not the old window's.
        if failure_rate > config.failure_threshold:
            reason = _R.TRIAL_FAILED
        elif config.slow_call_duration is not None and slow_rate > config.slow_call_threshold:
            reason = _R.TRIAL_SLOW
        else:
            return (
                self._move(
                    CLOSED,
                    _R.TRIAL_SUCCEEDED,
                    now,
                    failure_rate=failure_rate,
                    slow_call_rate=slow_rate,
                ),
            )
        return (self._open(now, reason, failure_rate=failure_rate, slow_call_rate=slow_rate),)

    def expire(self, now: float) -> tuple[Transition, ...]:
        """Count overdue trial leases as failures. Call on every message."""
        if self.state is not HALF_OPEN or not self._leases:
            return _NO_TRANSITIONS
        transitions: list[Transition] = []
        for lease, deadline in sorted(self._leases.items(), key=lambda item: item[1]):
            if deadline > now or self.state is not HALF_OPEN:
                break
            del self._leases[lease]
            self.failures += 1
            self._trial_failures += 1
            transitions.extend(self._judge_trials(now))
        return tuple(transitions)

    # -- administration ------------------------------------------------------

    # Each returns the transition, or None when the breaker is in that state
    # already: no move, the same generation, nothing to publish or log.

    def force_open(self, now: float) -> Transition | None:
        if self.state is FORCED_OPEN:
            return None
        return self._move(FORCED_OPEN, _R.ADMIN_FORCE_OPEN, now, admin=True)

    def disable(self, now: float) -> Transition | None:
        if self.state is DISABLED:
            return None
        return self._move(DISABLED, _R.ADMIN_DISABLE, now, admin=True)

    def reset(self, now: float) -> Transition | None:
        """Back to ``closed`` with an empty window, whatever the state."""
        if self.state is CLOSED:
            self._window = new_window(self.config.window_seconds, self.config.window_size)
            self._open_streak = 0
            return None
        return self._move(CLOSED, _R.ADMIN_RESET, now, admin=True)

    # -- internals -----------------------------------------------------------

    def _open(
        self,
        now: float,
        reason: TransitionReason,
        retry_after: float | None = None,
        *,
        failure_rate: float | None = None,
        slow_call_rate: float | None = None,
        error_code: str | None = None,
    ) -> Transition:
        duration = self._open_duration(reason, retry_after)
        self._open_streak += 1
        return self._move(
            OPEN,
            reason,
            now,
            open_until=now + duration,
            failure_rate=failure_rate,
            slow_call_rate=slow_call_rate,
            error_code=error_code,
        )

    def _open_duration(self, reason: TransitionReason, retry_after: float | None) -> float:
        config = self.config
        usable = retry_after is not None and math.isfinite(retry_after) and retry_after >= 0
        if reason in KEY_WIDE_REASONS:
            # Waiting will not fix a quota or a key: the long timeout is both
            # the default and the cap (max_timeout is for transient faults).
            cap = config.quota_timeout
            return min(retry_after, cap) if usable and retry_after is not None else cap
        if usable and retry_after is not None:
            # A server's word is capped like our own backoff: one bad header
            # must not lock a breaker for a day.
            cap_ = config.max_timeout
            return retry_after if cap_ is None else min(retry_after, cap_)
        duration = _backoff_duration(
            config.timeout, config.backoff, self._open_streak, config.max_timeout
        )
        if config.jitter:
            duration *= 1.0 + config.jitter * (2.0 * self.rng() - 1.0)
        return duration

    def _extend(
        self,
        now: float,
        reason: str | None,
        retry_after: float | None,
        error_code: str | None,
    ) -> tuple[Transition, ...]:
        """Open-until only grows: move the deadline of an open breaker later, never earlier."""
        assert self.open_until is not None
        why = rate_limit_reason(reason)
        if why not in KEY_WIDE_REASONS and (
            retry_after is None or not math.isfinite(retry_after) or retry_after < 0
        ):
            # No deadline from the server: the opening already decided how long.
            return _NO_TRANSITIONS
        # The streak is not advanced (no new opening), so no backoff compounds.
        deadline = now + self._open_duration(why, retry_after)
        if not deadline > self.open_until:
            return _NO_TRANSITIONS
        return (self._move(OPEN, why, now, open_until=deadline, error_code=error_code),)

    def _move(
        self,
        target: CircuitState,
        reason: TransitionReason,
        now: float,
        *,
        open_until: float | None = None,
        failure_rate: float | None = None,
        slow_call_rate: float | None = None,
        admin: bool = False,
        error_code: str | None = None,
    ) -> Transition:
        source = self.state
        if not (admin and target in _ADMIN_TARGETS) and (source, target) not in _AUTOMATIC:
            raise IllegalTransitionError(
                f"breaker {self.name!r}: illegal transition {source} -> {target} ({reason})"
            )
        if failure_rate is None:
            failure_rate = self.failure_rate()
        if slow_call_rate is None:
            slow_call_rate = self.slow_call_rate()
        self.state = target
        self.generation += 1
        self.open_until = open_until if target is OPEN else None
        pid = 0 if admin else self._pid
        if target is CLOSED:
            self.open_reason = self.error_code = None
            self.opened_by_pid = 0
        elif target is not HALF_OPEN:
            # Half-open keeps the reason of the opening it is trying to end.
            self.open_reason = _SNAPSHOT_REASONS.get(reason, reason.value)
            self.error_code = error_code
            self.opened_by_pid = pid
        if self._leases:
            orphans = self._orphans
            if orphans is _NO_ORPHANS:
                orphans = self._orphans = {}
            orphans.update(dict.fromkeys(self._leases))
            while len(orphans) > _MAX_ORPHAN_LEASES:
                del orphans[next(iter(orphans))]
            self._leases = _NO_LEASES
        self._trial_successes = self._trial_failures = self._trial_slow = 0
        if target is CLOSED:
            # A fresh window: failures from before the trip never count again.
            self._window = new_window(self.config.window_seconds, self.config.window_size)
            self._open_streak = 0
        return Transition(
            source,
            target,
            self.generation,
            reason,
            failure_rate=failure_rate,
            slow_call_rate=slow_call_rate,
            open_until=self.open_until,
            error_code=error_code,
            pid=pid,
        )

    # -- reload (SIGHUP) -----------------------------------------------------

    def reconfigure(self, config: BreakerConfig, now: float) -> tuple[Transition, ...]:
        """New settings for a live breaker, keeping its state and, where it fits, its window.

        The window is kept unless its kind or size changes (then it starts
        empty: outcomes judged under another window are not comparable). An
        open breaker keeps its deadline; new timeouts apply from the next
        opening. A half-open breaker whose finished trials now reach
        ``half_open_calls`` is judged at once, so it cannot wait for trials
        that will never be handed out.
        """
        old = self.config
        self.config = config
        if (old.window_seconds, old.window_size if old.window_seconds is None else None) != (
            config.window_seconds,
            config.window_size if config.window_seconds is None else None,
        ):
            self._window = new_window(self.config.window_seconds, self.config.window_size)
        if self.state is HALF_OPEN and not self._leases:
            return self._judge_trials(now)
        return _NO_TRANSITIONS

    # -- the fleet (other hosts' opens and verdicts, through the daemon) -------

    def fleet_open(self, until: float, now: float) -> tuple[Transition, ...]:
        """Stay open until ``until`` because other hosts are; opens only grow.

        Closed and half-open open (a half-open's trials are cut short, as by
        any verdict). Open keeps the later deadline; a later one moves the
        generation on, no transition, so that every client's copy of the
        deadline (the state table's slot) moves too. Administrative states
        are the operator's: untouched.
        """
        state = self.state
        if not until > now:
            return _NO_TRANSITIONS
        if state is CLOSED or state is HALF_OPEN:
            return (self._move(OPEN, _R.FLEET_OPEN, now, open_until=until),)
        if state is OPEN and self.open_until is not None and until > self.open_until:
            self.open_until = until
            self.generation += 1
        return _NO_TRANSITIONS

    def fleet_close(self, now: float) -> tuple[Transition, ...]:
        """Another host's trials succeeded: close, through half-open (the whitelist's path)."""
        transitions: list[Transition] = []
        if self.state is OPEN:
            transitions.append(self._move(HALF_OPEN, _R.FLEET_CLOSED, now))
        if self.state is HALF_OPEN:
            transitions.append(self._move(CLOSED, _R.FLEET_CLOSED, now))
        return tuple(transitions)
