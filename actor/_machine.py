"""The breaker state machine: pure, synchronous, no clock.

Every method that depends on time takes ``now`` (monotonic seconds) from its
caller; the machine never reads a clock, never logs and never awaits. It
returns what it decided as values, so the actor can log and publish them and
tests can drive it with any sequence of instants.

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
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from itertools import repeat
from typing import Any, Final

from breakerd.protocol import BreakerError, CircuitState, Outcome, Snapshot

from ._reasons import KEY_WIDE_REASONS, TransitionReason, rate_limit_reason

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

#: The default ``max_timeout``: ten minutes. A breaker shared host-wide must
#: not stay open for a day because one response said ``Retry-After: 86400``
#: or backoff compounded through a long outage; ten minutes is well past the
#: retry hints of real APIs (seconds to a minute) and what an on-call engineer
#: waits before looking, and short enough that a wrong hint heals by itself.
DEFAULT_MAX_TIMEOUT: Final = 600.0

#: The default ``quota_timeout``: fifteen minutes. A quota or billing error
#: (or a rejected key) needs a person; retrying it every ``timeout`` only adds
#: noise, and fifteen minutes still notices a fix within a coffee break.
DEFAULT_QUOTA_TIMEOUT: Final = 900.0

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
class BreakerConfig:
    """Settings of one breaker. Every field has a documented default.

    Attributes:
        failure_threshold: Open when the failure rate in the window is greater
            than this (0 to 1). Default 0.5: 3 failures out of 5 open, 2 do not.
        timeout: Seconds a breaker stays ``open`` before it allows a trial.
        min_calls: Outcomes the window must hold before its rates are judged.
        half_open_calls: Trial leases handed out while ``half_open``.
        window_size: Count-based window: the last N outcomes. Default 100.
        window_seconds: Time-based window instead: the last N seconds,
            bucketed by second. ``None`` (default) keeps the count window.
        slow_call_duration: A call longer than this many seconds is slow.
            ``None`` (default) turns slow-call detection off.
        slow_call_threshold: Open when the slow-call rate is greater than this.
        backoff: Each consecutive re-open multiplies the open duration by this.
            1.0 (default) keeps it constant. Closing resets it.
        max_timeout: Upper bound on the open duration under backoff, and on a
            server's ``retry_after``. Default ``DEFAULT_MAX_TIMEOUT`` (600 s),
            raised to ``timeout`` when that is longer (a default bound must
            not make a valid ``timeout`` an error); ``None``: no bound.
        jitter: Spread the open duration by up to this fraction either way
            (0.1 means +-10%), so many breakers do not retry in step.
        half_open_max_wait: A trial lease not reported within this many
            seconds counts as a failure, so no breaker stays half-open forever.
        quota_timeout: Seconds a key-wide error (``quota``: quota exhausted or
            payment required; ``auth`` when the client opens on it) keeps the
            breaker open, and the cap on such an error's ``retry_after``
            (``max_timeout`` does not apply to them). Default 900 s.
    """

    failure_threshold: float = 0.5
    timeout: float = 30.0
    min_calls: int = 5
    half_open_calls: int = 1
    window_size: int = 100
    window_seconds: float | None = None
    slow_call_duration: float | None = None
    slow_call_threshold: float = 1.0
    backoff: float = 1.0
    max_timeout: float | None = DEFAULT_MAX_TIMEOUT
    jitter: float = 0.0
    half_open_max_wait: float = 60.0
    quota_timeout: float = DEFAULT_QUOTA_TIMEOUT

    def __post_init__(self) -> None:
        def bad(field_name: str, expected: str) -> ValueError:
            value = getattr(self, field_name)
            return ValueError(f"{field_name} must be {expected}, got {value!r}")

        def finite(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not finite(self.failure_threshold) or not 0.0 <= self.failure_threshold <= 1.0:
            raise bad("failure_threshold", "a number between 0 and 1")
        if not finite(self.timeout) or self.timeout < 0:
            raise bad("timeout", "a finite number of seconds >= 0")
        for name in ("min_calls", "half_open_calls", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "an integer >= 1")
        if self.window_seconds is None and self.min_calls > self.window_size:
            raise ValueError(
                f"min_calls ({self.min_calls}) must not exceed window_size "
                f"({self.window_size}): the window could never be judged"
            )
        if self.window_seconds is not None and (
            not finite(self.window_seconds) or self.window_seconds < 1
        ):
            raise bad("window_seconds", "None or a number of seconds >= 1")
        if self.slow_call_duration is not None and (
            not finite(self.slow_call_duration) or self.slow_call_duration <= 0
        ):
            raise bad("slow_call_duration", "None or a number of seconds > 0")
        if not finite(self.slow_call_threshold) or not 0.0 <= self.slow_call_threshold <= 1.0:
            raise bad("slow_call_threshold", "a number between 0 and 1")
        if not finite(self.backoff) or self.backoff < 1.0:
            raise bad("backoff", "a number >= 1")
        if self.max_timeout == DEFAULT_MAX_TIMEOUT and finite(self.timeout):
            # The default bound gives way to a longer timeout (an explicit 600
            # looks the same and is treated the same: documented).
            object.__setattr__(self, "max_timeout", max(DEFAULT_MAX_TIMEOUT, self.timeout))
        if self.max_timeout is not None and (
            not finite(self.max_timeout) or self.max_timeout < self.timeout
        ):
            raise bad("max_timeout", "None or a number of seconds >= timeout")
        if not finite(self.jitter) or not 0.0 <= self.jitter < 1.0:
            raise bad("jitter", "a number in [0, 1)")
        if not finite(self.half_open_max_wait) or self.half_open_max_wait <= 0:
            raise bad("half_open_max_wait", "a number of seconds > 0")
        if not finite(self.quota_timeout) or self.quota_timeout < 0:
            raise bad("quota_timeout", "a finite number of seconds >= 0")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreakerConfig:
        """Build a config from a mapping, refusing unknown keys with a clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown breaker setting(s): {', '.join(unknown)}")
        return cls(**data)

    def differences(self, other: BreakerConfig) -> tuple[str, ...]:
        """Names of the settings whose values differ between two configs."""
        return tuple(
            f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)
        )


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


class _CountWindow:
    """The last ``size`` outcomes, with running totals."""

    __slots__ = ("_items", "failures", "size", "slow", "total")

    def __init__(self, size: int) -> None:
        self.size = size
        # Each item packs (failed, slow) into 0..3 so the ring holds small ints.
        self._items: deque[int] = deque()
        self.total = 0
        self.failures = 0
        self.slow = 0

    def add(self, failed: bool, slow: bool, now: float) -> None:
        items = self._items
        if len(items) == self.size:
            old = items.popleft()
            self.total -= 1
            self.failures -= old & 1
            self.slow -= old >> 1
        items.append(int(failed) | (int(slow) << 1))
        self.total += 1
        self.failures += failed
        self.slow += slow

    def add_successes(self, count: int) -> None:
        """``count`` plain successes at once (the batched fast path)."""
        items = self._items
        overflow = len(items) + count - self.size
        if overflow >= len(items):
            items.clear()
            self.total = self.failures = self.slow = 0
            count = min(count, self.size)
        elif overflow > 0:
            for _ in range(overflow):
                old = items.popleft()
                self.failures -= old & 1
                self.slow -= old >> 1
            self.total -= overflow
        items.extend(repeat(0, count))
        self.total += count

    def expire(self, now: float) -> None:
        """Count windows do not age."""

    def successes_safe(self, trips: Callable[[int, int, int], bool]) -> bool:
        """True when no run of plain successes can make the window trip.

        Successes only lower both rates once the window is judged; below
        ``min_calls`` the first judged success sees the worst rate.
        """
        if not (self.failures or self.slow):
            return True
        # A full window stays full: a success pushes out an outcome as it lands.
        total = self.total if self.total == self.size else self.total + 1
        return not trips(self.failures, self.slow, total)


class _TimeWindow:
    """Outcomes of the last ``seconds`` seconds, one bucket per whole second."""

    __slots__ = ("_buckets", "failures", "seconds", "slow", "total")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # [second, total, failures, slow]
        self._buckets: deque[list[int]] = deque()
        self.total = 0
        self.failures = 0
        self.slow = 0

    def expire(self, now: float) -> None:
        # A bucket for second s covers [s, s+1); it leaves the window once all
        # of it is older than ``seconds``.
        oldest_kept = math.floor(now - self.seconds)
        buckets = self._buckets
        while buckets and buckets[0][0] < oldest_kept:
            _, total, failures, slow = buckets.popleft()
            self.total -= total
            self.failures -= failures
            self.slow -= slow

    def add_successes(self, count: int, now: float) -> None:
        """``count`` plain successes at ``now`` at once (one bucket, O(1))."""
        self._bucket(now)[1] += count
        self.total += count

    def _bucket(self, now: float) -> list[int]:
        self.expire(now)
        second = math.floor(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] >= second:
            # A clock never goes back; if a caller's instant does, it joins the
            # newest bucket rather than reordering history.
            return buckets[-1]
        bucket = [second, 0, 0, 0]
        buckets.append(bucket)
        return bucket

    def successes_safe(self, trips: Callable[[int, int, int], bool]) -> bool:
        """True when no run of plain successes can make the window trip.

        Any of the oldest buckets may age out before the next success lands,
        so every run of newest buckets is a window that success may join;
        the first success judged in it sees that window's worst rate.
        """
        total = failures = slow = 0
        for _, bucket_total, bucket_failures, bucket_slow in reversed(self._buckets):
            total += bucket_total
            failures += bucket_failures
            slow += bucket_slow
            if (failures or slow) and trips(failures, slow, total + 1):
                return False
        return True

    def add(self, failed: bool, slow: bool, now: float) -> None:
        bucket = self._bucket(now)
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.total += 1
        self.failures += failed
        self.slow += slow


class Machine:
    """One breaker's state. Not thread-safe by design: one actor owns it."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        generation: int = 0,
        rng: Callable[[], float] | None = None,
        first_lease: int = 1,
    ) -> None:
        self.name = name
        self.config = config if config is not None else BreakerConfig()
        self._random = rng if rng is not None else random.random
        self.state: CircuitState = CLOSED
        self.generation = generation
        self.open_until: float | None = None
        # Why the breaker is not closed, for rejections and status (snapshot).
        self.open_reason: str | None = None
        self.error_code: str | None = None
        self.opened_by_pid = 0
        # The pid of the report being applied, for the transition it may cause.
        self._pid = 0
        self._window: _CountWindow | _TimeWindow = self._new_window()
        # Consecutive openings without a close in between, for backoff.
        self._open_streak = 0
        # Half-open bookkeeping. Lease ids are unique for the machine's life.
        self._next_lease = first_lease
        self._leases: dict[int, float] = {}
        # Leases a transition cut short: their report still counts in the totals, once.
        self._orphans: dict[int, None] = {}
        self._trial_successes = 0
        self._trial_failures = 0
        self._trial_slow = 0
        # Totals since creation, for status; never used in decisions.
        self.successes = 0
        self.failures = 0
        self.ignored = 0
        self.rejections = 0

    # -- queries -----------------------------------------------------------

    @property
    def trials_in_flight(self) -> int:
        return len(self._leases)

    @property
    def window_calls(self) -> int:
        return self._window.total

    def failure_rate(self) -> float | None:
        """Failures / outcomes in the window, or None while the window is empty."""
        w = self._window
        return w.failures / w.total if w.total else None

    def slow_call_rate(self) -> float | None:
        w = self._window
        return w.slow / w.total if w.total else None

    def successes_safe(self) -> bool:
        """True when no run of plain successes can change the state.

        Only a closed window can trip on a success; proxies send successes
        without waiting while this holds, and wait for each one otherwise.
        It stays true until an outcome other than a plain success arrives,
        whatever the clock does: a time window's check covers any of its
        oldest buckets ageing out first.
        """
        if self.state is not CLOSED:
            return True
        return self._window.successes_safe(self._trips_when_judged)

    def _trips_when_judged(self, failures: int, slow: int, total: int) -> bool:
        # The first judged outcome sees the window at min_calls at least.
        config = self.config
        total = max(total, config.min_calls)
        return failures / total > config.failure_threshold or (
            config.slow_call_duration is not None and slow / total > config.slow_call_threshold
        )

    def next_deadline(self) -> float | None:
        """The earliest instant at which ``expire`` has work to do."""
        if self._leases:
            return min(self._leases.values())
        return None

    def age(self, now: float) -> None:
        """Let a time window forget outcomes older than it, so status shows
        current rates. Never a transition: only a recorded outcome is judged."""
        self._window.expire(now)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            name=self.name,
            state=self.state,
            generation=self.generation,
            open_until=self.open_until,
            failure_rate=self.failure_rate(),
            slow_call_rate=self.slow_call_rate(),
            calls=self._window.total,
            trials_in_flight=len(self._leases),
            slow_call_duration=self.config.slow_call_duration,
            successes_safe=self.successes_safe(),
            reason=self.open_reason,
            error_code=self.error_code,
            opened_by_pid=self.opened_by_pid,
        )

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
        self._leases[lease] = now + self.config.half_open_max_wait
        return Decision(True, self.generation, lease=lease, transitions=transitions)

    def count_rejections(self, count: int) -> None:
        """Add rejections a proxy made locally from a snapshot (status only)."""
        self.rejections += count

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
            self._add_successes(window, count, now)
            return _NO_TRANSITIONS
        self._add_successes(window, first_judged, now)
        transitions = self._judge_window(now)
        if not transitions:
            # Every later success is judged at a lower rate: none can trip.
            self._add_successes(window, count - first_judged, now)
        # After a trip the rest are stale: counted above, out of the window.
        return transitions

    @staticmethod
    def _add_successes(window: _CountWindow | _TimeWindow, count: int, now: float) -> None:
        if count <= 0:
            return
        if type(window) is _CountWindow:
            window.add_successes(count)
        else:
            assert isinstance(window, _TimeWindow)
            window.add_successes(count, now)

    def count_stale_successes(self, count: int) -> None:
        """Add plain successes of an older generation to the totals (books only)."""
        self.successes += count

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
        if isinstance(window, _TimeWindow):
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
            self._window = self._new_window()
            self._open_streak = 0
            return None
        return self._move(CLOSED, _R.ADMIN_RESET, now, admin=True)

    # -- supervision -----------------------------------------------------------

    def successor(self, now: float) -> Machine:
        """A fresh machine for the actor to restart with after this one raised.

        Fail safe: it never admits what this one would have refused. Closed
        restarts closed with an empty window; open keeps its deadline;
        half-open opens for ``timeout`` (its trials' verdict is lost with the
        bug, and a restart into half-open could wedge on a lost lease);
        forced-open and disabled stay as the administrator left them. The
        generation moves on, so permits and leases from before the crash are
        stale; lease ids keep counting up (never reused), and the totals and
        the backoff streak carry over.
        """
        new = Machine(
            self.name,
            self.config,
            generation=self.generation + 1,
            rng=self._random,
            first_lease=self._next_lease,
        )
        new.successes, new.failures = self.successes, self.failures
        new.ignored, new.rejections = self.ignored, self.rejections
        new._open_streak = self._open_streak
        new.open_reason, new.error_code = self.open_reason, self.error_code
        new.opened_by_pid = self.opened_by_pid
        state = self.state
        if state is OPEN or state is HALF_OPEN:
            open_until = self.open_until if state is OPEN else None
            if open_until is None or math.isnan(open_until):
                open_until = now + self.config.timeout
            new.state = OPEN
            new.open_until = open_until
        elif state is not CLOSED:
            new.state = state
        return new

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
            duration *= 1.0 + config.jitter * (2.0 * self._random() - 1.0)
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
            orphans.update(dict.fromkeys(self._leases))
            while len(orphans) > _MAX_ORPHAN_LEASES:
                del orphans[next(iter(orphans))]
            self._leases.clear()
        self._trial_successes = self._trial_failures = self._trial_slow = 0
        if target is CLOSED:
            # A fresh window: failures from before the trip never count again.
            self._window = self._new_window()
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

    def _new_window(self) -> _CountWindow | _TimeWindow:
        if self.config.window_seconds is not None:
            return _TimeWindow(self.config.window_seconds)
        return _CountWindow(self.config.window_size)

    # -- persistence and reload (the daemon's state file, SIGHUP) --------------

    def export_state(self, now: float) -> dict[str, Any]:
        """Everything a restarted daemon needs to carry this breaker on, as plain data.

        Instants are ``now``'s clock (monotonic); the caller converts them for
        storage. Trial leases are left out: their holders' connections do not
        survive a restart, so they are given back, as on a disconnect.
        """
        window = self._window
        window.expire(now)
        window_data: dict[str, Any]
        if isinstance(window, _TimeWindow):
            window_data = {"buckets": [list(bucket) for bucket in window._buckets]}
        else:
            # One digit per outcome (failed | slow << 1): compact, and exact.
            window_data = {"items": "".join(map(str, window._items))}
        return {
            "name": self.name,
            "config": self.config.as_dict(),
            "state": self.state.value,
            "generation": self.generation,
            "open_until": self.open_until,
            "open_streak": self._open_streak,
            "next_lease": self._next_lease,
            "trials": [self._trial_successes, self._trial_failures, self._trial_slow],
            # Why it is not closed (optional: files from before it lack it).
            "why": [self.open_reason, self.error_code, self.opened_by_pid],
            "window": window_data,
            "totals": {
                "successes": self.successes,
                "failures": self.failures,
                "ignored": self.ignored,
                "rejections": self.rejections,
            },
        }

    @classmethod
    def restore(
        cls,
        data: dict[str, Any],
        *,
        rng: Callable[[], float] | None = None,
    ) -> Machine:
        """The machine ``export_state`` described, one generation on.

        ``data``'s instants must already be on the restoring process's clock.
        The generation is bumped so that a permit granted before the restart
        reports as stale. Raises ``ValueError`` on anything inconsistent.
        """
        try:
            config = BreakerConfig.from_dict(dict(data["config"]))
            machine = cls(str(data["name"]), config, generation=_count(data["generation"]) + 1)
            state = CircuitState(data["state"])
            open_until = data["open_until"]
            if (state is OPEN) != (open_until is not None):
                raise ValueError("open_until must be set exactly when the state is open")
            if open_until is not None and not (
                isinstance(open_until, (int, float)) and math.isfinite(open_until)
            ):
                raise ValueError(f"open_until must be a finite number, got {open_until!r}")
            machine.state = state
            machine.open_until = None if open_until is None else float(open_until)
            machine._open_streak = _count(data["open_streak"])
            machine._next_lease = max(1, _count(data["next_lease"]))
            successes, failures, slow = (_count(n) for n in data["trials"])
            if state is HALF_OPEN:
                machine._trial_successes = successes
                machine._trial_failures = failures
                machine._trial_slow = slow
            totals = data["totals"]
            machine.successes = _count(totals["successes"])
            machine.failures = _count(totals["failures"])
            machine.ignored = _count(totals["ignored"])
            machine.rejections = _count(totals["rejections"])
            machine._restore_window(data["window"])
            why = data.get("why")
            if why is not None and state is not CLOSED:
                reason, error_code, pid = why
                if not (
                    (reason is None or isinstance(reason, str))
                    and (error_code is None or isinstance(error_code, str))
                ):
                    raise ValueError(f"why must be [reason, error_code, pid], got {why!r}")
                machine.open_reason, machine.error_code = reason, error_code
                machine.opened_by_pid = _count(pid)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed breaker record: {exc!r}") from None
        return machine

    def _restore_window(self, data: dict[str, Any]) -> None:
        window = self._window
        if isinstance(window, _TimeWindow):
            previous = -math.inf
            for second, total, failures, slow in data["buckets"]:
                counts = (_count(total), _count(failures), _count(slow))
                if not isinstance(second, int) or second <= previous:
                    raise ValueError("time window buckets must have increasing whole seconds")
                if counts[1] > counts[0] or counts[2] > counts[0]:
                    raise ValueError("a time window bucket holds more failures than outcomes")
                previous = second
                window._buckets.append([second, *counts])
                window.total += counts[0]
                window.failures += counts[1]
                window.slow += counts[2]
            return
        items = data["items"]
        if not isinstance(items, str) or len(items) > window.size or items.strip("0123"):
            raise ValueError("a count window must be at most window_size digits 0-3")
        for item in map(int, items):
            window.add(bool(item & 1), bool(item >> 1), 0.0)

    def change_mark(self) -> tuple[object, ...]:
        """Equal between two instants unless ``export_state`` may differ (time aside).

        Every outcome, rejection, lease and transition moves a counter here, so
        the daemon re-exports only the breakers that changed.
        """
        return (
            self.generation,
            self.successes,
            self.failures,
            self.ignored,
            self.rejections,
            self._next_lease,
            self._trial_successes + self._trial_failures,
            self.config,
        )

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
            self._window = self._new_window()
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


def _count(value: object) -> int:
    """A stored count: a non-negative int, or ``ValueError``."""
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a count (an integer >= 0), got {value!r}")
    return value


def _backoff_duration(timeout: float, backoff: float, streak: int, cap: float | None) -> float:
    """``min(timeout * backoff ** streak, cap)``, without overflow.

    ``backoff ** streak`` overflows a float past ~1e308 (``backoff=10``: the
    309th consecutive re-open, some five hours of outage at a 60 s cap) and
    raises ``OverflowError``; a duration that large is infinite for any
    purpose, so it becomes ``inf`` and the cap, if any, applies as usual.
    """
    if not timeout or backoff == 1.0:
        duration = float(timeout)
    else:
        try:
            duration = timeout * backoff**streak
        except OverflowError:
            duration = math.inf
    return duration if cap is None else min(duration, cap)
