"""How exceptions from the openai SDK (3.x, on httpx2) count against a breaker.

On by default for every ``CircuitBreaker`` (``openai=False`` turns it off; a
``classify=`` callable runs first and can override any of it):

=========================================  ==========================================
openai exception                           outcome (error class)
=========================================  ==========================================
``APIConnectionError``, ``APITimeoutError``  failure
status 5xx (503, 529...), 408              failure (``overloaded``: counted in the
                                           window, reopened with ``backoff``)
status 429                                 ``rate_limited``: open until the
                                           response's ``retry-after-ms``, else
                                           ``retry-after`` (seconds or HTTP date),
                                           else ``x-ratelimit-reset-requests`` /
                                           ``-tokens`` whose matching
                                           ``x-ratelimit-remaining-*`` is 0, else
                                           for the normal open duration
429 with code ``insufficient_quota``, 402  ``quota``: open for ``quota_timeout``,
                                           logged as an error (once per breaker
                                           and code): it will not heal by waiting
401, 403                                   ``auth``: logged as an error (once per
                                           breaker and status); ignored, or with
                                           ``auth_opens=True`` open for
                                           ``quota_timeout``
other 4xx                                  ignored: the caller's fault must not
                                           trip the breaker for everyone
``APIResponseValidationError``             failure (the service sent garbage)
anything else from openai                  not decided here (the ``record`` rule)
=========================================  ==========================================

OpenAI-compatible servers (Azure OpenAI, vLLM, gateways) answer through the
same SDK exceptions and headers, so the same rules apply to them.

The openai package is imported only when an exception from it is seen, so
breakerd does not pay openai's import time unless the app uses it.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from breakerd.actor import library_logger
from breakerd.protocol import Outcome

__all__ = [
    "ErrorClass",
    "classify_openai",
    "openai_error_class",
    "parse_rate_limits",
    "parse_retry_after",
]

_logger = library_logger()


class ErrorClass(NamedTuple):
    """What an openai exception means for a breaker.

    ``reason`` is the error class of a rate-limited outcome (``rate_limited``,
    ``quota``, ``auth``) and None otherwise; ``error_code`` is the provider's
    code (``rate_limit_exceeded``, ``insufficient_quota``) when it sent one.
    """

    outcome: Outcome
    retry_after: float | None = None
    reason: str | None = None
    error_code: str | None = None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _parse_reset(raw: object) -> float | None:
    """``x-ratelimit-reset-*``: ``"6m0s"``, ``"1.5s"``, ``"20ms"``, or plain seconds."""
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        pos = 0
        value = 0.0
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                return None
            value += float(match.group(1)) * scale[match.group(2)]
            pos = match.end()
        if pos == 0 or pos != len(text):
            return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


def parse_rate_limit_reset(headers: Mapping[str, str] | Any) -> float | None:
    """Seconds until an exhausted ``x-ratelimit-*`` budget resets, or None.

    Only a budget whose ``x-ratelimit-remaining-requests`` / ``-tokens`` is 0
    counts: a reset time of a budget that still has room says nothing about
    this 429. Both exhausted: the later reset.
    """
    found: float | None = None
    try:
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is None:
                continue
            try:
                if float(remaining) > 0:
                    continue
            except ValueError:
                continue
            reset = _parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
            if reset is not None and (found is None or reset > found):
                found = reset
    except (AttributeError, TypeError):
        return None
    return found


def parse_rate_limits(headers: Mapping[str, str] | Any) -> dict[str, float]:
    """What a response's ``x-ratelimit-*`` headers say is left, as ``observe_limits`` takes it.

    Keys (those present and readable): ``remaining_requests``,
    ``remaining_tokens``, ``limit_requests``, ``limit_tokens`` (counts) and
    ``reset_requests``, ``reset_tokens`` (seconds from now).
    """
    found: dict[str, float] = {}
    try:
        for kind in ("requests", "tokens"):
            for field in ("remaining", "limit"):
                raw = headers.get(f"x-ratelimit-{field}-{kind}")
                if raw is None:
                    continue
                try:
                    value = float(raw)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value) and value >= 0:
                    found[f"{field}_{kind}"] = value
            reset = _parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
            if reset is not None:
                found[f"reset_{kind}"] = reset
    except (AttributeError, TypeError):
        return {}
    return found


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
    """The outcome for an openai SDK exception, or None when it is not one of ours.

    The plain form of ``openai_error_class``: a quota error is rate limited
    with no ``retry_after`` here, and an auth error ignored.
    """
    found = openai_error_class(exc)
    if found is None:
        return None
    if found.reason == "auth":
        return (Outcome.IGNORED, None)
    return (found.outcome, found.retry_after)


def openai_error_class(
    exc: BaseException, logged: set[tuple[str, object]] | None = None
) -> ErrorClass | None:
    """The error class of an openai SDK exception, or None when it is not one of ours.

    A 401/403 comes back as ``ErrorClass(IGNORED, reason="auth")``: whether
    it opens the breaker is the caller's choice (``auth_opens``). Quota and
    auth errors are logged at error; with ``logged`` (a breaker's set), once
    per event and code: a key problem is said once, not per rejected call.
    """
    module = type(exc).__module__
    if not module.startswith("openai"):
        return None
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return ErrorClass(Outcome.FAILURE)
    if isinstance(exc, openai.APIResponseValidationError):
        return ErrorClass(Outcome.FAILURE)
    if not isinstance(exc, openai.APIStatusError):
        return None
    status = exc.status_code
    code = _error_code(exc)
    if (status == 429 and code == "insufficient_quota") or status == 402:
        _log_once(
            logged,
            "openai_insufficient_quota" if status == 429 else "openai_payment_required",
            code or status,
            status=status,
            error_code=code,
            request_id=exc.request_id,
            hint="billing or quota problem: waiting will not fix it",
        )
        return ErrorClass(Outcome.RATE_LIMITED, None, "quota", code or "payment_required")
    if status == 429:
        headers = exc.response.headers
        retry_after = parse_retry_after(headers)
        if retry_after is None:
            retry_after = parse_rate_limit_reset(headers)
        return ErrorClass(Outcome.RATE_LIMITED, retry_after, "rate_limited", code)
    if status >= 500 or status == 408:
        return ErrorClass(Outcome.FAILURE)
    if status in (401, 403):
        _log_once(
            logged,
            "openai_auth_error",
            status,
            status=status,
            error_code=code,
            request_id=exc.request_id,
            hint="check the API key and its permissions",
        )
        return ErrorClass(Outcome.IGNORED, None, "auth", code)
    return ErrorClass(Outcome.IGNORED)


def _log_once(
    logged: set[tuple[str, object]] | None, event: str, key: object, **fields: Any
) -> None:
    if logged is not None:
        if (event, key) in logged:
            return
        logged.add((event, key))
    _logger.error(event, **fields)


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
