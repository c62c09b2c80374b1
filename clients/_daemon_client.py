"""The daemon transport: one connection per process and socket, with its IO thread.

``DaemonClient`` owns the Unix socket to one daemon for one process and moves
bytes between it and a ``ClientCore`` (``_core``), which holds every protocol
decision. Each breaker's link (``_link.RemoteBreaker``) attaches to it; the
client calls back on its links only through the small surface
``LinkEvents`` names (registered, a snapshot, lost, stalled, answering again).
The per-process registry of clients (``get_client``, exit and fork hooks)
is in ``_globals`` (process-wide state); the IO thread's wait set is ``_io_poller``.

Threads and locks
-----------------
One background IO thread per ``DaemonClient`` reads the socket, runs reply
callbacks and state pushes, flushes batched reports, times out requests, and
reconnects with backoff. Writers take ``DaemonClient._lock`` (which also
guards the core) and write to the socket themselves: a request costs the
caller one ``write``, instead of two hops through a writer thread. Reply
callbacks and transition listeners run *outside* the lock.

Reading is passed around with a baton, ``DaemonClient._reader_ident`` (the
holder's thread id, taken under ``_lock`` and never waited for): whoever
holds it may read the socket, feed the core and run what the core returns.
A sync caller (``RemoteBreaker.ask_sync``) that finds the baton free takes
it, sends its request and reads its own reply: the kernel wakes the one
thread that waits for it, where a hand-over through the IO thread costs two
wake-ups (the IO thread, then the caller) and a GIL hand-off. While it reads,
it runs every event it gets -- other callers' replies, state pushes -- as the
IO thread would, then hands the baton back. A caller that finds it taken
waits for its reply callback, as every caller did before. On Linux the IO
thread waits on an epoll set in which the socket is one-shot: it reports
readable data once and stays silent until re-armed. A reader disarms it
before its request leaves (so the reply does not wake the IO thread as well)
and re-arms it after letting go; the IO thread, woken for data while a caller
holds the baton, just goes back to waiting, and the re-arm wakes it if
anything is left. So it neither spins nor blocks on a reader, and nothing
on the socket goes unread. Only the IO thread closes the socket, and only
while holding the baton: to drop a connection it ``shutdown()``s it, which
ends any reader's wait at once, and takes over when the reader lets go.
Without epoll (not Linux) callers never read; the IO thread does it all.

A caller reading in the main thread can be interrupted there (``KeyboardInterrupt``,
``SystemExit`` from a signal handler), which the IO thread never is. So the
baton is given back in a ``finally``, and an interrupted reader drops the
connection (what it had read may be lost or half fed), runs the replies it
still holds for other callers, and lets the interrupt go on: no caller is left
waiting for a reply that nobody will deliver.

This one thread-based shell serves sync and async callers alike: async
callers wait on an asyncio future that the reply callback settles with
``loop.call_soon_threadsafe`` (the facade's ``_request_async``), so there is
no separate anyio shell.

Fire-and-forget outcomes take no lock: a link appends to its breaker's tally
in the core and, only when no flush is armed yet (``flush_armed``, a plain
slot), calls ``arm_flush``, which writes one byte to the IO thread's wake-up
pipe. The IO thread then sends everything queued ``FLUSH_DELAY`` seconds
later as one ``reports`` notification, whether or not the process makes
another call; it takes a tally whole (its length is the count), so its cost
per batch does not grow with the successes in it.

Disconnects and reconnects
--------------------------
* A lost connection (EOF, a write error, a protocol error, or a request left
  unanswered for ``request_timeout`` seconds: a hung daemon) fails every
  pending request at once, whichever thread was reading; links switch to
  their ``on_unavailable`` policy first, and requests that failed this way
  are answered by that policy (a local breaker, fail open, or
  ``DaemonUnavailableError``). Only the IO thread closes the socket, holding
  the baton; other threads ``shutdown()`` it to hand it over.
* A caller that gives up on a reply after its link's ``daemon_timeout``
  marks the client stalled (``note_stalled``): every link switches to its
  policy, keeping its registration, until the next byte read from the
  daemon switches them back.
* The IO thread reconnects with exponential backoff and jitter, cut short
  when the socket file changes (a daemon starting again), says ``hello``
  again and re-registers every live link; each link switches back to the
  daemon when its ``Registered`` arrives.
* A client connects when something first needs it (``start_nowait``): the
  facade's links are lazy (``RemoteBreaker.open(lazy=True)``). Forks and
  exit are the registry's (``_globals``).
"""

from __future__ import annotations

import os
import random
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, Protocol

from breakerd.actor import BreakerConfig, library_logger
from breakerd.protocol import (
    MAX_SOCKET_PATH,
    DaemonUnavailableError,
    ProtocolError,
    Register,
    RequestMessage,
    Snapshot,
    Welcome,
)

from ._core import Action, ClientCore, Completion, NotConnectedError, Reply, ReportItem
from ._io_poller import BATON, IOPoller
from ._peer import trusted_uids as _trusted_uids
from ._peer import untrusted_peer
from ._table_reader import MappedStateTable, map_state_table

__all__ = ["FLUSH_DELAY", "DaemonClient", "LinkEvents", "check_socket_path"]

#: How long a fire-and-forget report may wait before its batch is sent.
FLUSH_DELAY: Final = 0.002

_READ_SIZE: Final = 65536
#: While disconnected, how often the IO thread looks for a new socket file (see _nap).
_SOCKET_POLL: Final = 0.05
#: The first reconnect delay after the socket file changed (then doubling as usual).
_SOCKET_RETRY: Final = 0.01
#: How long a closing client (at exit) waits for the daemon to read its last
#: reports and close its side: a healthy daemon takes well under a millisecond.
_CLOSE_GRACE: Final = 0.25
#: Descriptors accepted with a welcome (the daemon sends one; more are closed).
_MAX_WELCOME_FDS: Final = 4

_logger = library_logger()


class LinkEvents(Protocol):
    """What a ``DaemonClient`` needs of a link attached to it (``_link.RemoteBreaker``).

    The client calls these from the thread reading the socket (or the one
    giving up on it), outside its lock.
    """

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> BreakerConfig: ...

    def registration(self, epoch: int) -> Reply:
        """The reply to this link's ``Register`` on connection ``epoch``."""
        ...

    def daemon_snapshot(self, snapshot: Snapshot) -> None:
        """The daemon's newest snapshot of this breaker (a reply or a push)."""
        ...

    def daemon_lost(self, *, announce: bool) -> None:
        """The connection is gone: the policy serves (``announce``: tell the listeners)."""
        ...

    def suspend(self) -> None:
        """The daemon stopped answering: the policy serves, the registration stays."""
        ...

    def resume(self) -> None:
        """The daemon answers again after ``suspend``."""
        ...


def check_socket_path(path: str | Path) -> str:
    """The socket path as a string, or ``ValueError`` saying why it cannot be one."""
    text = os.fspath(path)
    if not text:
        raise ValueError("daemon socket path is empty")
    if "\0" in text:
        raise ValueError(f"daemon socket path {text!r} contains a NUL byte")
    size = len(os.fsencode(text))
    if size > MAX_SOCKET_PATH:
        raise ValueError(
            f"daemon socket path {text!r} is {size} bytes long; a Unix socket path "
            f"holds at most {MAX_SOCKET_PATH} (use a shorter directory)"
        )
    return text


class DaemonClient:
    """One process's connection to one daemon, with its IO thread.

    Use ``get_client(path)``, which shares one client per process and socket.

    Args:
        path: The daemon's Unix socket.
        request_timeout: A request unanswered this long means the daemon is
            hung: the connection is dropped and every pending request fails.
            Also bounds a blocked write.
        connect_timeout: Bound on ``connect()`` and on how long a new breaker
            waits for its registration before it starts in fallback mode.
        backoff_min, backoff_max: Reconnect delays (doubling, +-20% jitter).
        flush_delay: How long batched reports wait before they are sent
            (default: ``FLUSH_DELAY``, read when the client is made).
        trusted_uids: Uids the daemon may run as besides this process's own
            and root (``$BREAKERD_TRUSTED_UIDS`` adds more); a daemon running
            as anyone else is treated as unavailable.
    """

    # Slots, as for RemoteBreaker: every daemon-mode call reads flush_armed.
    __slots__ = (
        "__weakref__",
        "_awaiting_welcome",
        "_break_reason",
        "_closing",
        "_first_attempt",
        "_had_welcome",
        "_io_ident",
        "_links",
        "_lock",
        "_log",
        "_poller",
        "_read_poll",
        "_reader_ident",
        "_sock",
        "_socket_seen",
        "_start_lock",
        "_started",
        "_table_fd",
        "_thread",
        "_wake_r",
        "_wake_w",
        "attempts",
        "backoff_max",
        "backoff_min",
        "connect_timeout",
        "core",
        "epoch",
        "flush_armed",
        "flush_delay",
        "on_close",
        "outage",
        "path",
        "pid",
        "request_timeout",
        "stalled",
        "state_table",
        "trusted_uids",
        "welcome",
    )

    def __init__(
        self,
        path: str | Path,
        *,
        request_timeout: float = 5.0,
        connect_timeout: float = 1.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        flush_delay: float | None = None,
        trusted_uids: Iterable[int] = (),
    ) -> None:
        self.path = check_socket_path(path)
        #: Uids the daemon may run as (SO_PEERCRED is checked on every connection).
        self.trusted_uids = _trusted_uids(trusted_uids)
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0, got {connect_timeout!r}")
        if not 0 < backoff_min <= backoff_max:
            raise ValueError(
                f"need 0 < backoff_min <= backoff_max, got {backoff_min!r}, {backoff_max!r}"
            )
        if flush_delay is None:
            flush_delay = FLUSH_DELAY
        if flush_delay < 0:
            raise ValueError(f"flush_delay must be >= 0, got {flush_delay!r}")
        self.pid = os.getpid()
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.flush_delay = flush_delay
        self.core = ClientCore(
            socket_path=self.path,
            client=_client_name(),
            pid=self.pid,
            request_timeout=request_timeout,
        )
        #: The daemon's Welcome on the current connection, once received.
        self.welcome: Welcome | None = None
        #: The daemon's state table, mapped read-only (None: not offered, or not connected).
        self.state_table: MappedStateTable | None = None
        # Until the welcome is in, reads pick up the table's descriptor.
        self._awaiting_welcome = False
        self._table_fd: int | None = None
        #: Connections established so far (each one re-registers every link).
        self.epoch = 0
        #: Why the daemon is out of reach, while it is (None when connected or never tried).
        self.outage: str | None = None
        #: Connection attempts made so far, failed or not.
        self.attempts = 0
        # Guards the core, the socket's writing side and the link registry.
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        # The reader baton (see the module docstring): the id of the thread
        # reading the socket (the IO thread or a caller), or None. Taken under
        # _lock, given back by a plain store.
        self._reader_ident: int | None = None
        # The IO thread's id once it runs (Thread.ident is a property call).
        self._io_ident: int | None = None
        # The IO thread's wait set (made by the IO thread) and, per
        # connection, the poll object a caller holding the baton waits on.
        self._poller: IOPoller | None = None
        self._read_poll: select.poll | None = None
        self._break_reason: str | None = None
        self._links: dict[str, weakref.WeakSet[LinkEvents]] = {}
        #: Set by posters (``arm_flush``), cleared by the IO thread; see post() for
        #: the race. A plain slot: the hot path reads it on every success.
        self.flush_armed = False
        #: Called with this client once it is closed (the registry forgets it).
        self.on_close: Callable[[DaemonClient], None] | None = None
        self._had_welcome = False
        self._closing = False
        self._first_attempt = threading.Event()
        self._start_lock = threading.Lock()
        self._started = False
        #: A caller gave up waiting for this connection (``daemon_timeout``):
        #: requests go to each link's policy until the daemon is heard from again.
        self.stalled = False
        # What the socket file looked like at the last failed attempt (see _nap).
        self._socket_seen: tuple[int, int, int] | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(
            target=self._run, name=f"breakerd-client {self.path}", daemon=True
        )
        self._log = _logger.bind(socket=self.path)

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "disconnected"
        return f"<DaemonClient {self.path!r} {state} epoch={self.epoch}>"

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> DaemonClient:
        """Start the IO thread unless it runs; returns after its first connect attempt (bounded)."""
        self.start_nowait()
        self._first_attempt.wait(self.connect_timeout + 1.0)
        return self

    def start_nowait(self) -> None:
        """Start the IO thread (which connects) unless it was started or the client closed."""
        if self._started:
            return
        with self._start_lock:
            if self._started or self._closing:
                return
            self._started = True
            self._thread.start()

    @property
    def started(self) -> bool:
        return self._started

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait for the IO thread's first connection attempt; False if not made in time."""
        return self._first_attempt.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def closed(self) -> bool:
        return self._closing

    def in_io_thread(self) -> bool:
        """True in the IO thread, and in a caller's thread while it reads (and runs callbacks)."""
        ident = threading.get_ident()
        return ident == self._io_ident or ident == self._reader_ident

    def close(self, timeout: float = 1.0) -> None:
        """Flush queued reports, close the connection, stop the IO thread.

        Pending requests fail (and are answered by each link's policy).
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._sock is not None:
                self._flush_locked()
        with self._start_lock:
            never_started = not self._started
            self._started = True  # never starts now
        if never_started:
            # Its IO thread would have closed the wake-up pipe.
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._closed()
            return
        self._wake()
        if self._thread.is_alive() and not self.in_io_thread():
            self._thread.join(timeout)
        self._closed()

    def _closed(self) -> None:
        on_close = self.on_close
        if on_close is not None:
            on_close(self)

    def flush(self) -> None:
        """Send every queued report now (the IO thread does this on its own within ms)."""
        with self._lock:
            self._flush_locked()

    def abandon_in_child(self) -> None:
        """In a forked child: let go of the parent's connection without touching it."""
        # In a forked child: the IO thread does not exist here and the socket is
        # the parent's. Close our copies of the descriptors (the parent's
        # connection lives on) without touching a lock a parent thread may hold.
        self._closing = True
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.close()
        table_fd, self._table_fd = self._table_fd, None
        for fd in (self._wake_r, self._wake_w) + ((table_fd,) if table_fd is not None else ()):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- links -------------------------------------------------------------------

    def attach(self, link: LinkEvents) -> bool:
        """Track ``link`` (re-registered on every reconnect) and register it now if connected.

        Returns True if a ``Register`` is on its way (its reply settles the link).
        """
        with self._lock:
            self._links.setdefault(link.name, weakref.WeakSet()).add(link)
            if self._sock is None:
                return False
            self._send_request_locked(
                Register(link.name, link.config.as_dict()), link.registration(self.epoch)
            )
            return True

    def detach(self, link: LinkEvents) -> None:
        with self._lock:
            links = self._links.get(link.name)
            if links is not None:
                links.discard(link)

    def _all_links(self) -> list[LinkEvents]:
        with self._lock:
            return [link for links in self._links.values() for link in links]

    def _links_named(self, name: str) -> list[LinkEvents]:
        with self._lock:
            links = self._links.get(name)
            return list(links) if links is not None else []

    # -- any thread: requests and reports ----------------------------------------------

    def request(
        self,
        message: RequestMessage,
        reply: Reply,
        *,
        read: bool = False,
        read_timeout: float | None = None,
    ) -> bool:
        """Send a request; ``reply`` will be called exactly once, by the thread reading.

        That is the IO thread, or a caller that sent with ``read``: if no
        other thread is reading, this thread reads the socket until the reply
        is in (see the module docstring), running on the way whatever else
        comes in -- other callers' replies, state pushes -- outside ``_lock``,
        as the IO thread would. It stops at the reply, at the request's
        deadline (the IO thread times the request out, within a quarter of
        ``request_timeout``) and when the connection breaks (the IO thread
        takes over and fails the request); the caller then waits for
        ``reply`` as usual. ``read_timeout`` stops the reading sooner (a
        caller that will not wait longer than that).

        Returns False, without calling ``reply``, when there is no connection.
        """
        if read and BATON:
            return self._request_reading(message, reply, read_timeout)
        with self._lock:
            if self._sock is None:
                return False
            return self._send_request_locked(message, reply) != 0

    def _request_reading(
        self, message: RequestMessage, reply: Reply, read_timeout: float | None
    ) -> bool:
        me = threading.get_ident()
        if me == self._reader_ident or me == self._io_ident:
            # Called back while reading for others: it would wait for itself.
            raise RuntimeError("a breaker cannot wait for a reply in the thread that reads them")
        poller = self._poller
        took = False
        fd = -1
        try:
            with self._lock:
                sock = self._sock
                if sock is None:
                    return False
                if self._reader_ident is None and poller is not None and self._break_reason is None:
                    fd = sock.fileno()
                    # Two plain stores, nothing between them that an interrupt
                    # can stop at: the finally gives back exactly what we took.
                    self._reader_ident = me
                    took = True
                    # Before the request leaves: its reply must not wake the IO thread.
                    poller.disarm(fd)
                msgid = self._send_request_locked(message, reply)
                read_poll = self._read_poll
            if not took or not msgid or read_poll is None:
                return msgid != 0
            # Holding the baton: nobody else reads, and the socket cannot be
            # closed under us (that takes the baton).
            is_pending = self.core.is_pending
            timeout = self.request_timeout
            if read_timeout is not None and read_timeout < timeout:
                timeout = read_timeout
            deadline = time.monotonic() + timeout
            while is_pending(msgid) and self._break_reason is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break  # the IO thread's timeout check fails it
                if not read_poll.poll(int(remaining * 1000) + 1):
                    continue
                reason = self._read_socket(fd)
                if reason is not None:
                    with self._lock:
                        self._break_locked(reason)
                    break
            return True
        finally:
            if took:
                self._reader_ident = None
                # Given back first, re-armed second, by every holder: the IO
                # thread, woken for data while we held the baton, left its
                # entry off; the re-arm wakes it if anything is left, and then
                # it finds the baton free (or held by a reader who re-arms in
                # turn). Nothing readable is left unwatched.
                assert poller is not None
                poller.arm(fd)

    def _send_request_locked(self, message: RequestMessage, reply: Reply) -> int:
        # The request's msgid, or 0 if it was not sent (``reply`` unused).
        sock = self._sock
        assert sock is not None
        try:
            msgid, data = self.core.send_request(message, reply, time.monotonic())
        except NotConnectedError:
            return 0
        except ProtocolError as exc:
            # Our own encoding failed: a bug, but the connection is unusable either way.
            self._log.error("daemon_request_unsendable", error=str(exc))
            self._break_locked(self.core.failure or str(exc))
            return 0
        # From here the reply is in the pending table: a failed write breaks
        # the connection and the IO thread fails the request with the others.
        self._write_locked(sock, data)
        return msgid

    def _read_socket(self, fd: int) -> str | None:
        """Holding the baton: one read, fed to the core, and what it returns run.

        Returns why the connection must be dropped, or None.
        """
        actions: list[Action] | None = None
        try:
            try:
                if self._awaiting_welcome:
                    data = self._read_with_descriptors()
                else:
                    data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return None
            except OSError as exc:
                return self._break_reason or f"read failed: {exc.strerror or exc!r}"
            if not data:
                return self._break_reason or "the daemon closed the connection"
            if self.stalled:
                self._unstall()
            with self._lock:
                actions = self.core.receive_data(data)
                failure = self.core.failure
        except BaseException:
            # Interrupted (a reader in the main thread): bytes may have been
            # read and not fed, or fed halfway. The stream cannot be trusted:
            # drop it. The IO thread fails what is pending and delivers what
            # the core decoded but did not hand over.
            with self._lock:
                self._break_locked("interrupted while reading from the daemon")
            if actions is not None:
                self._dispatch(actions)  # interrupted on the way out of the lock
            raise
        self._dispatch(actions)
        if failure is not None:
            if self._break_reason is None:
                self._log.error("daemon_protocol_error", error=failure)
            return failure
        return None

    def _read_with_descriptors(self) -> bytes:
        # Holding the baton: the socket stays open. A plain read would drop
        # (close) a descriptor that came with the bytes it read.
        sock = self._sock
        assert sock is not None
        data, fds, _, _ = socket.recv_fds(
            sock, _READ_SIZE, _MAX_WELCOME_FDS, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
        )
        for received in fds:
            if self._table_fd is None:
                self._table_fd = received
            else:
                os.close(received)
        return data

    def post(self, item: ReportItem) -> bool:
        """Queue a fire-and-forget outcome (no lock). False: the queue is full, send a request."""
        if not self.core.post(item):
            return False
        # Append first, check the flag second; the IO thread clears the flag
        # first and drains second. So either it drains this item, or we see
        # the flag down and wake it: an item is never left without a flush.
        if not self.flush_armed:
            self.arm_flush()
        return True

    def post_rejection(self, name: str) -> None:
        """Count one local rejection of ``name`` for the daemon's status (no lock)."""
        if self.core.post_rejection(name) and not self.flush_armed:
            self.arm_flush()

    def arm_flush(self) -> None:
        """Have the IO thread send what is queued within ``flush_delay`` (no lock).

        Posters call it after queueing, when ``flush_armed`` is down (see
        ``post`` for why that order never strands an item).
        """
        self.flush_armed = True
        self._wake()

    def _flush_locked(self) -> None:
        sock = self._sock
        try:
            data = self.core.take_batch()
        except ProtocolError as exc:
            self._log.error("daemon_reports_unsendable", error=str(exc))
            self._break_locked(self.core.failure or str(exc))
            return
        if data and sock is not None:
            self._write_locked(sock, data)

    def _write_locked(self, sock: socket.socket, data: bytes) -> None:
        try:
            # One write(2) on the non-blocking descriptor first: sendall() on a
            # socket with a timeout polls before every send, a system call
            # that is nearly always wasted. It finishes what is left.
            try:
                sent = os.write(sock.fileno(), data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:])
        except OSError as exc:
            self._break_locked(f"write failed: {exc.strerror or exc!r}")

    def _break_locked(self, reason: str) -> None:
        # Hand the socket over to the IO thread: shutdown() wakes its poll with
        # an EOF, and it alone closes the descriptor (closing it here could let
        # the number be reused under its poll).
        if self._break_reason is None:
            self._break_reason = reason
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    # -- the IO thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._io_ident = threading.get_ident()
        backoff = self.backoff_min
        try:
            self._poller = IOPoller(self._wake_r)
            while not self._closing:
                if self._sock is None:
                    self._socket_seen = _socket_identity(self.path)
                    connected = self._connect()
                    self._first_attempt.set()
                    if not connected:
                        if self._nap(backoff * random.uniform(0.8, 1.2)):
                            # A new socket: a new daemon, maybe not listening
                            # yet (it binds, then listens): retry soon.
                            backoff = _SOCKET_RETRY
                        else:
                            backoff = min(backoff * 2, self.backoff_max)
                        continue
                connected_at = time.monotonic()
                self._pump()
                if self._had_welcome:
                    # A working connection dropped: try again at once.
                    backoff = self.backoff_min
                elif time.monotonic() - connected_at >= self.request_timeout:
                    # Unanswered for request_timeout: a hung daemon, which
                    # queues connections in its listen backlog. Queue the
                    # next one at once, so that it is answered the moment the
                    # daemon runs again, not a backoff later. Each try costs
                    # request_timeout: no tight loop.
                    continue
                elif not self._closing:
                    # Dropped before the handshake (a hung daemon, a refused
                    # peer): back off, or it would be a tight loop.
                    if self._nap(backoff * random.uniform(0.8, 1.2)):
                        backoff = _SOCKET_RETRY
                    else:
                        backoff = min(backoff * 2, self.backoff_max)
        except BaseException:  # pragma: no cover - a bug here must not go silent
            self._log.exception("daemon_client_crashed")
            raise
        finally:
            self._first_attempt.set()
            poller, self._poller = self._poller, None
            if poller is not None:
                poller.close()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

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
        end = time.monotonic() + seconds
        while not self._closing:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            self._sleep(min(remaining, _SOCKET_POLL))
            if _socket_identity(self.path) != self._socket_seen:
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

    def _connect(self) -> bool:
        self.attempts += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self._note_outage(f"cannot connect ({exc.strerror or exc!r})")
            return False
        untrusted = untrusted_peer(sock, self.trusted_uids)
        if untrusted is not None:
            # Someone else's socket at our path: its answers could steer every breaker.
            sock.close()
            self._note_outage(untrusted)
            return False
        # Bounds a write to a daemon that stopped reading; reads only happen
        # after poll() says there is data, so they never wait on it.
        sock.settimeout(self.request_timeout)
        with self._lock:
            # Listed under the lock that attach() takes: a link is either in
            # this list or sees the socket and registers itself, never neither.
            links = [link for named in self._links.values() for link in named]
            if self._closing:
                sock.close()
                return False
            self.epoch += 1
            self.stalled = False
            self.welcome = None
            self.state_table = None
            self._awaiting_welcome = True
            self._had_welcome = False
            self._break_reason = None
            assert self._poller is not None
            self._poller.add(sock.fileno())
            read_poll = select.poll()
            read_poll.register(sock.fileno(), select.POLLIN)
            self._read_poll = read_poll
            self._sock = sock
            now = time.monotonic()
            data = [self.core.connect(self._welcomed(self.epoch), now)]
            # Pipelined behind hello: the daemon answers them in order.
            for link in links:
                data.append(
                    self.core.request(
                        Register(link.name, link.config.as_dict()),
                        link.registration(self.epoch),
                        now,
                        flush=False,
                    )
                )
            self._write_locked(sock, b"".join(data))
        return True

    def _welcomed(self, epoch: int) -> Reply:
        def on_welcome(result: Any, error: BaseException | None) -> None:
            if epoch != self.epoch or isinstance(error, DaemonUnavailableError):
                return  # the connection died first; connection_lost said why
            self._awaiting_welcome = False
            table_fd, self._table_fd = self._table_fd, None
            if isinstance(result, Welcome) and result.state_table and table_fd is not None:
                self.state_table = map_state_table(table_fd, result.state_table, self._log)
            elif table_fd is not None:
                os.close(table_fd)
            if error is not None or not isinstance(result, Welcome):
                self._log.error("daemon_handshake_failed", error=str(error or result))
                with self._lock:
                    self._break_locked(f"handshake refused: {error or result}")
                return
            self.welcome = result
            self._had_welcome = True
            fields: dict[str, Any] = {
                "server": result.server,
                "daemon_pid": result.pid,
                "version": result.version,
            }
            if self.outage is not None:
                self._log.info("daemon_reconnected", after=self.outage, **fields)
                self.outage = None
            else:
                self._log.debug("daemon_connected", **fields)

        return on_welcome

    def _pump(self) -> None:
        """Serve one connection until it is lost or the client closes."""
        sock = self._sock
        poller = self._poller
        assert sock is not None
        assert poller is not None
        fd = sock.fileno()
        wake_r = self._wake_r
        me = threading.get_ident()
        flush_at: float | None = None
        close_by: float | None = None
        while True:
            now = time.monotonic()
            # Callers do not wake this thread when they send a request (that
            # would cost every request a syscall), so it looks at the pending
            # table on a tick: a hung daemon is noticed within 1.25 timeouts.
            deadline = now + self.request_timeout / 4
            if self._break_reason is None:
                if flush_at is None and self.flush_armed:
                    flush_at = now + self.flush_delay
                with self._lock:
                    pending = self.core.next_deadline()
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
                with self._lock:
                    if self._reader_ident is not None:
                        continue  # a caller is reading: it re-arms the entry when it lets go
                    self._reader_ident = me
                try:
                    reason = self._break_reason or self._read_socket(fd)
                    if reason is not None:
                        self._lost(sock, reason)
                        return
                finally:
                    self._reader_ident = None
                poller.arm(fd)
            if not socket_ready and self._reader_ident is None:
                # Woken for something else with nobody reading: re-arm anyway,
                # so a re-arm that a reader missed (interrupted in its
                # finally) costs at most one wake-up, never the connection.
                poller.arm(fd)
            if self._break_reason is None:
                now = time.monotonic()
                if flush_at is not None and now >= flush_at:
                    flush_at = None
                    # Down before draining: see post().
                    self.flush_armed = False
                    with self._lock:
                        self._flush_locked()
                        timed_out = self.core.timed_out(now)
                else:
                    with self._lock:
                        timed_out = self.core.timed_out(now)
                if timed_out:
                    self._log.warning("daemon_request_timeout", timeout=self.request_timeout)
                    with self._lock:
                        self._break_locked(f"no reply within {self.request_timeout:g}s")
            if self._closing and self._break_reason is None:
                # A graceful close: our last reports, then end of file; the
                # daemon reads both and closes its side, which ends this
                # loop. Closing at once could lose them: a daemon that writes
                # to a closed peer (a push) drops the connection, and with it
                # whatever it had not read yet.
                if close_by is None:
                    close_by = time.monotonic() + _CLOSE_GRACE
                    with self._lock:
                        try:
                            sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            close_by = 0.0  # already broken: nothing to wait for
                if time.monotonic() >= close_by:
                    with self._lock:
                        self._break_locked("the client was closed")
            if self._break_reason is not None:
                with self._lock:
                    free = self._reader_ident is None
                    if free:
                        self._reader_ident = me
                if free:
                    # Nobody is reading: drop it now. Otherwise shutdown() has
                    # ended the reader's wait, and its re-arm wakes us when it
                    # lets go.
                    try:
                        self._lost(sock, self._break_reason)
                        return
                    finally:
                        self._reader_ident = None

    def _lost(self, sock: socket.socket, reason: str) -> None:
        # Called holding the baton: no other thread reads this socket or will.
        with self._lock:
            self._sock = None
            self._read_poll = None
            self.welcome = None
            self.state_table = None
            self._awaiting_welcome = False
            if self._table_fd is not None:
                os.close(self._table_fd)
                self._table_fd = None
            actions = self.core.connection_lost(reason)
        if self._poller is not None:
            self._poller.remove(sock.fileno())
        try:
            sock.close()
        except OSError:
            pass
        if not self._closing:
            self._note_outage(reason)
        # Links first: a request failed below is re-answered by its link's
        # policy, which must already see the daemon as gone.
        for link in self._all_links():
            link.daemon_lost(announce=not self._closing)
        self._dispatch(actions)

    def note_stalled(self, waited: float) -> None:
        """A caller waited ``waited`` seconds for a reply in vain: requests go to the policies.

        Until the daemon is heard from again (any bytes read), or the
        connection is replaced: at ``request_timeout`` the IO thread drops it.
        """
        if self.stalled:
            return
        self.stalled = True
        self._log.warning(
            "daemon_not_answering",
            waited=waited,
            fallback="each breaker's on_unavailable policy until it answers",
        )
        for link in self._all_links():
            link.suspend()

    def _unstall(self) -> None:
        # In the thread reading: bytes came in, so the daemon runs again.
        self.stalled = False
        self._log.info("daemon_answering_again")
        for link in self._all_links():
            link.resume()

    def _note_outage(self, reason: str) -> None:
        if self.outage is None:
            # Once per outage, not once per reconnect attempt.
            self._log.warning(
                "daemon_unavailable",
                reason=reason,
                fallback="each breaker's on_unavailable policy; reconnecting in the background",
            )
        self.outage = reason

    def _dispatch(self, actions: list[Action]) -> None:
        for index, action in enumerate(actions):
            try:
                self._run_action(action)
            except Exception:
                self._log.exception("daemon_callback_failed")
            except BaseException:
                # Interrupted (a reader in the main thread): the other actions
                # are other callers' replies. Run this one again -- the
                # interrupt may have come before it started, and replies are
                # idempotent -- and the rest, then let the interrupt go on.
                try:
                    self._run_action(action)
                except BaseException:
                    self._log.exception("daemon_callback_failed")
                self._dispatch(actions[index + 1 :])
                raise

    def _run_action(self, action: Action) -> None:
        if isinstance(action, Completion):
            action.run()
        else:
            for link in self._links_named(action.snapshot.name):
                link.daemon_snapshot(action.snapshot)


def _socket_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _client_name() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"breakerd.clients ({program})"
