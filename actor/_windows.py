"""The machine's windows: the outcomes a closed breaker judges its rates on.

Pure and synchronous like the machine: instants come from the caller. Both
kinds keep running totals (``total``, ``failures``, ``slow``) so that judging
a window costs nothing, and both speak the same small interface, so the
machine never asks which one it holds:

* ``CountWindow``: the last ``size`` outcomes;
* ``TimeWindow``: the outcomes of the last ``seconds`` seconds, one bucket per
  whole second.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TypeAlias

__all__ = ["CountWindow", "TimeWindow", "Window", "new_window", "stored_count"]


def stored_count(value: object) -> int:
    """A count read back from storage: a non-negative int, or ``ValueError``."""
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a count (an integer >= 0), got {value!r}")
    return value


class CountWindow:
    """The last ``size`` outcomes, with running totals.

    A ring of bytes, one per outcome (``failed | slow << 1``), made on the
    first outcome and grown to ``size``: a breaker that has seen no call holds
    no buffer, and a full window of 100 outcomes takes about 160 bytes (a
    deque of ints took 760 bytes empty).
    """

    __slots__ = ("_head", "_items", "failures", "size", "slow", "total")

    def __init__(self, size: int) -> None:
        self.size = size
        # Oldest first while filling; once full, the oldest is at _head.
        self._items: bytearray | None = None
        self._head = 0
        self.total = 0
        self.failures = 0
        self.slow = 0

    def add(self, failed: bool, slow: bool, now: float) -> None:
        items = self._items
        if items is None:
            items = self._items = bytearray()
        item = int(failed) | (int(slow) << 1)
        if len(items) < self.size:
            items.append(item)
            self.total += 1
        else:
            head = self._head
            old = items[head]
            items[head] = item
            self._head = head + 1 if head + 1 < self.size else 0
            self.failures -= old & 1
            self.slow -= old >> 1
        self.failures += failed
        self.slow += slow

    def add_successes(self, count: int, now: float) -> None:
        """``count`` plain successes at once (the batched fast path)."""
        size = self.size
        items = self._items
        if count >= size or items is None:
            if count >= size:
                # Every outcome in the window is one of these successes.
                self._items = bytearray(size)
                self._head = 0
                self.total, self.failures, self.slow = size, 0, 0
                return
            items = self._items = bytearray()
        room = size - len(items)
        if count <= room:
            items.extend(bytes(count))
            self.total += count
            return
        if room:
            items.extend(bytes(room))
            self.total = size
        # Full: the oldest ``count - room`` outcomes give way, from _head on.
        self._overwrite(items, count - room)

    def _overwrite(self, items: bytearray, count: int) -> None:
        head, size = self._head, self.size
        end = head + count
        if end <= size:
            self._forget(items, head, end)
        else:
            self._forget(items, head, size)
            end -= size
            self._forget(items, 0, end)
        self._head = end if end < size else 0

    def _forget(self, items: bytearray, start: int, end: int) -> None:
        if self.failures or self.slow:
            old = items[start:end]
            both = old.count(3)
            self.failures -= old.count(1) + both
            self.slow -= old.count(2) + both
        items[start:end] = bytes(end - start)

    def outcomes(self) -> bytes:
        """Every outcome in the window, oldest first (``failed | slow << 1`` each)."""
        items = self._items
        if items is None:
            return b""
        head = self._head
        return bytes(items[head:] + items[:head])

    def expire(self, now: float) -> None:
        """Count windows do not age."""

    def successes_safe(self, trips: Callable[[int, int, int], bool]) -> bool:
        """True when no run of plain successes can make the window trip.

        Successes only lower both rates once the window is judged; below
        ``min_calls`` the first judged success sees the worst rate.
        """
        if not (self.failures or self.slow):
            return True
        # A full window stays full: a success pushes out an outcome as it lands.
        total = self.total if self.total == self.size else self.total + 1
        return not trips(self.failures, self.slow, total)

    def export(self) -> dict[str, Any]:
        # One digit per outcome (failed | slow << 1): compact, and exact.
        return {"items": "".join(map(str, self.outcomes()))}

    def restore(self, data: dict[str, Any]) -> None:
        """Refill an empty window from ``export()``'s data; ``ValueError`` if malformed."""
        items = data["items"]
        if not isinstance(items, str) or len(items) > self.size or items.strip("0123"):
            raise ValueError("a count window must be at most window_size digits 0-3")
        for item in map(int, items):
            self.add(bool(item & 1), bool(item >> 1), 0.0)


#: A time window's buckets before its first outcome: shared, never appended to
#: (an empty deque costs 760 bytes, and most breakers' windows stay empty).
_NO_BUCKETS: Final[deque[list[int]]] = deque(maxlen=0)


class TimeWindow:
    """Outcomes of the last ``seconds`` seconds, one bucket per whole second."""

    __slots__ = ("_buckets", "failures", "seconds", "slow", "total")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # [second, total, failures, slow], oldest first; made on the first outcome.
        self._buckets: deque[list[int]] = _NO_BUCKETS
        self.total = 0
        self.failures = 0
        self.slow = 0

    def expire(self, now: float) -> None:
        # A bucket for second s covers [s, s+1); it leaves the window once all
        # of it is older than ``seconds``.
        oldest_kept = math.floor(now - self.seconds)
        buckets = self._buckets
        while buckets and buckets[0][0] < oldest_kept:
            _, total, failures, slow = buckets.popleft()
            self.total -= total
            self.failures -= failures
            self.slow -= slow

    def add_successes(self, count: int, now: float) -> None:
        """``count`` plain successes at ``now`` at once (one bucket, O(1))."""
        self._bucket(now)[1] += count
        self.total += count

    def _bucket(self, now: float) -> list[int]:
        self.expire(now)
        second = math.floor(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] >= second:
            # A clock never goes back; if a caller's instant does, it joins the
            # newest bucket rather than reordering history.
            return buckets[-1]
        bucket = [second, 0, 0, 0]
        if buckets is _NO_BUCKETS:
            buckets = self._buckets = deque()
        buckets.append(bucket)
        return bucket

    def successes_safe(self, trips: Callable[[int, int, int], bool]) -> bool:
        """True when no run of plain successes can make the window trip.

        Any of the oldest buckets may age out before the next success lands,
        so every run of newest buckets is a window that success may join;
        the first success judged in it sees that window's worst rate.
        """
        total = failures = slow = 0
        for _, bucket_total, bucket_failures, bucket_slow in reversed(self._buckets):
            total += bucket_total
            failures += bucket_failures
            slow += bucket_slow
            if (failures or slow) and trips(failures, slow, total + 1):
                return False
        return True

    def add(self, failed: bool, slow: bool, now: float) -> None:
        bucket = self._bucket(now)
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.total += 1
        self.failures += failed
        self.slow += slow

    def export(self) -> dict[str, Any]:
        return {"buckets": [list(bucket) for bucket in self._buckets]}

    def restore(self, data: dict[str, Any]) -> None:
        """Refill an empty window from ``export()``'s data; ``ValueError`` if malformed."""
        previous = -math.inf
        for second, total, failures, slow in data["buckets"]:
            counts = (stored_count(total), stored_count(failures), stored_count(slow))
            if not isinstance(second, int) or second <= previous:
                raise ValueError("time window buckets must have increasing whole seconds")
            if counts[1] > counts[0] or counts[2] > counts[0]:
                raise ValueError("a time window bucket holds more failures than outcomes")
            previous = second
            if self._buckets is _NO_BUCKETS:
                self._buckets = deque()
            self._buckets.append([second, *counts])
            self.total += counts[0]
            self.failures += counts[1]
            self.slow += counts[2]


#: Either kind: the machine holds one and calls the methods both have.
Window: TypeAlias = CountWindow | TimeWindow


def new_window(window_seconds: float | None, window_size: int) -> Window:
    """An empty window of the kind a breaker's settings ask for."""
    if window_seconds is not None:
        return TimeWindow(window_seconds)
    return CountWindow(window_size)
