"""The state table: every breaker's state in memory the daemon shares with its clients.

A push wakes each client process to tell it a breaker opened; on a busy host
that takes a scheduler wake-up per process, and a process whose threads are
all busy hears of it late. The state table removes the wake-up: the daemon
writes each breaker's state into one shared memory region, and a client
reads its breaker's slot on every call, a plain memory load, no system call.
A trip is visible to every process on the host the moment the daemon
writes it, before its reply to the failure report leaves.

This module is the table's layout only (pure: it works on a buffer it is
given). The daemon makes the region (``actor._state_table``: a sealed
``memfd`` no process but the daemon can write) and hands a read-only
descriptor to each client with its ``welcome`` (``SCM_RIGHTS``), so the
table is exactly as private as the socket. ``Welcome.state_table`` is the
number of slots, ``Registered.slot`` a breaker's slot (0: none).

Layout, native byte order (the daemon and its clients share a host), in
32-byte slots of four 64-bit words:

* slot 0, the header: ``MAGIC``, ``LAYOUT_VERSION``, the slot count (header
  included), ``SLOT_SIZE``;
* slot ``i >= 1``, one breaker: ``seq``, ``generation``, the state's code
  (its index in ``CircuitState``, plus ``ASK_SUCCESSES`` while a plain
  success may change the state: ``Snapshot.successes_safe`` is false),
  ``open_until`` as a float64 bit pattern (NaN: none).

``seq`` makes each slot a seqlock: odd while the daemon writes the slot, and
one higher (even) after. A reader reads ``seq``, the fields, and ``seq``
again, and keeps the fields only if both reads gave the same even number.
The daemon is the only writer (one thread), so writes never race each other.
Word loads and stores are atomic on the platforms CPython runs on, and x86-64
keeps stores in program order; a reader on a weaker memory model still never
keeps a torn slot, since ``seq`` is re-read after the fields.
"""

from __future__ import annotations

import math
import struct
from typing import Final

from ._errors import BreakerError
from ._messages import CircuitState

__all__ = [
    "ASK_SUCCESSES",
    "LAYOUT_VERSION",
    "MAGIC",
    "SLOT_SIZE",
    "SLOT_WORDS",
    "SlotState",
    "StateTableError",
    "check_header",
    "read_slot",
    "slot_words",
    "table_size",
    "write_header",
    "write_slot",
]

MAGIC: Final = int.from_bytes(b"BRKDSTT\x01", "little")
LAYOUT_VERSION: Final = 2
#: Set in a slot's state word while successes must be acknowledged.
ASK_SUCCESSES: Final = 1 << 32
SLOT_SIZE: Final = 32
SLOT_WORDS: Final = SLOT_SIZE // 8
#: A slot's words are re-read at most this many times while the daemon writes them.
READ_ATTEMPTS: Final = 64

_STATES: Final = tuple(CircuitState)
_CODES: Final = {state: code for code, state in enumerate(_STATES)}
_NO_DEADLINE: Final = struct.unpack("=Q", struct.pack("=d", math.nan))[0]
_FLOAT: Final = struct.Struct("=d")
_WORD: Final = struct.Struct("=Q")
_HEADER: Final = struct.Struct("=4Q")

#: What a slot says: ``(seq, generation, state, open_until, successes_safe)``.
SlotState = tuple[int, int, CircuitState, float | None, bool]


class StateTableError(BreakerError, ValueError):
    """A buffer that is not a state table this code understands."""


def table_size(slots: int) -> int:
    """Bytes for a table of ``slots`` slots, the header included."""
    if slots < 2:
        raise ValueError(f"a state table needs at least 2 slots (the header and one), not {slots}")
    return slots * SLOT_SIZE


def write_header(buffer: memoryview, slots: int) -> None:
    """Make ``buffer`` (``table_size(slots)`` bytes, zeroed) an empty table."""
    if len(buffer) != table_size(slots):
        raise ValueError(
            f"a table of {slots} slots is {table_size(slots)} bytes, not {len(buffer)}"
        )
    _HEADER.pack_into(buffer, 0, MAGIC, LAYOUT_VERSION, slots, SLOT_SIZE)


def check_header(buffer: memoryview) -> int:
    """The slot count of the table in ``buffer``; ``StateTableError`` if it is not one."""
    if len(buffer) < 2 * SLOT_SIZE or len(buffer) % SLOT_SIZE:
        raise StateTableError(f"a state table cannot be {len(buffer)} bytes long")
    magic, version, slots, slot_size = _HEADER.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise StateTableError("not a breakerd state table (bad magic)")
    if version != LAYOUT_VERSION or slot_size != SLOT_SIZE:
        raise StateTableError(
            f"state table layout {version} with {slot_size}-byte slots; "
            f"this code reads layout {LAYOUT_VERSION} with {SLOT_SIZE}-byte slots"
        )
    if slots * SLOT_SIZE != len(buffer):
        raise StateTableError(f"the header says {slots} slots, the table is {len(buffer)} bytes")
    return int(slots)


def slot_words(buffer: memoryview, slot: int) -> memoryview:
    """Slot ``slot`` of the table in ``buffer`` as four 64-bit words (read-only if it is)."""
    if not 1 <= slot < len(buffer) // SLOT_SIZE:
        raise IndexError(f"no slot {slot} in a table of {len(buffer) // SLOT_SIZE} slots")
    start = slot * SLOT_SIZE
    return buffer[start : start + SLOT_SIZE].cast("Q")


def write_slot(
    words: memoryview,
    generation: int,
    state: CircuitState,
    open_until: float | None,
    base: int = 0,
    successes_safe: bool = True,
) -> bool:
    """Publish a breaker's state in its slot; the only writer is the daemon.

    ``words`` is a slot (``slot_words``), or the whole table as 64-bit words
    with ``base`` the slot's first word (``slot * SLOT_WORDS``): the daemon
    keeps one view for every breaker rather than an object per breaker.
    Returns False, writing nothing, when the slot already says this.
    """
    code = _CODES[state] if successes_safe else _CODES[state] | ASK_SUCCESSES
    deadline = (
        _NO_DEADLINE if open_until is None else _WORD.unpack(_FLOAT.pack(float(open_until)))[0]
    )
    if words[base + 1] == generation and words[base + 2] == code and words[base + 3] == deadline:
        return False  # trial leases and rates change nothing a client admits by
    seq = words[base] | 1
    words[base] = seq  # odd: readers retry until the slot is whole again
    words[base + 1] = generation
    words[base + 2] = code
    words[base + 3] = deadline
    words[base] = seq + 1
    return True


def read_slot(words: memoryview, base: int = 0) -> SlotState | None:
    """The slot's state, whole; None if the daemon was writing it on every attempt.

    ``words`` and ``base`` as for ``write_slot``. A daemon killed in the
    middle of a write leaves ``seq`` odd for ever; the bounded retry keeps a
    reader from spinning on it (its connection drops and it stops reading
    the table soon after).
    """
    for _ in range(READ_ATTEMPTS):
        seq = words[base]
        if seq & 1:
            continue
        generation, code, deadline = words[base + 1], words[base + 2], words[base + 3]
        if words[base] != seq:
            continue
        state = code & ~ASK_SUCCESSES
        if state >= len(_STATES):
            return None  # not written by a daemon that speaks this layout
        open_until: float | None = _FLOAT.unpack(_WORD.pack(deadline))[0]
        if open_until != open_until:  # NaN: no deadline
            open_until = None
        return seq, generation, _STATES[state], open_until, not code & ASK_SUCCESSES
    return None
