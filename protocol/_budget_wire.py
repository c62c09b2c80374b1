"""The budget messages on the wire: ``budget`` (``BudgetRequest``) and ``budget_grant``.

One encode/decode pair each, kept apart from ``_codec`` (which registers
them in its tables) so that they stay self-contained. Decoding checks every
field and raises ``RemoteProtocolError`` for anything else, as the codec
does: params are maps, absent optional keys take their defaults.
"""

from __future__ import annotations

import math
from typing import Any, Final

from ._errors import RemoteProtocolError
from ._messages import BudgetGrant, BudgetRequest

__all__ = ["budget_grant", "budget_grant_map", "budget_request", "budget_request_map"]

#: Counts are unsigned 32-bit on the wire, as the codec's.
_MAX_COUNT: Final = 0xFFFF_FFFF
_LIMIT_KEYS: Final = frozenset(
    {
        "remaining_requests",
        "reset_requests",
        "remaining_tokens",
        "reset_tokens",
        "limit_requests",
        "limit_tokens",
    }
)


def _bad(where: str, key: str, expected: str, value: object) -> RemoteProtocolError:
    return RemoteProtocolError(f"{where}: field {key!r} must be {expected}, got {value!r}")


def _number(d: dict[str, Any], key: str, where: str) -> float:
    value = d.get(key, 0.0)
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise _bad(where, key, "a finite number >= 0", value)
    return float(value)


def _count(d: dict[str, Any], key: str, where: str, default: int = 0) -> int:
    value = d.get(key, default)
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise _bad(where, key, f"an integer from 0 to {_MAX_COUNT}", value)
    return value


def budget_request_map(m: BudgetRequest) -> dict[str, Any]:
    return {
        "name": m.name,
        "rate": m.rate,
        "burst": m.burst,
        "max_concurrent": m.max_concurrent,
        "want": m.want,
        "wait": m.wait,
        "tokens": m.tokens,
        "lease": m.lease,
        "release": list(m.release),
        "done": m.done,
        "started": m.started,
        "tokens_back": m.tokens_back,
        "limits": dict(m.limits),
        "ramp": m.ramp,
        "generation": m.generation,
    }


def budget_request(d: dict[str, Any]) -> BudgetRequest:
    w = "budget"
    name = d.get("name")
    if type(name) is not str:
        raise _bad(w, "name", "a string", name)
    release = d.get("release", [])
    if (
        type(release) is not list
        or len(release) > _MAX_COUNT
        or any(type(x) is not int or not 0 < x <= 2**63 for x in release)
    ):
        raise _bad(w, "release", "an array of lease ids", release)
    raw_limits = d.get("limits", {})
    if type(raw_limits) is not dict:
        raise _bad(w, "limits", "a map", raw_limits)
    limits = []
    for key in raw_limits:
        if key not in _LIMIT_KEYS:
            raise _bad(w, "limits", f"a map of {sorted(_LIMIT_KEYS)}", key)
        limits.append((key, _number(raw_limits, key, w)))
    lease = d.get("lease", False)
    if type(lease) is not bool:
        raise _bad(w, "lease", "a boolean", lease)
    ramp = d.get("ramp", False)
    if type(ramp) is not bool:
        raise _bad(w, "ramp", "a boolean", ramp)
    generation = d.get("generation", 0)
    if type(generation) is not int or not 0 <= generation < 2**64:
        raise _bad(w, "generation", "an integer from 0 to 2**64 - 1", generation)
    return BudgetRequest(
        name,
        _number(d, "rate", w),
        max(_count(d, "burst", w, 1), 1),
        _count(d, "max_concurrent", w),
        _count(d, "want", w),
        _number(d, "wait", w),
        _number(d, "tokens", w),
        lease,
        tuple(release),
        _count(d, "done", w),
        _count(d, "started", w),
        _number(d, "tokens_back", w),
        tuple(limits),
        ramp,
        generation,
    )


def budget_grant_map(m: BudgetGrant) -> dict[str, Any]:
    return {
        "type": "budget_grant",
        "slots": list(m.slots),
        "lease": m.lease,
        "reason": m.reason,
        "retry_after": m.retry_after,
        "ramp_at": m.ramp_at,
    }


def budget_grant(d: dict[str, Any]) -> BudgetGrant:
    w = "budget_grant"
    slots = d.get("slots", [])
    if type(slots) is not list or any(
        type(x) not in (int, float) or not math.isfinite(x) for x in slots
    ):
        raise _bad(w, "slots", "an array of numbers", slots)
    lease = d.get("lease", 0)
    if type(lease) is not int or lease < 0:
        raise _bad(w, "lease", "an integer >= 0", lease)
    reason = d.get("reason")
    if reason is not None and type(reason) is not str:
        raise _bad(w, "reason", "a string or nil", reason)
    retry = d.get("retry_after")
    if retry is not None and (type(retry) not in (int, float) or not math.isfinite(retry)):
        raise _bad(w, "retry_after", "a number or nil", retry)
    ramp_at = d.get("ramp_at")
    if ramp_at is not None and (type(ramp_at) not in (int, float) or not math.isfinite(ramp_at)):
        raise _bad(w, "ramp_at", "a number or nil", ramp_at)
    return BudgetGrant(
        tuple(float(x) for x in slots),
        lease,
        reason,
        None if retry is None else float(retry),
        None if ramp_at is None else float(ramp_at),
    )
