"""The decisions of a protected call, pure: no IO, no waiting, no clock.

``CircuitBreaker.call`` and ``call_sync`` ask these and differ only in how
they wait. A call that was not rejected here (``CircuitBreaker._local_rejection``:
forced open, or open with its deadline ahead) goes:

1. **Admit how?** ``admit(snapshot, strict)``: ``PASS`` (disabled: run it,
   record nothing), ``RUN`` (closed: run it, report its outcome) or ``ASK``
   (the actor decides: a trial, a half-open permit, every acquire with
   ``strict``).
2. **Settle.** A success is *plain* (``is_plain_success``: no trial lease,
   not slow) and travels without waiting, unless the handle says it may
   change the state. Any other outcome becomes a ``Report``
   (``report_for``), and ``needs_ack`` says whether the caller waits for the
   actor's answer before its call returns: every outcome that can change the
   state does ("read your own writes").
"""

from __future__ import annotations

from typing import Final

from breakerd.protocol import CircuitState, Outcome, Report, Snapshot

from ._classify import RateLimited, Verdict

__all__ = [
    "ASK",
    "PASS",
    "RUN",
    "admit",
    "is_plain_success",
    "needs_ack",
    "plain_generation",
    "report_for",
]

#: ``admit``'s answers.
PASS: Final = 0
RUN: Final = 1
ASK: Final = 2

_CLOSED: Final = CircuitState.CLOSED
_DISABLED: Final = CircuitState.DISABLED
_NO_ACK: Final = frozenset({Outcome.CANCELLED, Outcome.IGNORED})
_ALWAYS_ACK: Final = frozenset({Outcome.FAILURE, Outcome.RATE_LIMITED})


def plain_generation(snapshot: Snapshot) -> int | None:
    """What a handle's ``admit()`` answers for ``snapshot``: the generation a plain
    call runs under (closed, no slow-call timing), or None: the slow path decides."""
    if snapshot.state is _CLOSED and snapshot.slow_call_duration is None:
        return snapshot.generation
    return None


def admit(snapshot: Snapshot, strict: bool) -> int:
    """How a call that was not rejected here is admitted: ``PASS``, ``RUN`` or ``ASK``."""
    state = snapshot.state
    if strict:
        return ASK
    if state is _CLOSED:
        return RUN
    if state is _DISABLED:
        return PASS
    return ASK


def is_plain_success(lease: int, duration: float, slow_call_duration: float | None) -> bool:
    """A success that counts as one more in the window: no trial lease, not slow."""
    return not lease and (slow_call_duration is None or duration <= slow_call_duration)


def report_for(
    name: str, verdict: Verdict, generation: int, lease: int, duration: float
) -> Report | None:
    """The report for a call that raised, classified as ``verdict``; None: nothing to send."""
    if isinstance(verdict, RateLimited):
        reason = verdict.reason
        return Report(
            name,
            generation,
            Outcome.RATE_LIMITED,
            duration,
            lease,
            verdict.retry_after,
            None if reason == "rate_limited" else reason,
            verdict.error_code,
        )
    if verdict is Outcome.CANCELLED and not lease:
        return None  # a closed-state permit holds nothing to release
    return Report(name, generation, verdict, duration, lease)


def needs_ack(report: Report) -> bool:
    """Whether the caller waits for the actor to apply ``report``.

    Outcomes that can change the state do, and so does every trial's outcome
    but a release (cancelled) or an ignored one.
    """
    outcome = report.outcome
    return outcome in _ALWAYS_ACK or (bool(report.lease) and outcome not in _NO_ACK)
