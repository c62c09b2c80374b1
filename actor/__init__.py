"""Breaker actors: the pure state machine, the actor, the actor system, the daemon."""

from ._actor import BreakerActor, Envelope, Reply, TransitionListener
from ._daemon_config import ConfigError, DaemonSettings, load_config
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
from ._server import SERVER_NAME, Daemon, DaemonAlreadyRunningError
from ._system import ActorSystem, default_system

__all__ = [
    "DEFAULT_MAX_TIMEOUT",
    "DEFAULT_QUOTA_TIMEOUT",
    "SERVER_NAME",
    "ActorSystem",
    "BreakerActor",
    "BreakerConfig",
    "ConfigError",
    "Daemon",
    "DaemonAlreadyRunningError",
    "DaemonSettings",
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
    "load_config",
]
