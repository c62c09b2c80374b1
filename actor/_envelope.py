"""What a breaker actor is handed and keeps for others: envelopes, call times, event names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeAlias

from breakerd.protocol import CircuitState, Outcome

__all__ = [
    "NO_CALL_TIMES",
    "NO_TRANSITIONS_YET",
    "TRANSITION_EVENTS",
    "CallTimes",
    "Envelope",
    "InboxItem",
    "Reply",
    "ReportItem",
]

#: Answers a request: ``reply(result, None)`` or ``reply(None, error)``.
Reply: TypeAlias = Callable[[Any, BaseException | None], None]
#: A fire-and-forget report: (generation, outcome, duration).
ReportItem: TypeAlias = tuple[int, Outcome, float]


class Envelope:
    """A request and its reply channel, travelling together (as in pykka)."""

    __slots__ = ("message", "reply")

    def __init__(self, message: object, reply: Reply | None) -> None:
        self.message = message
        self.reply = reply


#: What an inbox holds.
InboxItem: TypeAlias = ReportItem | Envelope


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


#: What a breaker that was never reported a duration shows (never mutated).
NO_CALL_TIMES: Final = CallTimes()

#: Transitions before the first: shared, as ``transition_counts`` is replaced
#: at every transition and never mutated.
NO_TRANSITIONS_YET: Final[dict[tuple[str, str], int]] = {}

#: The log event and level of each transition, by (from, to) or by target.
TRANSITION_EVENTS: Final[
    dict[tuple[CircuitState, CircuitState] | CircuitState, tuple[str, str]]
] = {
    (CircuitState.CLOSED, CircuitState.OPEN): ("breaker_opened", "error"),
    (CircuitState.HALF_OPEN, CircuitState.OPEN): ("breaker_reopened", "warning"),
    (CircuitState.OPEN, CircuitState.HALF_OPEN): ("breaker_half_open", "info"),
    (CircuitState.HALF_OPEN, CircuitState.CLOSED): ("breaker_closed", "info"),
    (CircuitState.OPEN, CircuitState.OPEN): ("breaker_open_extended", "warning"),
    CircuitState.FORCED_OPEN: ("breaker_forced_open", "warning"),
    CircuitState.DISABLED: ("breaker_disabled", "warning"),
    CircuitState.CLOSED: ("breaker_reset", "info"),
}
