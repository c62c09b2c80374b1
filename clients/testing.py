"""Helpers for testing code that uses breakerd (shipped, like ``structlog.testing``).

from breakerd.clients import ActorSystem, CircuitBreaker
from breakerd.clients.testing import FakeClock

clock = FakeClock()
system = ActorSystem(clock=clock).start()
breaker = CircuitBreaker("svc", timeout=30.0, system=system)
...
clock.advance(30.0)  # the open timeout passes without sleeping
"""

from __future__ import annotations

from breakerd.actor.testing import FakeClock

__all__ = ["FakeClock"]
