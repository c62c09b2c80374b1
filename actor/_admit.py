"""What a breaker actor keeps ready for the facade's fast path: ``admit()`` and ``seen``.

``CircuitBreaker`` asks its handle ``admit()`` before every call: the
generation a plain call (closed, no slow-call timing) runs under, or None,
and then the slow path decides on ``seen``, the snapshot that answer came
from. The actor answers from one attribute, set whenever it publishes a
snapshot (``keep_for_admit``), so the fast path reads no snapshot.
"""

from __future__ import annotations

from breakerd.protocol import CircuitState, Snapshot

__all__ = ["AdmitsPlainCalls"]

_CLOSED = CircuitState.CLOSED


class AdmitsPlainCalls:
    """``admit()`` and ``seen`` for ``BreakerActor`` (the rule is ``clients._plan``'s
    ``plain_generation``: this layer cannot import it)."""

    __slots__ = ("_plain", "seen")

    def admit(self) -> int | None:
        """The generation a plain call (closed, not timed) runs under now, else None."""
        return self._plain

    def keep_for_admit(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` what ``admit()`` answers from (the actor's thread)."""
        # `seen` first: a caller that gets the new answer decides on the new snapshot.
        self.seen = snapshot
        plain = snapshot.state is _CLOSED and snapshot.slow_call_duration is None
        self._plain = snapshot.generation if plain else None
