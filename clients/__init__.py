"""breakerd's public API: everything in ``__all__`` here, nothing else.

from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState

Also public: the submodules ``breakerd.clients.openai`` (``protect``, the
OpenAI rules), ``breakerd.clients.metrics`` (``BreakerCollector``) and
``breakerd.clients.testing`` (``FakeClock``). Every other module, and the
``breakerd.actor`` and ``breakerd.protocol`` packages, are internal: they may
change in any release.

The names below are imported on first use (PEP 562): the ``breakerd``
command lives in this package, and ``breakerd status`` must not pay for the
actor runtime, asyncio and anyio that only breakers need (about 110 ms of a
150 ms run, measured with ``python -X importtime``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from breakerd.actor import ActorSystem, BreakerConfig, Transition, TransitionReason
    from breakerd.protocol import (
        ActorStoppedError,
        BreakerError,
        BreakerStatus,
        BudgetExceededError,
        BudgetStatus,
        CircuitBreakerOpenError,
        CircuitState,
        DaemonUnavailableError,
        InboxFullError,
        InvalidRequestError,
        LimitExceededError,
        Outcome,
        ProtocolError,
        Snapshot,
        UnknownBreakerError,
    )

    from ._breaker import CircuitBreaker
    from ._classify import ClassifyFunc, RateLimited, Verdict
    from ._fallback import OnUnavailable
    from ._globals import flush_all_clients as flush

# name -> the module that defines it (relative names are this package's).
_LAZY: dict[str, str] = {
    # The breaker and what its calls, its state and its observers hand out.
    "CircuitBreaker": "._breaker",
    "CircuitState": "breakerd.protocol",
    "Snapshot": "breakerd.protocol",
    "BreakerStatus": "breakerd.protocol",
    "BudgetStatus": "breakerd.protocol",
    "BreakerConfig": "breakerd.actor",
    "Transition": "breakerd.actor",
    "TransitionReason": "breakerd.actor",
    "OnUnavailable": "._fallback",
    "ActorSystem": "breakerd.actor",
    "flush": "._globals",
    # Classifiers: what ``classify=`` takes and returns.
    "Outcome": "breakerd.protocol",
    "RateLimited": "._classify",
    "Verdict": "._classify",
    "ClassifyFunc": "._classify",
    # The errors a protected call, status() or an admin call can raise.
    "BreakerError": "breakerd.protocol",
    "CircuitBreakerOpenError": "breakerd.protocol",
    "BudgetExceededError": "breakerd.protocol",
    "DaemonUnavailableError": "breakerd.protocol",
    "ActorStoppedError": "breakerd.protocol",
    "InboxFullError": "breakerd.protocol",
    "InvalidRequestError": "breakerd.protocol",
    "UnknownBreakerError": "breakerd.protocol",
    "LimitExceededError": "breakerd.protocol",
    "ProtocolError": "breakerd.protocol",
}
#: Public names defined under another name in their module.
_ALIASES: dict[str, str] = {"flush": "flush_all_clients"}

__all__ = [
    "ActorStoppedError",
    "ActorSystem",
    "BreakerConfig",
    "BreakerError",
    "BreakerStatus",
    "BudgetExceededError",
    "BudgetStatus",
    "CircuitBreaker",
    "CircuitBreakerOpenError",
    "CircuitState",
    "ClassifyFunc",
    "DaemonUnavailableError",
    "InboxFullError",
    "InvalidRequestError",
    "LimitExceededError",
    "OnUnavailable",
    "Outcome",
    "ProtocolError",
    "RateLimited",
    "Snapshot",
    "Transition",
    "TransitionReason",
    "UnknownBreakerError",
    "Verdict",
    "flush",
]


if not TYPE_CHECKING:
    # Hidden from type checkers, which see the imports above instead: a
    # module-level __getattr__ would make any name importable as Any, so a
    # typo or an internal name would pass mypy in users' code.

    def __getattr__(name: str) -> Any:
        module_name = _LAZY.get(name)
        if module_name is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        module = importlib.import_module(module_name, __name__)
        value = getattr(module, _ALIASES.get(name, name))
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
