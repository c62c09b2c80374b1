"""Breaker actors: the pure state machine, the actor and the actor system.

The daemon (`breakerd serve`) lives in :mod:`breakerd.actor.daemon`; embedded
use never imports it.
"""

from ._actor import BreakerActor, Envelope, Reply, TransitionListener
from ._logging import LibraryLogger, library_logger
from ._machine import (
    DEFAULT_MAX_TIMEOUT,
    DEFAULT_QUOTA_TIMEOUT,
    BreakerConfig,
    Decision,
    IllegalTransitionError,
    Machine,
    RecordResult,
    Transition,
)
from ._system import ActorSystem, default_system

__all__ = [
    "DEFAULT_MAX_TIMEOUT",
    "DEFAULT_QUOTA_TIMEOUT",
    "ActorSystem",
    "BreakerActor",
    "BreakerConfig",
    "Decision",
    "Envelope",
    "IllegalTransitionError",
    "LibraryLogger",
    "Machine",
    "RecordResult",
    "Reply",
    "Transition",
    "TransitionListener",
    "default_system",
    "library_logger",
]
