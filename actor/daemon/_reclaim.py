"""Which breakers the daemon may reclaim, and when: pure bookkeeping, no clock.

A connection *holds* the breakers it registered. Once the last holder of a
breaker is gone, the breaker is *idle*; an idle breaker that stays closed
(no open deadline to keep, no administrator's state) for
``breaker_idle_timeout`` seconds is reclaimed: its actor stops and its state
table slot is given back. Whoever registers the name again gets a new
breaker. The daemon reads its clock and passes ``now`` in.
"""

from __future__ import annotations

__all__ = ["IdleBreakers", "sweep_period"]


def sweep_period(idle_after: float) -> float:
    """Seconds between two sweeps: a quarter of the idle time, 10 ms to a minute.

    A breaker is reclaimed between ``idle_after`` and ``idle_after`` plus one
    period after its last holder left.
    """
    return min(max(idle_after / 4, 0.01), 60.0)


class IdleBreakers:
    """Breakers no connection holds, with the instant the last holder left."""

    def __init__(self, idle_after: float) -> None:
        self.idle_after = idle_after
        self._since: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._since)

    def __contains__(self, name: object) -> bool:
        return name in self._since

    def held(self, name: str) -> None:
        """Some connection holds ``name`` (again): it is not idle."""
        self._since.pop(name, None)

    def let_go(self, name: str, now: float) -> None:
        """The last holder of ``name`` left at ``now``."""
        self._since[name] = now

    def forget(self, name: str) -> None:
        """``name`` was reclaimed, or is gone."""
        self._since.pop(name, None)

    def due(self, now: float) -> list[str]:
        """Idle breakers whose idle time is up at ``now``, longest idle first.

        They stay listed until ``forget`` or ``held``: one that cannot be
        reclaimed yet (open, say) is due again at every later sweep.
        """
        limit = now - self.idle_after
        return sorted(
            (name for name, since in self._since.items() if since <= limit),
            key=self._since.__getitem__,
        )
