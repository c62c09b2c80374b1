"""A breaker machine's state: its data, its queries and its books, and how it persists.

``Machine`` (``_machine.py``) holds the rules: every decision and transition.
This half holds what those rules work on and what the rest of breakerd reads
of it: the snapshot, the rates, the lifetime totals, the successor a crashed
actor restarts with, and the record the daemon's state file keeps. Pure like
the machine: instants come from the caller.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Final, Self

from breakerd.protocol import CircuitState, Snapshot

from ._config import BreakerConfig
from ._windows import Window, new_window
from ._windows import stored_count as _count

__all__ = ["NO_LEASES", "NO_ORPHANS", "MachineState"]

CLOSED: Final = CircuitState.CLOSED
OPEN: Final = CircuitState.OPEN
HALF_OPEN: Final = CircuitState.HALF_OPEN

# A machine's leases and orphans until it has any: shared and never written to
# (they are replaced by a dict of their own first), since most breakers never
# go half-open and an empty dict costs 64 bytes.
NO_LEASES: Final[dict[int, float]] = {}
NO_ORPHANS: Final[dict[int, None]] = {}


class MachineState:
    """One breaker's state and books, what it shows and how it persists.

    ``Machine`` adds the transitions. Not thread-safe by design: one actor
    owns it.
    """

    # Slots: a daemon holds 100,000 machines. ``__dict__`` stays, empty unless
    # used, so that a test can replace one machine's method to play a bug.
    __slots__ = (
        "__dict__",
        "_leases",
        "_next_lease",
        "_open_streak",
        "_orphans",
        "_pid",
        "_trial_failures",
        "_trial_slow",
        "_trial_successes",
        "_window",
        "config",
        "error_code",
        "failures",
        "generation",
        "ignored",
        "name",
        "open_reason",
        "open_until",
        "opened_by_pid",
        "rejections",
        "rng",
        "state",
        "successes",
    )

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
        #: Where jitter draws from (``random.random`` unless a test injects one).
        self.rng = rng if rng is not None else random.random
        self.state: CircuitState = CLOSED
        self.generation = generation
        self.open_until: float | None = None
        # Why the breaker is not closed, for rejections and status (snapshot).
        self.open_reason: str | None = None
        self.error_code: str | None = None
        self.opened_by_pid = 0
        # The pid of the report being applied, for the transition it may cause.
        self._pid = 0
        self._window: Window = new_window(self.config.window_seconds, self.config.window_size)
        # Consecutive openings without a close in between, for backoff.
        self._open_streak = 0
        # Half-open bookkeeping. Lease ids are unique for the machine's life.
        self._next_lease = first_lease
        self._leases: dict[int, float] = NO_LEASES
        # Leases a transition cut short: their report still counts in the totals, once.
        self._orphans: dict[int, None] = NO_ORPHANS
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

    # -- the books (lifetime totals: status only, never used in decisions) ---------

    def count_rejections(self, count: int) -> None:
        """Add rejections a proxy made locally from a snapshot (status only)."""
        self.rejections += count

    def count_stale_successes(self, count: int) -> None:
        """Add plain successes of an older generation to the totals (books only)."""
        self.successes += count

    # -- supervision -----------------------------------------------------------------

    def successor(self, now: float) -> Self:
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
        new = type(self)(
            self.name,
            self.config,
            generation=self.generation + 1,
            rng=self.rng,
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

    # -- persistence (the daemon's state file) ---------------------------------------

    def export_state(self, now: float) -> dict[str, Any]:
        """Everything a restarted daemon needs to carry this breaker on, as plain data.

        Instants are ``now``'s clock (monotonic); the caller converts them for
        storage. Trial leases are left out: their holders' connections do not
        survive a restart, so they are given back, as on a disconnect.
        """
        window = self._window
        window.expire(now)
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
            "window": window.export(),
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
    ) -> Self:
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
            machine._window.restore(data["window"])
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

    def change_mark(self) -> int:
        """Equal between two instants unless ``export_state`` may differ (time aside).

        Every outcome, rejection, lease and transition moves a counter here, so
        the daemon re-exports only the breakers that changed. One int, not a
        tuple of them: the daemon keeps one per breaker (100,000 of them). The
        counters never go down within a generation (trial counts restart only
        with a new one), so their sum moves whenever one does; it stays far
        below 2**96 (that many outcomes would take longer than the universe has).
        Settings changes are not in it: the caller compares the config itself.
        """
        return (self.generation << 96) + (
            self.successes
            + self.failures
            + self.ignored
            + self.rejections
            + self._next_lease
            + self._trial_successes
            + self._trial_failures
        )
