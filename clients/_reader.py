"""The reader baton: which thread may read a daemon client's socket, and its reading.

A ``DaemonClient`` (``_daemon_client``) owns the connection: the socket's
writing side, the core, the handshake, losing and replacing it. This module
owns the other half of the socket: who reads it. Reading is passed around
with a baton, ``ReaderBaton`` (the holder's thread id, taken under the
client's lock and never waited for): whoever holds it may read the socket,
hand the bytes to the client (``DaemonClient.feed``, which feeds the core and
runs what it returns), and close a dropped connection.

A sync caller (``RemoteBreaker.ask_sync``) that finds the baton free takes
it, sends its request and reads its own reply (``request_reading``): the
kernel wakes the one thread that waits for it, where a hand-over through the
IO thread costs two wake-ups (the IO thread, then the caller) and a GIL
hand-off. While it reads, it runs every event it gets -- other callers'
replies, state pushes -- as the IO thread would, then hands the baton back. A
caller that finds it taken waits for its reply callback, as every caller did
before. On Linux the IO thread waits on an epoll set in which the socket is
one-shot: it reports readable data once and stays silent until re-armed. A
reader disarms it before its request leaves (so the reply does not wake the
IO thread as well) and re-arms it after letting go; the IO thread, woken for
data while a caller holds the baton, just goes back to waiting
(``serve_readable``), and the re-arm wakes it if anything is left. So it
neither spins nor blocks on a reader, and nothing on the socket goes unread.
Only the IO thread closes the socket, and only while holding the baton
(``drop_if_unread``): to drop a connection the client ``shutdown()``s it,
which ends any reader's wait at once, and the IO thread takes over when the
reader lets go. Without epoll (not Linux) callers never read; the IO thread
does it all.

Why the baton is taken under the client's lock and not a lock of its own: a
caller decides to read in the same critical section in which it finds the
connection there, disarms the socket and sends its request (so its reply can
reach no other reader first), and the IO thread takes it knowing that the
connection it reads is the current one. One lock makes those one step, and
costs a strict request no second acquire. It is given back by a plain store.

A caller reading in the main thread can be interrupted there (``KeyboardInterrupt``,
``SystemExit`` from a signal handler), which the IO thread never is. So the
baton is given back in a ``finally``, and an interrupted reader drops the
connection (what it had read may be lost or half fed), runs the replies it
still holds for other callers, and lets the interrupt go on: no caller is left
waiting for a reply that nobody will deliver.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from breakerd.protocol import RequestMessage

from ._core import Reply
from ._daemon_socket import DaemonSocket

if TYPE_CHECKING:
    from ._daemon_client import DaemonClient
    from ._io_thread import IOThread

__all__ = ["ReaderBaton"]


class ReaderBaton:
    """Who reads one ``DaemonClient``'s socket: the IO thread, a caller, or nobody."""

    __slots__ = ("_client", "_io", "_lock", "holder")

    def __init__(self, client: DaemonClient, lock: threading.Lock, io: IOThread) -> None:
        self._client = client
        # The client's lock (see the module docstring for why it is shared).
        self._lock = lock
        self._io = io
        #: The id of the thread reading the socket (the IO thread or a caller),
        #: or None. Taken under the lock, given back by a plain store.
        self.holder: int | None = None

    @property
    def free(self) -> bool:
        return self.holder is None

    def request_reading(
        self, message: RequestMessage, reply: Reply, read_timeout: float | None
    ) -> bool:
        """``DaemonClient.request`` with ``read``: send, then read until the reply is in.

        If the baton is taken (or the connection is being dropped) this only sends.
        Returns False, without calling ``reply``, when there is no connection.
        """
        client = self._client
        me = threading.get_ident()
        if me == self.holder or me == self._io.ident:
            # Called back while reading for others: it would wait for itself.
            raise RuntimeError("a breaker cannot wait for a reply in the thread that reads them")
        poller = self._io.poller
        took = False
        fd = -1
        try:
            with self._lock:
                conn = client.connection
                if conn is None:
                    return False
                if self.holder is None and poller is not None and conn.break_reason is None:
                    fd = conn.fd
                    # Two plain stores, nothing between them that an interrupt
                    # can stop at: the finally gives back exactly what we took.
                    self.holder = me
                    took = True
                    # Before the request leaves: its reply must not wake the IO thread.
                    poller.disarm(fd)
                msgid = client.send_request_locked(message, reply)
            if not took or not msgid:
                return msgid != 0
            read_poll = conn.read_poll
            # Holding the baton: nobody else reads, and the socket cannot be
            # closed under us (that takes the baton).
            is_pending = client.core.is_pending
            timeout = client.request_timeout
            if read_timeout is not None and read_timeout < timeout:
                timeout = read_timeout
            deadline = time.monotonic() + timeout
            while is_pending(msgid) and conn.break_reason is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break  # the IO thread's timeout check fails it
                if not read_poll.poll(int(remaining * 1000) + 1):
                    continue
                reason = self.read(conn)
                if reason is not None:
                    client.drop(reason)
                    break
            return True
        finally:
            if took:
                self.holder = None
                # Given back first, re-armed second, by every holder: the IO
                # thread, woken for data while we held the baton, left its
                # entry off; the re-arm wakes it if anything is left, and then
                # it finds the baton free (or held by a reader who re-arms in
                # turn). Nothing readable is left unwatched.
                assert poller is not None
                poller.arm(fd)

    def read(self, conn: DaemonSocket) -> str | None:
        """Holding the baton: one read, handed to the client.

        Returns why the connection must be dropped, or None.
        """
        try:
            data = conn.read()
        except BlockingIOError:
            return None
        except OSError as exc:
            return conn.break_reason or f"read failed: {exc.strerror or exc!r}"
        except BaseException:
            # Interrupted (a reader in the main thread): bytes may have been
            # read and not fed. The stream cannot be trusted: drop it.
            self._client.drop("interrupted while reading from the daemon")
            raise
        if not data:
            return conn.break_reason or "the daemon closed the connection"
        return self._client.feed(data)

    # -- for the IO thread (through the client) ------------------------------------------

    def serve_readable(self, fd: int) -> bool:
        """The socket is readable: read it unless a caller holds the baton.

        False once the connection is gone (dropped here).
        """
        client = self._client
        with self._lock:
            if self.holder is not None:
                return True  # a caller is reading: it re-arms the entry when it lets go
            self.holder = threading.get_ident()
        try:
            conn = client.connection
            assert conn is not None
            reason = conn.break_reason or self.read(conn)
            if reason is not None:
                client.connection_lost(reason)
                return False
        finally:
            self.holder = None
        poller = self._io.poller
        assert poller is not None
        poller.arm(fd)
        return True

    def drop_if_unread(self) -> bool:
        """Close a connection being dropped, unless a caller reads it; True if closed."""
        client = self._client
        with self._lock:
            if self.holder is not None:
                return False
            self.holder = threading.get_ident()
        try:
            conn = client.connection
            assert conn is not None
            assert conn.break_reason is not None
            client.connection_lost(conn.break_reason)
            return True
        finally:
            self.holder = None
