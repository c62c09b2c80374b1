"""A daemon client's IO thread: when to connect, wait, read, flush, time out and give up.

The thread owns its schedule and what it waits on: its wake-up pipe and an
``IOPoller`` with the connection's socket in it. The connection itself and
the core stay the client's (``_daemon_client``), the reader baton is
``_reader``'s; the thread drives them through the client's methods for it
(``connect``, ``serve_readable``, ``send_due``, ``finish_writing``, ``drop``,
``drop_if_unread``).

It reconnects with exponential backoff and jitter (``backoff_min`` to
``backoff_max``), cut short when the socket file changes: a daemon that
starts (again) binds a new one (see ``_nap``).
"""

from __future__ import annotations

import os
import random
import select
import threading
import time
from typing import TYPE_CHECKING, Final

from ._io_poller import IOPoller

if TYPE_CHECKING:
    from ._daemon_client import DaemonClient

__all__ = ["IOThread"]

#: While disconnected, how often the IO thread looks for a new socket file (see _nap).
_SOCKET_POLL: Final = 0.05
#: The first reconnect delay after the socket file changed (then doubling as usual).
_SOCKET_RETRY: Final = 0.01
#: How long a closing client (at exit) waits for the daemon to read its last
#: reports and close its side: a healthy daemon takes well under a millisecond.
_CLOSE_GRACE: Final = 0.25


class IOThread:
    """The IO thread of one ``DaemonClient``, made with it and started on its first use."""

    __slots__ = (
        "_client",
        "_first_attempt",
        "_socket_seen",
        "_wake_r",
        "_wake_w",
        "ident",
        "poller",
        "thread",
    )

    def __init__(self, client: DaemonClient) -> None:
        self._client = client
        #: The thread's id once it runs (``Thread.ident`` is a property call).
        self.ident: int | None = None
        #: What the thread waits on, while it runs.
        self.poller: IOPoller | None = None
        self._first_attempt = threading.Event()
        # What the socket file looked like at the last failed attempt (see _nap).
        self._socket_seen: tuple[int, int, int] | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.thread = threading.Thread(
            target=self._run, name=f"breakerd-client {client.path}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        """Cut the thread's wait short (a flush armed, the client closing)."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait for the first connection attempt; False if not made in time."""
        return self._first_attempt.wait(timeout)

    def close_unstarted(self) -> None:
        """Release the wake-up pipe of a thread that will never run (which would have)."""
        self._close_pipe()

    def abandon(self) -> None:
        """In a forked child, where this thread does not exist: close our copies of its fds."""
        poller, self.poller = self.poller, None
        if poller is not None:
            poller.close()
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        client = self._client
        self.ident = threading.get_ident()
        backoff = client.backoff_min
        try:
            self.poller = IOPoller(self._wake_r)
            while not client.closed:
                # Each pass starts disconnected: _pump returns once the connection is gone.
                self._socket_seen = _socket_identity(client.path)
                fd = client.connect()
                self._first_attempt.set()
                if fd is None:
                    if self._nap(backoff * random.uniform(0.8, 1.2)):
                        # A new socket: a new daemon, maybe not listening
                        # yet (it binds, then listens): retry soon.
                        backoff = _SOCKET_RETRY
                    else:
                        backoff = min(backoff * 2, client.backoff_max)
                    continue
                connected_at = time.monotonic()
                self._pump(fd)
                if client.had_welcome:
                    # A working connection dropped: try again at once.
                    backoff = client.backoff_min
                elif time.monotonic() - connected_at >= client.request_timeout:
                    # Unanswered for request_timeout: a hung daemon, which
                    # queues connections in its listen backlog. Queue the
                    # next one at once, so that it is answered the moment the
                    # daemon runs again, not a backoff later. Each try costs
                    # request_timeout: no tight loop.
                    continue
                elif not client.closed:
                    # Dropped before the handshake (a hung daemon, a refused
                    # peer): back off, or it would be a tight loop.
                    if self._nap(backoff * random.uniform(0.8, 1.2)):
                        backoff = _SOCKET_RETRY
                    else:
                        backoff = min(backoff * 2, client.backoff_max)
        except BaseException:  # pragma: no cover - a bug here must not go silent
            client.log_crash()
            raise
        finally:
            self._first_attempt.set()
            poller, self.poller = self.poller, None
            if poller is not None:
                poller.close()
            self._close_pipe()

    def _nap(self, seconds: float) -> bool:
        """Wait out a reconnect delay; True, early, if the socket file changed.

        A daemon that starts (again) binds a new socket file: a new inode, or
        a file where there was none. Looking at it every ``_SOCKET_POLL``
        seconds (one stat(), about a microsecond) lets a process switch back
        within that of the daemon's start, while the delay between real
        connection attempts still backs off to ``backoff_max`` for a daemon
        that stays away (or a stale file nobody listens on). Cheaper and
        simpler than inotify, which also misses a directory made anew.
        """
        client = self._client
        end = time.monotonic() + seconds
        while not client.closed:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            self._sleep(min(remaining, _SOCKET_POLL))
            if _socket_identity(client.path) != self._socket_seen:
                return True
        return False

    def _sleep(self, seconds: float) -> None:
        """Wait for ``seconds``, or less if woken (close)."""
        try:
            ready, _, _ = select.select([self._wake_r], [], [], seconds)
        except OSError:  # pragma: no cover
            return
        if ready:
            self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _pump(self, fd: int) -> None:
        """Serve the connection on ``fd`` until it is lost (dropped by the client)."""
        client = self._client
        poller = self.poller
        assert poller is not None
        wake_r = self._wake_r
        flush_at: float | None = None
        close_by: float | None = None
        while True:
            now = time.monotonic()
            # Callers do not wake this thread when they send a request (that
            # would cost every request a syscall), so it looks at the pending
            # table on a tick: a hung daemon is noticed within 1.25 timeouts.
            deadline = now + client.request_timeout / 4
            if not client.breaking:
                if flush_at is None and client.flush_armed:
                    flush_at = now + client.flush_delay
                pending = client.next_deadline()
                if pending is not None and pending < deadline:
                    deadline = pending
                if flush_at is not None and flush_at < deadline:
                    deadline = flush_at
                if close_by is not None and close_by < deadline:
                    deadline = close_by
            # else: dropping the connection, waiting only for a reader to let go.
            socket_ready = False
            for ready in poller.wait(max(0, int((deadline - now) * 1000) + 1)):
                if ready == wake_r:
                    self._drain_wake()
                    continue
                # The socket; its one-shot entry is off until re-armed.
                socket_ready = True
                if not client.serve_readable(fd):
                    return
            if not socket_ready and client.reader_free:
                # Woken for something else with nobody reading: re-arm anyway,
                # so a re-arm that a reader missed (interrupted in its
                # finally) costs at most one wake-up, never the connection.
                poller.arm(fd)
            if not client.breaking:
                now = time.monotonic()
                if flush_at is not None and now >= flush_at:
                    flush_at = None
                    client.send_due(now, flush=True)
                else:
                    client.send_due(now, flush=False)
            if client.closed and not client.breaking:
                # A graceful close: our last reports, then end of file; the
                # daemon reads both and closes its side, which ends this
                # loop. Closing at once could lose them: a daemon that writes
                # to a closed peer (a push) drops the connection, and with it
                # whatever it had not read yet.
                if close_by is None:
                    close_by = time.monotonic() + _CLOSE_GRACE
                    if not client.finish_writing():
                        close_by = 0.0  # already broken: nothing to wait for
                if time.monotonic() >= close_by:
                    client.drop("the client was closed")
            # Nobody is reading: drop it now. Otherwise shutdown() has ended
            # the reader's wait, and its re-arm wakes us when it lets go.
            if client.breaking and client.drop_if_unread():
                return


def _socket_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)
