"""Scopes: child breakers ``NAME/KEY`` (one per model, say) under a parent breaker.

A scoped call runs under two breakers: the parent (one per API key) and the
scope its key selects. The parent admits it first, the scope second; what the
call raised decides which of them counts it. Key-wide classes (``quota``,
``auth``: a 429 ``insufficient_quota``, a 402, a 401/403 with ``auth_opens``)
open the parent and so reject every scope; everything else (failures, slow
calls, ordinary rate limits) counts in the scope alone, so one model's 429
never rejects another model.

Scopes are bounded: a closed scope unused for ``scope_ttl`` seconds is
forgotten (in embedded mode its actor stops too), and past ``max_scopes``
live scopes a new key is governed by the parent alone (a warning, once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final

from breakerd.actor import library_logger
from breakerd.protocol import CircuitState, Outcome

from ._classify import RateLimited, Verdict

__all__ = ["DEFAULT_MAX_SCOPES", "DEFAULT_SCOPE_TTL", "ScopeFunc", "Scopes", "model_scope"]

#: Default ``scope_ttl``: an hour. Long enough that a model used now and then
#: keeps its history; short enough that keys seen once (a tenant, a one-off
#: deployment) do not pile up.
DEFAULT_SCOPE_TTL: Final = 3600.0
#: Default ``max_scopes`` per breaker: more models than any account uses at
#: once, far fewer than a key space gone wrong (a request id used as a key).
DEFAULT_MAX_SCOPES: Final = 256

ScopeFunc = Callable[..., "str | None"]

_logger = library_logger()


def model_scope(*args: Any, **kwargs: Any) -> str | None:
    """The ``model=`` keyword of a call (the OpenAI SDK's convention), or None."""
    model = kwargs.get("model")
    return model if isinstance(model, str) and model else None


class KeyWideOnly:
    """The parent's classifier under a scope: only key-wide classes count there.

    Everything else is the scope's business (and a scope's rejection is not
    the parent's failure): ignored here, so the parent's window only sees
    successes and its openings come from key-wide classes.
    """

    __slots__ = ("_inner",)

    def __init__(self, inner: Callable[[BaseException], Verdict]) -> None:
        self._inner = inner

    def __call__(self, exc: BaseException) -> Verdict:
        verdict = self._inner(exc)
        if isinstance(verdict, RateLimited) and verdict.key_wide:
            return verdict
        if verdict is Outcome.CANCELLED:
            return verdict
        return Outcome.IGNORED


class ScopeOnly:
    """A scope's classifier: key-wide classes are left to the parent."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Callable[[BaseException], Verdict]) -> None:
        self._inner = inner

    def __call__(self, exc: BaseException) -> Verdict:
        verdict = self._inner(exc)
        if isinstance(verdict, RateLimited) and verdict.key_wide:
            return Outcome.IGNORED
        return verdict


class Scopes:
    """The live scopes of one parent: created on first use, expired when idle, bounded."""

    def __init__(
        self,
        parent_name: str,
        make: Callable[[str], Any],
        clock: Callable[[], float],
        *,
        ttl: float,
        max_scopes: int,
        forget: Callable[[Any], None],
    ) -> None:
        self.parent_name = parent_name
        self._make = make
        self._clock = clock
        self.ttl = ttl
        self.max_scopes = max_scopes
        self._forget = forget
        self._lock = threading.Lock()
        # key -> [child, last used]
        self._live: dict[str, list[Any]] = {}
        self._next_sweep = clock() + ttl
        self._warned = False

    def __len__(self) -> int:
        return len(self._live)

    def get(self, key: str, *, create: bool = True) -> Any | None:
        """The child for ``key``; None when past ``max_scopes`` (the parent governs)."""
        now = self._clock()
        live = self._live
        entry = live.get(key)
        if entry is not None:
            entry[1] = now
            if now >= self._next_sweep:
                self._sweep(now)
            return entry[0]
        if not create:
            return None
        with self._lock:
            entry = live.get(key)
            if entry is not None:
                return entry[0]
            if now >= self._next_sweep:
                self._sweep_locked(now)
            if len(live) >= self.max_scopes:
                if not self._warned:
                    self._warned = True
                    _logger.warning(
                        "breaker_scope_limit",
                        breaker=self.parent_name,
                        max_scopes=self.max_scopes,
                        scope=key,
                        rule="new scopes are governed by the parent alone",
                    )
                return None
            child = self._make(key)
            live[key] = [child, now]
            return child

    def _sweep(self, now: float) -> None:
        with self._lock:
            self._sweep_locked(now)

    def _sweep_locked(self, now: float) -> None:
        self._next_sweep = now + self.ttl / 4
        horizon = now - self.ttl
        for key, (child, used) in list(self._live.items()):
            # Only a closed scope forgets nothing worth keeping: an open one
            # still has a deadline to honour.
            if used <= horizon and child.state is CircuitState.CLOSED:
                del self._live[key]
                self._forget(child)
