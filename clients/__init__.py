"""The user-facing API of breakerd.

from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState

The names below are imported on first use (PEP 562): the ``breakerd``
command lives in this package, and ``breakerd status`` must not pay for the
actor runtime, asyncio and anyio that only breakers need (about 110 ms of a
150 ms run, measured with ``python -X importtime``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from breakerd.actor import ActorSystem, BreakerConfig, Transition
    from breakerd.protocol import (
        BreakerError,
        BreakerStatus,
        CircuitBreakerOpenError,
        CircuitState,
        DaemonUnavailableError,
        Outcome,
        Snapshot,
    )

    from ._breaker import CircuitBreaker
    from ._classify import Classifier, ClassifyFunc, RateLimited, Verdict
    from ._daemon_client import DaemonClient
    from ._fallback import OnUnavailable
    from ._link import RemoteBreaker
    from ._openai import classify_openai, parse_retry_after
    from ._registry import flush_all_clients as flush

# name -> the module that defines it (relative names are this package's).
_LAZY: dict[str, str] = {
    "ActorSystem": "breakerd.actor",
    "BreakerConfig": "breakerd.actor",
    "Transition": "breakerd.actor",
    "BreakerError": "breakerd.protocol",
    "BreakerStatus": "breakerd.protocol",
    "CircuitBreakerOpenError": "breakerd.protocol",
    "CircuitState": "breakerd.protocol",
    "DaemonUnavailableError": "breakerd.protocol",
    "Outcome": "breakerd.protocol",
    "Snapshot": "breakerd.protocol",
    "CircuitBreaker": "._breaker",
    "Classifier": "._classify",
    "ClassifyFunc": "._classify",
    "RateLimited": "._classify",
    "Verdict": "._classify",
    "classify_openai": "._openai",
    "parse_retry_after": "._openai",
    "DaemonClient": "._daemon_client",
    "OnUnavailable": "._fallback",
    "RemoteBreaker": "._link",
    "flush": "._registry",
}
#: Public names defined under another name in their module.
_ALIASES: dict[str, str] = {"flush": "flush_all_clients"}

__all__ = [
    "ActorSystem",
    "BreakerConfig",
    "BreakerError",
    "BreakerStatus",
    "CircuitBreaker",
    "CircuitBreakerOpenError",
    "CircuitState",
    "Classifier",
    "ClassifyFunc",
    "DaemonClient",
    "DaemonUnavailableError",
    "OnUnavailable",
    "Outcome",
    "RateLimited",
    "RemoteBreaker",
    "Snapshot",
    "Transition",
    "Verdict",
    "classify_openai",
    "flush",
    "parse_retry_after",
]


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
