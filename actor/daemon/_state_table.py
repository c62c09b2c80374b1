"""The daemon's side of the state table: a sealed memfd only the daemon can write.

The layout is ``breakerd.protocol.state_table``'s. The region is an
anonymous ``memfd``: no path, so no file to clean up after a crash and no
permission bits to get wrong. Seals make it safe to share with clients that
are not trusted to write: ``F_SEAL_SHRINK``/``F_SEAL_GROW`` (a client's
mapping can never be cut under it, which would kill it with SIGBUS) and
``F_SEAL_FUTURE_WRITE`` (Linux 5.1: from then on no new writable mapping and
no ``write()``, through any descriptor, so only the daemon's mapping made
before the seal can change the table). Clients get a read-only descriptor
over the socket they were admitted on, so the table is exactly as private as
the socket. Where any of this is missing (not Linux, an older kernel), the
daemon offers no table and clients rely on pushes alone.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Final

from breakerd.protocol import BreakerError, Snapshot
from breakerd.protocol import state_table as layout

__all__ = ["DEFAULT_STATE_TABLE_SLOTS", "SharedStateTable", "StateTableUnavailableError"]

#: Slots (the header included) in a daemon's table unless configured: 2 MiB
#: of address space, of which only the pages of slots in use are ever touched
#: (10,000 breakers: about 320 KiB).
DEFAULT_STATE_TABLE_SLOTS: Final = 65_536

# Not in the fcntl module of every Python the package supports (Linux 5.1+).
_F_SEAL_FUTURE_WRITE: Final = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


class StateTableUnavailableError(BreakerError, OSError):
    """This system cannot make a table that clients can read but not write."""


class SharedStateTable:
    """One daemon's table: slots handed out to breakers by name, written on every publish.

    ``reader_fd`` is the read-only descriptor sent to clients. Not thread-safe:
    the daemon's loop thread owns it, as it owns the actors that write to it.
    """

    def __init__(self, slots: int = DEFAULT_STATE_TABLE_SLOTS) -> None:
        size = layout.table_size(slots)
        if not hasattr(os, "memfd_create"):
            raise StateTableUnavailableError("memfd_create is not available on this system")
        fd = os.memfd_create("breakerd-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._buffer = memoryview(self._map)
            layout.write_header(self._buffer, slots)
            try:
                fcntl.fcntl(
                    fd,
                    fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW
                    | _F_SEAL_FUTURE_WRITE
                    | fcntl.F_SEAL_SEAL,
                )
            except OSError as exc:
                self.close()
                raise StateTableUnavailableError(
                    f"cannot seal the state table read-only for clients: {exc}"
                ) from exc
            # A descriptor of its own, opened read-only: what clients receive.
            self.reader_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(fd)
        self.slots = slots
        # One view of the whole table: 10,000 breakers must not cost 10,000 objects.
        self._words = self._buffer.cast("Q")
        self._slot_of: dict[str, int] = {}
        # Slots given back by reclaimed breakers, reused before new ones.
        self._free: list[int] = []
        self._next_slot = 1
        #: ``publish`` bound once: every actor's ``on_publish`` shares it.
        self.publisher = self.publish

    @property
    def used(self) -> int:
        """Slots given to breakers so far."""
        return len(self._slot_of)

    @property
    def full(self) -> bool:
        """No slot left for another breaker."""
        return not self._free and self._next_slot >= self.slots

    def slot_for(self, name: str) -> int:
        """The slot of breaker ``name``, given on first use; 0 (none given) when full.

        Never a shared slot: the daemon refuses a breaker it has no slot for
        (``full``) rather than let two breakers' states mix in one.
        """
        slot = self._slot_of.get(name)
        if slot is not None:
            return slot
        if self._free:
            slot = self._free.pop()
        elif self._next_slot < self.slots:
            slot = self._next_slot
            self._next_slot += 1
        else:
            return 0
        self._slot_of[name] = slot
        return slot

    def release(self, name: str) -> None:
        """Give ``name``'s slot back for another breaker (it was reclaimed).

        Only clients that registered a breaker read its slot, and a breaker
        is reclaimed only once no connection holds it, so no reader is left
        to mistake the next breaker's state for its own. The slot keeps its
        old words until the next breaker's first publish.
        """
        slot = self._slot_of.pop(name, 0)
        if slot:
            self._free.append(slot)

    def publish(self, snapshot: Snapshot) -> None:
        """Write ``snapshot``'s state into its breaker's slot, if it has one."""
        slot = self._slot_of.get(snapshot.name)
        if slot:
            layout.write_slot(
                self._words,
                snapshot.generation,
                snapshot.state,
                snapshot.open_until,
                slot * layout.SLOT_WORDS,
                snapshot.successes_safe,
            )

    def close(self) -> None:
        """Give back the descriptor and the mapping (clients keep their own)."""
        fd = getattr(self, "reader_fd", -1)
        if fd >= 0:
            os.close(fd)
            self.reader_fd = -1
        words = getattr(self, "_words", None)
        if words is not None:
            words.release()
        buffer = getattr(self, "_buffer", None)
        if buffer is not None:
            buffer.release()
        table_map = getattr(self, "_map", None)
        if table_map is not None:
            table_map.close()
