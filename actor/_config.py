"""A breaker's settings: ``BreakerConfig``, its defaults and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Final

__all__ = ["DEFAULT_MAX_TIMEOUT", "DEFAULT_QUOTA_TIMEOUT", "BreakerConfig", "backoff_duration"]

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


def backoff_duration(timeout: float, backoff: float, streak: int, cap: float | None) -> float:
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
