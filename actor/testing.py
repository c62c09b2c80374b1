"""The runtime's fake clock; users import it as ``breakerd.clients.testing.FakeClock``."""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A monotonic clock that moves only when told to.

    Pass it as ``ActorSystem(clock=FakeClock())``; call ``advance(seconds)`` to
    let time pass without sleeping.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        """What a waiting call does on this clock: time passes at once (never back)."""
        self.advance(max(seconds, 0.0))

    def advance(self, seconds: float) -> float:
        """Move time forward (never back) and return the new instant."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds!r} s)")
        with self._lock:
            self._now += seconds
            return self._now
