"""What ``CircuitBreaker`` uses of the breaker it holds, whichever kind it is.

The in-process ``BreakerActor`` (embedded mode) and the daemon link
``_link.RemoteBreaker`` (daemon mode) both offer it; the checks at the end
make mypy hold them to it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from breakerd.actor import BreakerActor, BreakerConfig
from breakerd.protocol import Outcome, Snapshot

from ._core import Reply

__all__ = ["ActorSurface"]


class ActorSurface(Protocol):
    """What ``CircuitBreaker`` uses of its breaker: ``BreakerActor`` and ``RemoteBreaker``."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def listeners(self) -> list[Any]: ...

    def post_success(self, generation: int) -> bool: ...

    def post_report(self, item: tuple[int, Outcome, float]) -> bool: ...

    def post_rejection(self, count: int = 1) -> None: ...

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None: ...


if TYPE_CHECKING:
    from ._daemon_client import DaemonClient
    from ._link import RemoteBreaker

    # Both implement the surface the facade relies on.
    _actor_conforms: ActorSurface = BreakerActor("x", BreakerConfig(), clock=time.monotonic)
    _link_conforms: ActorSurface = RemoteBreaker(DaemonClient("x"), "x", BreakerConfig())
