"""How exceptions from the openai SDK (3.x, on httpx2) count against a breaker.

On by default for every ``CircuitBreaker`` (``openai=False`` turns it off; a
``classify=`` callable runs first and can override any of it):

=========================================  ==========================================
openai exception                           outcome
=========================================  ==========================================
``APIConnectionError``, ``APITimeoutError``  failure
status 5xx, 408                            failure
status 429                                 rate limited for the response's
                                           ``retry-after-ms`` / ``retry-after``
429 with code ``insufficient_quota``       rate limited for the normal open
                                           duration, logged as an error: it will
                                           not heal by waiting
401, 403                                   ignored, logged as an error
other 4xx                                  ignored: the caller's fault must not
                                           trip the breaker for everyone
``APIResponseValidationError``             failure (the service sent garbage)
anything else from openai                  not decided here (the ``record`` rule)
=========================================  ==========================================

The openai package is imported only when an exception from it is seen, so
breakerd does not pay openai's import time unless the app uses it.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from breakerd.actor import library_logger
from breakerd.protocol import Outcome

__all__ = ["classify_openai", "parse_retry_after"]

_logger = library_logger()


def parse_retry_after(
    headers: Mapping[str, str] | Any, *, wall_clock: Callable[[], float] = time.time
) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or HTTP date).

    An HTTP date names a wall-clock instant, so that one case needs the wall
    clock (injectable for tests); only the difference leaves this function.
    """
    try:
        raw_ms = headers.get("retry-after-ms")
        if raw_ms is not None:
            try:
                value = float(raw_ms) / 1000.0
            except ValueError:
                value = math.nan  # a bad ms header must not hide a good retry-after
            if math.isfinite(value) and value >= 0:
                return value
        raw = headers.get("retry-after")
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            parsed = email.utils.parsedate_tz(raw)
            if parsed is None:
                return None
            value = email.utils.mktime_tz(parsed) - wall_clock()
        if not math.isfinite(value):
            return None
        return max(0.0, value)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None


def classify_openai(exc: BaseException) -> tuple[Outcome, float | None] | None:
    """The outcome for an openai SDK exception, or None when it is not one of ours."""
    module = type(exc).__module__
    if not module.startswith("openai"):
        return None
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return (Outcome.FAILURE, None)
    if isinstance(exc, openai.APIResponseValidationError):
        return (Outcome.FAILURE, None)
    if not isinstance(exc, openai.APIStatusError):
        return None
    status = exc.status_code
    if status == 429:
        if _error_code(exc) == "insufficient_quota":
            _logger.error(
                "openai_insufficient_quota",
                status=status,
                request_id=exc.request_id,
                hint="billing or quota problem: waiting will not fix it",
            )
            return (Outcome.RATE_LIMITED, None)
        return (Outcome.RATE_LIMITED, parse_retry_after(exc.response.headers))
    if status >= 500 or status == 408:
        return (Outcome.FAILURE, None)
    if status in (401, 403):
        _logger.error(
            "openai_auth_error",
            status=status,
            request_id=exc.request_id,
            hint="check the API key and its permissions",
        )
    return (Outcome.IGNORED, None)


def _error_code(exc: Any) -> str | None:
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("code"):
            return str(inner["code"])
    return None
