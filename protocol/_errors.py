"""Errors shared by actors, the wire and the proxies.

Every error an actor or the daemon can answer with has a stable string
``code``; on the wire an error travels as ``[code, message, details]`` and the
client maps the code back onto the same class (``error_from_code``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class BreakerError(Exception):
    """Base class of every error breakerd raises on purpose."""

    code: ClassVar[str] = "internal"

    def details(self) -> dict[str, Any]:
        """Extra fields that travel with the error on the wire."""
        return {}


class CircuitBreakerOpenError(BreakerError):
    """A call was rejected because its breaker does not admit calls now.

    Raised for every rejection without a fallback, whatever the state
    (``open``, ``half_open`` with every trial permit taken, ``forced_open``).
    """

    code = "open"

    def __init__(
        self,
        name: str,
        retry_after: float | None = None,
        state: str = "open",
        message: str | None = None,
    ) -> None:
        # Rejections are the hot path of an open breaker: the message is built
        # only if someone looks at it (BaseException.__new__ keeps the args).
        self.name = name
        self.retry_after = retry_after
        self.state = state
        self._message = message

    def __str__(self) -> str:
        message = self._message
        if message is None:
            message = f"circuit breaker {self.name!r} is {self.state}"
            if self.retry_after is not None:
                message += f"; retry after {self.retry_after:.3f}s"
            self._message = message
        return message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.retry_after, self.state, str(self)))

    def details(self) -> dict[str, Any]:
        return {"name": self.name, "retry_after": self.retry_after, "state": self.state}


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


class PermissionDeniedError(BreakerError):
    """The peer is not allowed to do this."""

    code = "forbidden"


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
        PermissionDeniedError,
        DaemonUnavailableError,
        ProtocolError,
    )
}

ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_code(code: str, message: str, details: dict[str, Any] | None = None) -> BreakerError:
    """Rebuild the exception a remote peer answered with."""
    cls = _BY_CODE.get(code, BreakerError)
    if cls is CircuitBreakerOpenError:
        d = details or {}
        retry_after = d.get("retry_after")
        return CircuitBreakerOpenError(
            str(d.get("name", "")),
            float(retry_after) if isinstance(retry_after, (int, float)) else None,
            str(d.get("state", "open")),
            message,
        )
    return cls(message)
