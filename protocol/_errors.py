"""Every error breakerd raises, in one tree under ``BreakerError``.

``except BreakerError`` catches anything breakerd raises on purpose. The
classes a user of the library can meet are importable from
``breakerd.clients`` (marked *public*); the others belong to the daemon, the
wire or the command line and do not reach a protected call. Each says where
it lives. An error that travels on the wire has a stable string ``code``: it
goes out as ``[code, message, details]`` and comes back as the same class
(``error_from_code``); a new class never reuses a code.

* BreakerError                  ``internal``: an actor crashed; an unknown code   public
  + CircuitBreakerOpenError     ``open``: the breaker rejected a call             public
  | + BudgetExceededError       a budget refused the call (built by the client,   public
  |                             never sent: max_rate, headers, max_concurrent)
  + DaemonUnavailableError      ``unavailable``: no daemon, on_unavailable="deny" public
  + ActorStoppedError           ``shutting_down``: the actor system is stopping   public
  + InboxFullError              ``busy``: a breaker's inbox is full               public
  + InvalidRequestError         ``invalid_request``: bad settings, unknown op     public
  + UnknownBreakerError         ``unknown_breaker``: no breaker by that name      public
  + LimitExceededError          ``limit_exceeded``: a documented daemon limit     public
  + ProtocolError               ``protocol_error``: bytes that break the protocol public
  | + LocalProtocolError        this side's fault (travels as ProtocolError)
  | + RemoteProtocolError       the peer's fault (travels as ProtocolError)
  + VersionMismatchError        ``version_mismatch``: no common protocol version
  + StateTableError [ValueError]        protocol/_state_table.py: not a table we read
  + IllegalTransitionError [RuntimeError]  actor/_machine.py: a transition outside
  |                             the whitelist, a bug; the actor restarts
  + NotConnectedError [RuntimeError]    clients/_core.py: a request, no connection
  + the daemon's (actor/daemon/), raised while ``breakerd serve`` starts or reloads:
  | ConfigError [ValueError] and MetricsUnavailableError [RuntimeError] (_config.py),
  | StateFileError [ValueError] (_state_file.py), StateTableUnavailableError
  | [OSError] (_state_table.py), DaemonAlreadyRunningError [RuntimeError] and
  | UnsafeSocketPathError [RuntimeError] (_socket_file.py), ActivationError
  | [RuntimeError] (_systemd.py)
  + UsageError                  clients/cli/_main.py: bad command-line arguments

The classes in brackets keep that standard base too, so code that caught
``ValueError`` from the config loader (say) still does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Final


class BreakerError(Exception):
    """The base of every error breakerd raises (the tree is in this module's docstring)."""

    code: ClassVar[str] = "internal"

    def details(self) -> dict[str, Any]:
        """Extra fields that travel with the error on the wire."""
        return {}


# What to do about each reason a breaker opens: the end of the error's sentence.
_HINTS: dict[str, str] = {
    "rate_limited": "the provider asked us to back off; retry after that, or use another model",
    "quota": "the API key's quota or billing is exhausted and waiting will not fix it; "
    "add credit or raise the quota, then run `breakerd reset {name}` or wait for the trial",
    "auth": "the provider refused the API key; fix the key or its permissions, "
    "then run `breakerd reset {name}` or wait for the trial",
    "failure_rate": "too many calls failed; one trial call goes through when the time is up",
    "slow_call_rate": "too many calls were slow; one trial call goes through when the time is up",
    "trial_failed": "the trial call failed; the next trial goes through when the time is up",
    "trial_slow": "the trial call was slow; the next trial goes through when the time is up",
    "forced_open": "an administrator opened it; `breakerd reset {name}` closes it",
}


class CircuitBreakerOpenError(BreakerError):
    """A call was rejected because its breaker does not admit calls now.

    Raised for every rejection without a fallback, whatever the state
    (``open``, ``half_open`` with every trial permit taken, ``forced_open``).

    Attributes:
        name: The breaker that rejected (a scope's is ``PARENT/KEY``).
        state: Its state (``open``, ``half_open``, ``forced_open``).
        scope: The scope key (a model, say) when a scope rejected, else None.
        reason: Why it is open: ``failure_rate``, ``slow_call_rate``,
            ``rate_limited``, ``quota``, ``auth``, ``trial_failed``,
            ``trial_slow``, ``forced_open``; None when not known.
        error_code: The provider's code behind it (``insufficient_quota``), or None.
        retry_after: Seconds until the breaker lets a trial through, or None.
        open_until: That instant on the wall clock (seconds since the
            epoch), or None.
        opened_by_pid: The process whose outcome opened it, or None.
    """

    code = "open"

    # Every field lives in ``args``, in this order, read back by the
    # properties below: a rejection is the hot path of an open breaker, and
    # the library builds one with ``new_open_error`` (BaseException's own
    # constructor, no Python frame, no instance dict), about a quarter of a
    # rejection's cost less than running this ``__init__``.
    def __init__(
        self,
        name: str,
        retry_after: float | None = None,
        state: str = "open",
        message: str | None = None,
        scope: str | None = None,
        reason: str | None = None,
        error_code: str | None = None,
        open_until: float | None = None,
        opened_by_pid: int | None = None,
    ) -> None:
        super().__init__(
            name,
            retry_after,
            state,
            message,
            scope,
            reason,
            error_code,
            open_until,
            opened_by_pid,
        )

    def _arg(self, index: int) -> Any:
        args = self.args
        return args[index] if len(args) > index else None

    @property
    def name(self) -> str:
        return str(self.args[0])

    @property
    def retry_after(self) -> float | None:
        return self._arg(1)  # type: ignore[no-any-return]

    @property
    def state(self) -> str:
        return self._arg(2) or "open"

    @property
    def scope(self) -> str | None:
        return self._arg(4)  # type: ignore[no-any-return]

    @property
    def reason(self) -> str | None:
        return self._arg(5)  # type: ignore[no-any-return]

    @property
    def error_code(self) -> str | None:
        return self._arg(6)  # type: ignore[no-any-return]

    @property
    def open_until(self) -> float | None:
        return self._arg(7)  # type: ignore[no-any-return]

    @property
    def opened_by_pid(self) -> int | None:
        return self._arg(8)  # type: ignore[no-any-return]

    def __str__(self) -> str:
        # Built only when someone looks, then kept (an instance dict only then).
        message: str | None = self.__dict__.get("_message") or self._arg(3)
        if message is None:
            message = self._sentence()
            self._message = message
        return message

    def _sentence(self) -> str:
        message = f"circuit breaker {self.name!r} is {self.state}"
        reason = self.reason
        if reason is None and self.scope is None:
            # Nothing more is known (an older daemon): the plain form.
            if self.retry_after is not None:
                message += f"; retry after {self.retry_after:.3f}s"
            return message
        if self.scope is not None:
            parent = self.name.rsplit("/" + self.scope, 1)[0]
            message = (
                f"circuit breaker {self.name!r} (scope {self.scope!r} of {parent!r}) "
                f"is {self.state}"
            )
        cause = [reason] if reason else []
        if self.error_code:
            cause.append(self.error_code)
        if self.opened_by_pid:
            cause.append(f"opened by pid {self.opened_by_pid}")
        if cause:
            message += f" ({', '.join(cause)})"
        if self.retry_after is not None:
            message += f"; retry after {self.retry_after:.3f}s"
            if self.open_until is not None:
                when = datetime.fromtimestamp(self.open_until, UTC).strftime("%H:%M:%S UTC")
                message += f" (at {when})"
        if self.state == "half_open":
            hint = "every trial permit is taken; retry in a moment"
        else:
            hint = _HINTS.get(reason or "", "").format(name=self.name)
        return f"{message}: {hint}" if hint else message

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_open_error,
            (self.name, self.retry_after, self.state, str(self), self.details()),
        )

    def details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "name": self.name,
            "retry_after": self.retry_after,
            "state": self.state,
        }
        # Optional keys: an older peer reads the three it knows.
        for key in ("scope", "reason", "error_code", "open_until", "opened_by_pid"):
            value = getattr(self, key)
            if value is not None:
                details[key] = value
        return details


class BudgetExceededError(CircuitBreakerOpenError):
    """A call was refused by a budget (``max_rate``, the API's headers, ``max_concurrent``).

    A ``CircuitBreakerOpenError``, so every handler and ``fallback`` of a
    rejection catches it too; the breaker itself may well be closed.
    ``reason`` is ``rate_budget`` (the rate, or what the API's headers said
    is left) or ``concurrency``; ``retry_after`` is the seconds until a call
    asking again would be admitted (None for ``concurrency``: that depends
    on when the calls in flight end).
    """

    def _sentence(self) -> str:
        if self.reason == "concurrency":
            why = "every one of its max_concurrent calls is in flight"
        else:
            why = "its rate budget (max_rate, or what the API's headers said is left) is spent"
        message = f"circuit breaker {self.name!r} refused the call: {why}"
        if self.retry_after is not None:
            message += f"; retry after {self.retry_after:.3f}s"
        return message + " (or pass wait= to let calls wait their turn)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


#: ``new_open_error(name, retry_after, state, message, scope, reason,
#: error_code, open_until, opened_by_pid)``, positionally (a prefix will do):
#: a ``CircuitBreakerOpenError`` made by BaseException's C constructor, which
#: keeps the arguments in ``args`` and runs no Python code. What the library
#: raises on the hot path of an open breaker (measured: 267 ns to raise and
#: catch one, against 497 ns through ``__init__``).
new_open_error: Final[Callable[..., CircuitBreakerOpenError]] = functools.partial(
    BaseException.__new__, CircuitBreakerOpenError
)


def _rebuild_open_error(
    name: str, retry_after: float | None, state: str, message: str, details: dict[str, Any]
) -> CircuitBreakerOpenError:
    return _open_error_from_details(details, message)


class ActorStoppedError(BreakerError):
    """The actor system (or the daemon) is shutting down; the request was not served."""

    code = "shutting_down"


class InboxFullError(BreakerError):
    """A breaker's inbox is full; the request was refused rather than queued without bound."""

    code = "busy"


class InvalidRequestError(BreakerError):
    """A well-formed message that asks for something impossible (bad config, unknown op)."""

    code = "invalid_request"


class UnknownBreakerError(BreakerError):
    """No breaker by that name is registered."""

    code = "unknown_breaker"


class LimitExceededError(BreakerError):
    """The daemon is at one of its documented limits (breakers, per client, state table)."""

    code = "limit_exceeded"


class VersionMismatchError(BreakerError):
    """Client and daemon share no protocol version."""

    code = "version_mismatch"


class DaemonUnavailableError(BreakerError):
    """The daemon cannot be reached and the policy is to fail closed."""

    code = "unavailable"


class ProtocolError(BreakerError):
    """Bytes that break the wire protocol. The connection must be closed.

    This is the only exception the decoder raises for bad input.
    """

    code = "protocol_error"


class LocalProtocolError(ProtocolError):
    """This side tried to break the protocol (a bug here, not in the peer).

    Like h11's error of the same name: the connection is dead all the same.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol: close its connection."""


# Local and remote protocol errors travel as ``protocol_error`` and come back
# as plain ``ProtocolError``: whose fault it was is only known where it happened.
_BY_CODE: dict[str, type[BreakerError]] = {
    cls.code: cls
    for cls in (
        BreakerError,
        CircuitBreakerOpenError,
        ActorStoppedError,
        InboxFullError,
        InvalidRequestError,
        LimitExceededError,
        UnknownBreakerError,
        VersionMismatchError,
        DaemonUnavailableError,
        ProtocolError,
    )
}

ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_code(code: str, message: str, details: dict[str, Any] | None = None) -> BreakerError:
    """Rebuild the exception a remote peer answered with."""
    cls = _BY_CODE.get(code, BreakerError)
    if cls is CircuitBreakerOpenError:
        return _open_error_from_details(details or {}, message)
    return cls(message)


def _open_error_from_details(d: dict[str, Any], message: str) -> CircuitBreakerOpenError:
    def number(key: str) -> float | None:
        value = d.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return None

    def text(key: str) -> str | None:
        value = d.get(key)
        return value if isinstance(value, str) else None

    pid = d.get("opened_by_pid")
    return CircuitBreakerOpenError(
        str(d.get("name", "")),
        number("retry_after"),
        str(d.get("state", "open")),
        message,
        scope=text("scope"),
        reason=text("reason"),
        error_code=text("error_code"),
        open_until=number("open_until"),
        opened_by_pid=pid if type(pid) is int else None,
    )
