"""What a daemon client's IO thread waits on: its wake-up pipe and the connection's socket."""

from __future__ import annotations

import select
from typing import Any, Final

__all__ = ["BATON", "IOPoller"]

#: Callers read their own replies where the IO thread can be kept off the socket (epoll).
BATON: Final = hasattr(select, "epoll")


class IOPoller:
    """What the IO thread waits on: its wake-up pipe and the connection's socket.

    With epoll (Linux) the socket's entry is one-shot: it reports the socket
    once, then stays off until ``arm``; ``disarm`` turns it off early. A
    caller reading its own reply keeps it off, so the IO thread is neither
    woken by that reply nor left spinning on data it may not read. Without
    epoll, a poll set with the socket always in it (callers never read then).
    """

    def __init__(self, wake_r: int) -> None:
        self._epoll: Any = None
        self._poll: Any = None
        if BATON:
            self._epoll = select.epoll()
            self._epoll.register(wake_r, select.EPOLLIN)
        else:  # pragma: no cover - not Linux
            self._poll = select.poll()
            self._poll.register(wake_r, select.POLLIN)

    def add(self, fd: int) -> None:
        if self._epoll is not None:
            try:
                self._epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
            except FileExistsError:  # pragma: no cover - a remove() that failed
                self._epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
        else:  # pragma: no cover - not Linux
            self._poll.register(fd, select.POLLIN)

    def remove(self, fd: int) -> None:
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:  # pragma: no cover - not Linux
                self._poll.unregister(fd)
        except (OSError, ValueError, KeyError):
            pass

    def arm(self, fd: int) -> None:
        # May race with the connection's end (the entry gone, the set
        # closed): then there is nothing left to watch. If the number is
        # already another connection's, arming it only costs a spare wake-up.
        epoll = self._epoll
        if epoll is not None:
            try:
                epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
            except (OSError, ValueError):
                pass

    def disarm(self, fd: int) -> None:
        # EPOLLHUP and EPOLLERR cannot be masked; one-shot, they wake the IO
        # thread at most once (it finds the baton taken and waits again).
        epoll = self._epoll
        if epoll is not None:
            try:
                epoll.modify(fd, select.EPOLLONESHOT)
            except (OSError, ValueError):
                pass

    def wait(self, timeout_ms: int) -> list[int]:
        if self._epoll is not None:
            return [fd for fd, _ in self._epoll.poll(timeout_ms / 1000)]
        return [fd for fd, _ in self._poll.poll(timeout_ms)]  # pragma: no cover

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
