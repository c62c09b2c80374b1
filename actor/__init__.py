"""Breaker actors: the pure state machine, the actor and the actor system.

Internal: what the other layers of breakerd import, with no stability
promise (the public API is ``breakerd.clients``). The daemon (``breakerd
serve``) lives in :mod:`breakerd.actor.daemon`; embedded use never imports it.
"""

from ._actor import BreakerActor
from ._globals import default_system
from ._logging import library_logger
from ._machine import DEFAULT_MAX_TIMEOUT, DEFAULT_QUOTA_TIMEOUT, BreakerConfig, Transition
from ._reasons import TransitionReason
from ._system import ActorSystem

__all__ = [
    "DEFAULT_MAX_TIMEOUT",
    "DEFAULT_QUOTA_TIMEOUT",
    "ActorSystem",
    "BreakerActor",
    "BreakerConfig",
    "Transition",
    "TransitionReason",
    "default_system",
    "library_logger",
]
