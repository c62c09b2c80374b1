"""The messages proxies and breaker actors exchange.

The in-process channel hands these objects over as they are; the socket
channel encodes them with msgpack (see ``_codec``). Everything here is
immutable and free of IO, so both ends can share one definition.

Times are ``time.monotonic()`` seconds. On Linux that clock is system-wide,
so an ``open_until`` computed by the daemon means the same instant to every
process on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from ._wire import (
    ALWAYS,
    Count,
    FiniteFloat,
    NonNegative,
    NonNegativeFloat,
    OneOf,
    Range,
    wire,
)


class CircuitState(StrEnum):
    """The state of one breaker.

    ``closed``, ``open`` and ``half_open`` are the classic three;
    ``forced_open`` and ``disabled`` are set only by an administrator.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


class Outcome(StrEnum):
    """What became of a call that held a permit."""

    SUCCESS = "success"
    FAILURE = "failure"
    #: Counts as neither success nor failure (the caller's own fault, say).
    IGNORED = "ignored"
    #: The service asked us to back off: opens the breaker for ``retry_after``.
    RATE_LIMITED = "rate_limited"
    #: The caller was cancelled: the permit is released and nothing is recorded.
    CANCELLED = "cancelled"


AdminOp = Literal["force_open", "disable", "reset"]
ADMIN_OPS: frozenset[str] = frozenset({"force_open", "disable", "reset"})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a proxy needs to admit or reject locally, published at every change."""

    name: str
    state: CircuitState
    generation: int
    #: Monotonic instant when an ``open`` breaker accepts its first trial.
    open_until: float | None = field(default=None, metadata=ALWAYS)
    failure_rate: float | None = field(default=None, metadata=ALWAYS)
    slow_call_rate: float | None = field(default=None, metadata=ALWAYS)
    #: Outcomes in the current window.
    calls: int = field(default=0, metadata=ALWAYS)
    trials_in_flight: int = field(default=0, metadata=ALWAYS)
    #: Slow-call detection is on: proxies must time calls and ack slow ones.
    slow_call_duration: float | None = field(default=None, metadata=ALWAYS)
    #: No plain success can change the state while only successes arrive: a
    #: proxy may send them without waiting. False while the window could
    #: still trip on a success (below ``min_calls``, or a time window whose
    #: successes may age out first), so each one is acknowledged.
    successes_safe: bool = True
    #: Why the breaker is not closed (``failure_rate``, ``slow_call_rate``,
    #: ``rate_limited``, ``quota``, ``auth``, ``trial_failed``, ``trial_slow``,
    #: ``lease_expired``, ``forced_open``, ``disabled``); None while closed.
    reason: str | None = None
    #: The provider's error code behind the opening (``insufficient_quota``), or None.
    error_code: str | None = None
    #: The process whose outcome opened the breaker (0: unknown or an administrator).
    opened_by_pid: int = 0


@dataclass(frozen=True, slots=True)
class Hello:
    """First request on every socket connection."""

    min_version: int
    max_version: int
    client: str
    pid: int


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    server: str
    pid: int
    #: Slots in the daemon's state table, whose read-only descriptor came
    #: with this reply (``SCM_RIGHTS``); 0: no table (see ``_state_table``).
    state_table: int = 0


@dataclass(frozen=True, slots=True)
class Register:
    """Create a breaker (or join an existing one) with these settings."""

    name: str
    config: dict[str, Any] = field(default_factory=dict, metadata=ALWAYS)


@dataclass(frozen=True, slots=True)
class Registered:
    snapshot: Snapshot
    #: Settings the caller asked for that differ from the breaker's (first wins).
    conflicts: tuple[str, ...] = field(default=(), metadata=ALWAYS)
    #: The breaker's slot in the state table (0: none).
    slot: int = 0


@dataclass(frozen=True, slots=True)
class Acquire:
    """Ask the actor for a permit (the first call after the open deadline, trials, strict mode)."""

    name: str
    #: Plain successes of this breaker, admitted under ``successes_generation``
    #: and not reported yet, to count before the permit is decided: a strict
    #: caller's previous call rides on its next acquire, not in a frame of its own.
    successes: Count = field(default=0, metadata=wire(group="successes"))
    successes_generation: NonNegative = field(default=0, metadata=wire(group="successes"))


@dataclass(frozen=True, slots=True)
class Admission:
    """The actor's answer to ``Acquire``."""

    admitted: bool
    generation: int
    #: Non-zero for a half-open trial lease; it must be reported or released.
    lease: int
    snapshot: Snapshot
    retry_after: float | None = field(default=None, metadata=ALWAYS)


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome of one permitted call.

    Sent without waiting (a notification, batched) for plain successes, and
    as a request whose reply is the new ``Snapshot`` when the outcome can
    change the state, so the caller reads its own writes.
    """

    name: str
    generation: int
    outcome: Outcome
    duration: float = field(default=0.0, metadata=ALWAYS)
    lease: int = field(default=0, metadata=ALWAYS)
    retry_after: float | None = field(default=None, metadata=ALWAYS)
    #: The error class of a rate-limited outcome (``rate_limited``, ``quota``,
    #: ``auth``): it picks the open duration and its cap. None: ``rate_limited``.
    reason: str | None = None
    #: The provider's error code, shown to the callers it rejects.
    error_code: str | None = None
    #: The reporting process (the daemon puts its peer's pid here itself).
    pid: int = 0


@dataclass(frozen=True, slots=True)
class ReportBatch:
    """Outcomes sent together, fire-and-forget (the ``reports`` notification).

    Plain successes while CLOSED travel this way: one frame for many calls.
    ``successes`` carries them as counts, ``(name, generation, count)``, so a
    batch costs the daemon one entry per breaker rather than one per call;
    ``rejections`` counts calls a client rejected locally from its cached
    state, ``(name, count)``, for the daemon's status totals.
    """

    #: Each report as the array ``[name, generation, outcome, duration, lease, retry_after]``.
    items: tuple[Report, ...] = field(default=(), metadata=wire(required=True, arrays=6))
    successes: tuple[tuple[str, NonNegative, Count], ...] = field(
        default=(), metadata=wire(nil=True)
    )
    rejections: tuple[tuple[str, Count], ...] = field(default=(), metadata=wire(nil=True))


@dataclass(frozen=True, slots=True)
class Admin:
    name: str
    op: AdminOp
    #: Every daemon of the fleet too (through Redis), not only this one.
    fleet: bool = False


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Ask for every breaker's status (``name=None``) or one breaker's.

    Every breaker's status comes a page at a time so a reply always fits in a
    frame: ``offset`` into the breakers sorted by name, at most ``limit`` of
    them (0: the daemon's page size); ``Status.next_offset`` says where the
    next page starts, None after the last.
    """

    name: str | None = field(default=None, metadata=ALWAYS)
    offset: NonNegative = 0
    limit: NonNegative = 0


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A breaker's budgets as they stand (host-wide from the daemon; else this process's).

    A field the breaker has no budget for, or that the API's headers have
    not said (or said for a window now past), is None.
    """

    #: ``max_rate`` in calls per second (before the safety margin).
    max_rate: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    #: ``max_concurrent`` leases held now.
    leases_in_use: NonNegative = 0
    #: Calls waiting to leave: granted a slot of the rate's schedule that is
    #: still ahead, or queued for a lease in this process's own queue.
    waiters: NonNegative = 0
    #: What the API's headers said is left, less what was spent since.
    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    #: Seconds until the API's request (token) count resets.
    reset_requests: float | None = None
    reset_tokens: float | None = None
    #: Admissions refused for the rate (``rate_budget``) and for a lease
    #: (``concurrency``) since the budgets were made.
    rate_rejections: NonNegative = 0
    concurrency_rejections: NonNegative = 0


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    snapshot: Snapshot
    successes: int
    failures: int
    rejections: int
    ignored: int
    clients: int = field(default=0, metadata=ALWAYS)
    #: What the breaker shares with the fleet ("off", "open", "quorum:N");
    #: None: the daemon is in no fleet.
    share: str | None = None
    #: The fleet's hosts whose open of this breaker is current, as last heard.
    hosts_open: tuple[str, ...] = field(default=(), metadata=wire(sent_with="share"))
    #: The breaker's budgets, when it has some (``max_rate``, ``max_concurrent``, headers).
    budget: BudgetStatus | None = None


@dataclass(frozen=True, slots=True)
class Status:
    breakers: tuple[BreakerStatus, ...]
    next_offset: NonNegative | None = field(default=None, metadata=ALWAYS)
    #: The fleet link's state ("connecting", "up", "down"); None: no fleet.
    fleet: str | None = None


@dataclass(frozen=True, slots=True)
class StatePush:
    """Notification: a breaker this connection uses changed state."""

    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Ask for a ``TransitionEvent`` at every transition of these breakers.

    Empty ``names``: every breaker, those registered later too. Answered with
    ``Subscribed``; the events follow on the same connection until it closes.
    """

    names: tuple[str, ...] = field(default=(), metadata=ALWAYS)


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The answer to ``Subscribe``: events follow from now on."""


@dataclass(frozen=True, slots=True)
class TransitionEvent:
    """Notification to a subscriber: one breaker changed state."""

    name: str
    from_state: CircuitState
    to_state: CircuitState
    generation: int
    reason: str
    #: Monotonic instant of the transition.
    at: float
    failure_rate: float | None = field(default=None, metadata=ALWAYS)
    slow_call_rate: float | None = field(default=None, metadata=ALWAYS)
    #: Monotonic instant when an ``open`` breaker accepts its first trial.
    open_until: float | None = field(default=None, metadata=ALWAYS)


#: A concurrency lease, as the daemon numbers them.
_LeaseId = Annotated[int, Range(minimum=1, maximum=2**63)]
#: What ``observe_limits`` reads from an API's rate-limit headers.
_LimitName = Annotated[
    str,
    OneOf(
        frozenset(
            {
                "remaining_requests",
                "reset_requests",
                "remaining_tokens",
                "reset_tokens",
                "limit_requests",
                "limit_tokens",
            }
        )
    ),
]


@dataclass(frozen=True, slots=True)
class BudgetRequest:
    """A process asks the daemon for its share of a breaker's host-wide budgets.

    One message does everything, so a process costs the daemon one frame
    for what it has to say: leases to give back, calls finished, what the
    API's headers said, and what it wants now (``want`` slots of the rate's
    schedule, at most ``wait`` seconds ahead; a concurrency ``lease``). The
    first process to ask fixes the budgets' settings (``rate``, ``burst``,
    ``max_concurrent``).
    """

    name: str
    #: ``max_rate`` in calls per second (before the safety margin), or 0: none.
    rate: NonNegativeFloat = field(default=0.0, metadata=ALWAYS)
    burst: Count = field(default=1, metadata=wire(always=True, zero=True))
    #: ``max_concurrent``, or 0: none.
    max_concurrent: Count = field(default=0, metadata=ALWAYS)
    want: Count = field(default=0, metadata=ALWAYS)
    wait: NonNegativeFloat = field(default=0.0, metadata=ALWAYS)
    #: The token estimate of each slot wanted.
    tokens: NonNegativeFloat = field(default=0.0, metadata=ALWAYS)
    lease: bool = field(default=False, metadata=ALWAYS)
    release: tuple[_LeaseId, ...] = field(default=(), metadata=ALWAYS)
    #: Calls admitted by earlier grants that finished (or were never made) since.
    done: Count = field(default=0, metadata=ALWAYS)
    #: Calls this process let go without a slot (before it knew of any
    #: budget) since: in flight, and so not in what a response says is left.
    started: Count = field(default=0, metadata=ALWAYS)
    #: Tokens to give back: estimates minus what the calls' ``usage`` said.
    tokens_back: NonNegativeFloat = field(default=0.0, metadata=ALWAYS)
    #: The newest ``observe_limits`` numbers (``remaining_requests``...), or empty.
    limits: tuple[tuple[_LimitName, NonNegativeFloat], ...] = field(
        default=(), metadata=wire(always=True, as_map=True)
    )
    #: Asks for a place in the recovery ramp of the breaker's ``generation``
    #: (a call that waited through an outage; see ``BudgetGrant.ramp_at``).
    ramp: bool = False
    generation: NonNegative = 0


@dataclass(frozen=True, slots=True)
class BudgetGrant:
    """The daemon's answer to ``BudgetRequest``."""

    #: Monotonic instants (the host's clock) at which one call each may leave.
    slots: tuple[FiniteFloat, ...] = field(default=(), metadata=ALWAYS)
    #: A concurrency lease (0: none asked, or refused).
    lease: NonNegative = field(default=0, metadata=ALWAYS)
    #: When fewer slots than wanted (or no lease) were granted: why
    #: (``rate_budget``, ``concurrency``) and in how many seconds to ask again.
    reason: str | None = field(default=None, metadata=ALWAYS)
    retry_after: FiniteFloat | None = field(default=None, metadata=ALWAYS)
    #: With ``ramp``: the instant (the host's clock) this call may leave, its
    #: place in one ramp shared by every process of the host.
    ramp_at: FiniteFloat | None = None
