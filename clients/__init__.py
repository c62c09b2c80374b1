"""The user-facing API of breakerd.

from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState
"""

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
from ._openai import classify_openai, parse_retry_after
from ._remote import DaemonClient, OnUnavailable, RemoteBreaker
from ._remote import flush_all_clients as flush

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
