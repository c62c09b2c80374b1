"""The client's side of the daemon's state table: mapping it, checking it first.

A daemon that can offer it sends a read-only descriptor of its state table
with the ``welcome`` (see ``breakerd.protocol.state_table``); the client
maps it, and each link gets its breaker's slot with ``Registered``. A link's
``snapshot`` then compares one word of shared memory (the slot's ``seq``)
with the last one it read, on every call, and rebuilds its snapshot from
the slot when it moved: a trip reaches every process on the host the moment
the daemon writes it, without waking any of them. Pushes still come (they
carry the failure rate and the rest, and drive ``on_transition``); a push
older than what the table already showed is ignored.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import replace
from typing import Any, Final

from breakerd.protocol import Snapshot, state_table

__all__ = ["MappedStateTable", "map_state_table", "read_snapshot"]


class MappedStateTable:
    """A daemon's state table, mapped read-only into this process.

    The mapping lives as long as a slot view of it does (a link switching to
    a new connection never pulls memory from under a thread reading the old
    one); the daemon's seals keep it from shrinking under us. They are
    checked before mapping: whoever answers on the socket sent this
    descriptor, and a table that can shrink would kill this process with
    SIGBUS, one that can be written through another descriptor would lie.
    """

    def __init__(self, fd: int, slots: int) -> None:
        _check_seals(fd)
        size = os.fstat(fd).st_size
        if size != slots * state_table.SLOT_SIZE:
            raise state_table.StateTableError(
                f"the daemon announced {slots} slots; its table is {size} bytes"
            )
        self._buffer = memoryview(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
        self.slots = state_table.check_header(self._buffer)

    def slot(self, slot: int) -> memoryview | None:
        """The words of ``slot`` (from ``Registered.slot``), or None for no or a bad slot."""
        if not 1 <= slot < self.slots:
            return None
        return state_table.slot_words(self._buffer, slot)


def map_state_table(fd: int, slots: int, log: Any) -> MappedStateTable | None:
    """Map the table the daemon sent as ``fd`` (closed here); None, with a warning, if unusable."""
    try:
        return MappedStateTable(fd, slots)
    except (OSError, ValueError) as exc:
        # Pushes alone still work: slower to spread a trip, never wrong.
        log.warning("state_table_unusable", error=str(exc))
        return None
    finally:
        os.close(fd)


def read_snapshot(words: memoryview, current: Snapshot) -> tuple[Snapshot, int] | None:
    """``current`` brought up to date with its slot, and the slot's ``seq``.

    None if the slot was mid-write on every try (a daemon killed writing).
    The rates and counts are not in the table: they come with the push that
    follows a change.
    """
    slot = state_table.read_slot(words)
    if slot is None:
        return None
    seq, generation, state, open_until, successes_safe = slot
    if generation > current.generation:
        current = Snapshot(
            current.name,
            state,
            generation,
            open_until,
            slow_call_duration=current.slow_call_duration,
            successes_safe=successes_safe,
        )
    elif generation == current.generation and successes_safe is not current.successes_safe:
        current = replace(current, successes_safe=successes_safe)
    return current, seq


# Not in the fcntl module of every Python the package supports (Linux 5.1+).
_F_SEAL_FUTURE_WRITE: Final = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


def _check_seals(fd: int) -> None:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except (OSError, AttributeError) as exc:
        raise state_table.StateTableError(
            f"the table's descriptor cannot carry seals (not a sealed memfd): {exc}"
        ) from None
    missing = [
        name
        for name, bits in (
            ("grow", fcntl.F_SEAL_GROW),
            ("shrink", fcntl.F_SEAL_SHRINK),
            ("write", fcntl.F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE),
        )
        if not seals & bits
    ]
    if missing:
        raise state_table.StateTableError(
            f"the table is not sealed against {', '.join(missing)} (seals {seals:#x})"
        )
