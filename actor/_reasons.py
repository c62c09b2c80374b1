"""Why a breaker changed state: ``Transition.reason``.

A ``StrEnum``: each member is its plain string, so log lines, JSON, the
daemon's events and the state file read exactly as they did when reasons
were strings (``TransitionReason.QUOTA == "quota"``), while code matches
members and sets of members instead of string prefixes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "ADMIN_REASONS",
    "FLEET_REASONS",
    "KEY_WIDE_REASONS",
    "RATE_LIMIT_REASONS",
    "TransitionReason",
    "rate_limit_reason",
]


class TransitionReason(StrEnum):
    """Why a breaker changed state."""

    #: closed -> open: the window's failure rate passed ``failure_threshold``.
    FAILURE_RATE_EXCEEDED = "failure_rate_exceeded"
    #: closed -> open: the window's slow-call rate passed ``slow_call_threshold``.
    SLOW_CALL_RATE_EXCEEDED = "slow_call_rate_exceeded"
    #: -> open (or open -> open, later): the service asked to back off (a 429).
    RATE_LIMITED = "rate_limited"
    #: -> open for ``quota_timeout``: the API key's quota or billing (429
    #: ``insufficient_quota``, 402).
    QUOTA = "quota"
    #: -> open for ``quota_timeout``: the key was refused (401/403, with ``auth_opens``).
    AUTH = "auth"
    #: open -> half_open: the open timeout is over; trial permits go out.
    OPEN_TIMEOUT_ELAPSED = "open_timeout_elapsed"
    #: half_open -> closed: the trials' failure and slow rates were within the thresholds.
    TRIAL_SUCCEEDED = "trial_succeeded"
    #: half_open -> open: too many trials failed (an expired lease counts as failed).
    TRIAL_FAILED = "trial_failed"
    #: half_open -> open: too many trials were slow.
    TRIAL_SLOW = "trial_slow"
    #: -> forced_open: an administrator (``force_open()``, ``breakerd open``).
    ADMIN_FORCE_OPEN = "admin_force_open"
    #: -> disabled: an administrator (``disable()``, ``breakerd disable``).
    ADMIN_DISABLE = "admin_disable"
    #: -> closed: an administrator (``reset()``, ``breakerd close|reset``).
    ADMIN_RESET = "admin_reset"
    #: -> open: another host of the fleet opened this breaker.
    FLEET_OPEN = "fleet_open"
    #: -> half_open or closed: the fleet's opening ended.
    FLEET_CLOSED = "fleet_closed"
    #: half_open -> open: the actor crashed and restarted (its trials' verdict is unknown).
    ACTOR_RESTARTED = "actor_restarted"
    #: Daemon mode: the daemon pushed a new state.
    DAEMON = "daemon"
    #: Daemon mode: the daemon is back; its state replaces the local fallback's.
    DAEMON_AVAILABLE = "daemon_available"
    #: Daemon mode: the daemon went away; the ``on_unavailable`` policy's state.
    DAEMON_UNAVAILABLE = "daemon_unavailable"


_R: Final = TransitionReason

#: Moves an administrator made.
ADMIN_REASONS: Final = frozenset({_R.ADMIN_FORCE_OPEN, _R.ADMIN_DISABLE, _R.ADMIN_RESET})
#: Moves the fleet made (news from other hosts: never sent back to them).
FLEET_REASONS: Final = frozenset({_R.FLEET_OPEN, _R.FLEET_CLOSED})
#: Error classes that a key-wide fault reports: open for ``quota_timeout``,
#: capped by it rather than by ``max_timeout``.
KEY_WIDE_REASONS: Final = frozenset({_R.QUOTA, _R.AUTH})
#: The error classes a rate-limited outcome can carry (``Report.reason``).
RATE_LIMIT_REASONS: Final[dict[str, TransitionReason]] = {
    reason.value: reason for reason in (_R.RATE_LIMITED, _R.QUOTA, _R.AUTH)
}


def rate_limit_reason(reason: str | None) -> TransitionReason:
    """The class of a rate-limited outcome, from a report's ``reason`` string.

    None, or a class this side does not know (a newer peer's), is
    ``rate_limited``: the normal open duration, as before there were classes.
    """
    if reason is None:
        return _R.RATE_LIMITED
    return RATE_LIMIT_REASONS.get(reason, _R.RATE_LIMITED)
