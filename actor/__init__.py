"""Breaker actors: the pure state machine, the actor, the actor system, the daemon."""

from ._actor import BreakerActor, Envelope, Reply, TransitionListener
from ._machine import (
    BreakerConfig,
    Decision,
    IllegalTransitionError,
    Machine,
    RecordResult,
    Transition,
)
from ._system import ActorSystem, default_system

__all__ = [
    "ActorSystem",
    "BreakerActor",
    "BreakerConfig",
    "Decision",
    "Envelope",
    "IllegalTransitionError",
    "Machine",
    "RecordResult",
    "Reply",
    "Transition",
    "TransitionListener",
    "default_system",
]
