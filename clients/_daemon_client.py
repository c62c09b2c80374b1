"""The daemon transport: one connection per process and socket, with its IO thread.

``DaemonClient`` owns one process's connection to one daemon through its
life: connecting and the handshake, writing requests and report batches,
losing it, stalls and outages, and the links to re-register on the next one.
It moves bytes between the socket and a ``ClientCore`` (``_core``), which
holds every protocol decision; who reads the socket is the reader baton's
(``_reader``). Each breaker's link (``_link.RemoteBreaker``) attaches to it; the
client calls back on its links only through the small surface
``_links.LinkEvents`` names (registered, a snapshot, lost, stalled, answering
again). One connection's socket is a ``_daemon_socket.DaemonSocket``.
The per-process registry of clients (``get_client``, exit and fork hooks)
is in ``_globals`` (process-wide state); the IO thread's schedule (connecting,
waiting, flushing, timing out, reconnecting) is ``_io_thread``.

Threads and locks
-----------------
One background IO thread per ``DaemonClient`` reads the socket, runs reply
callbacks and state pushes, flushes batched reports, times out requests, and
reconnects with backoff. Writers take ``DaemonClient._lock`` (which also
guards the core) and write to the socket themselves: a request costs the
caller one ``write``, instead of two hops through a writer thread. Reply
callbacks and transition listeners run *outside* the lock.

Reading is the reader baton's (``_reader.ReaderBaton``): whoever holds it
-- the IO thread, or a sync caller reading its own reply -- reads the socket
and hands the bytes to ``feed``, which gives them to the core and runs what
it returns outside the lock. The baton is taken under ``_lock`` too (see
``_reader`` for why), so the connection's three parts are: this module
writes and replaces it, the baton reads it, the core keeps the books.

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
* The IO thread reconnects (``_io_thread``), says ``hello`` again and
  re-registers every live link; each link switches back to the daemon when
  its ``Registered`` arrives.
* A client connects when something first needs it (``start_nowait``): the
  facade's links are lazy (``RemoteBreaker.open(lazy=True)``). Forks and
  exit are the registry's (``_globals``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from breakerd.actor import library_logger
from breakerd.protocol import (
    DaemonUnavailableError,
    ProtocolError,
    Register,
    RequestMessage,
    Welcome,
)

from ._core import Action, ClientCore, NotConnectedError, Reply, ReportItem
from ._daemon_socket import DaemonSocket, check_socket_path
from ._io_poller import BATON
from ._io_thread import IOThread
from ._links import LinkEvents, LinkSet, run_actions
from ._peer import trusted_uids as _trusted_uids
from ._reader import ReaderBaton
from ._table_reader import MappedStateTable, map_state_table

__all__ = ["FLUSH_DELAY", "DaemonClient"]

#: How long a fire-and-forget report may wait before its batch is sent.
FLUSH_DELAY: Final = 0.002

_logger = library_logger()


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
        "_baton",
        "_closing",
        "_conn",
        "_had_welcome",
        "_io",
        "_links",
        "_lock",
        "_log",
        "_start_lock",
        "_started",
        "_thread",
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
        #: Connections established so far (each one re-registers every link).
        self.epoch = 0
        #: Why the daemon is out of reach, while it is (None when connected or never tried).
        self.outage: str | None = None
        #: Connection attempts made so far, failed or not.
        self.attempts = 0
        # Guards the core, the socket's writing side and the link registry.
        self._lock = threading.Lock()
        # The current connection (None while there is none).
        self._conn: DaemonSocket | None = None
        self._links = LinkSet(self._lock)
        #: Set by posters (``arm_flush``), cleared by the IO thread; see post() for
        #: the race. A plain slot: the hot path reads it on every success.
        self.flush_armed = False
        #: Called with this client once it is closed (the registry forgets it).
        self.on_close: Callable[[DaemonClient], None] | None = None
        self._had_welcome = False
        self._closing = False
        self._start_lock = threading.Lock()
        self._started = False
        #: A caller gave up waiting for this connection (``daemon_timeout``):
        #: requests go to each link's policy until the daemon is heard from again.
        self.stalled = False
        self._log = _logger.bind(socket=self.path)
        self._io = IOThread(self)
        # Who reads the socket (``_reader``); taken under _lock.
        self._baton = ReaderBaton(self, self._lock, self._io)
        # The thread itself, for tests and benchmarks that look at it.
        self._thread = self._io.thread

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "disconnected"
        return f"<DaemonClient {self.path!r} {state} epoch={self.epoch}>"

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> DaemonClient:
        """Start the IO thread unless it runs; returns after its first connect attempt (bounded)."""
        self.start_nowait()
        self._io.wait_first_attempt(self.connect_timeout + 1.0)
        return self

    def start_nowait(self) -> None:
        """Start the IO thread (which connects) unless it was started or the client closed."""
        if self._started:
            return
        with self._start_lock:
            if self._started or self._closing:
                return
            self._started = True
            self._io.start()

    @property
    def started(self) -> bool:
        return self._started

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait for the IO thread's first connection attempt; False if not made in time."""
        return self._io.wait_first_attempt(timeout)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def connection(self) -> DaemonSocket | None:
        """The current connection's socket (None while there is none)."""
        return self._conn

    @property
    def closed(self) -> bool:
        return self._closing

    def in_io_thread(self) -> bool:
        """True in the IO thread, and in a caller's thread while it reads (and runs callbacks)."""
        ident = threading.get_ident()
        return ident == self._io.ident or ident == self._baton.holder

    def close(self, timeout: float = 1.0) -> None:
        """Flush queued reports, close the connection, stop the IO thread.

        Pending requests fail (and are answered by each link's policy).
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._conn is not None:
                self._flush_locked()
        with self._start_lock:
            never_started = not self._started
            self._started = True  # never starts now
        if never_started:
            self._io.close_unstarted()
            self._closed()
            return
        self._io.wake()
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
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._io.abandon()

    # -- links -------------------------------------------------------------------

    def attach(self, link: LinkEvents) -> bool:
        """Track ``link`` (re-registered on every reconnect) and register it now if connected.

        Returns True if a ``Register`` is on its way (its reply settles the link).
        """
        with self._lock:
            self._links.add_locked(link)
            if self._conn is None:
                return False
            self.send_request_locked(
                Register(link.name, link.config.as_dict()), link.registration(self.epoch)
            )
            return True

    def detach(self, link: LinkEvents) -> None:
        self._links.discard(link)

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
            return self._baton.request_reading(message, reply, read_timeout)
        with self._lock:
            if self._conn is None:
                return False
            return self.send_request_locked(message, reply) != 0

    def send_request_locked(self, message: RequestMessage, reply: Reply) -> int:
        """Holding ``_lock``, connected: the request's msgid, or 0 if not sent.

        ``reply`` is unused when it was not sent.
        """
        conn = self._conn
        assert conn is not None
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
        self._write_locked(conn, data)
        return msgid

    def feed(self, data: bytes) -> str | None:
        """Holding the reader baton: bytes from the daemon fed to the core, what it returns run.

        Returns why the connection must be dropped, or None.
        """
        actions: list[Action] | None = None
        try:
            if self.stalled:
                self._unstall()
            with self._lock:
                actions = self.core.receive_data(data)
                failure = self.core.failure
        except BaseException:
            # Interrupted (a reader in the main thread): the bytes may have
            # been fed halfway. The stream cannot be trusted: drop it. The IO
            # thread fails what is pending and delivers what the core decoded
            # but did not hand over.
            with self._lock:
                self._break_locked("interrupted while reading from the daemon")
            if actions is not None:
                self._dispatch(actions)  # interrupted on the way out of the lock
            raise
        self._dispatch(actions)
        if failure is not None:
            # Holding the baton: the connection stays, and stays open.
            conn = self._conn
            assert conn is not None
            if conn.break_reason is None:
                self._log.error("daemon_protocol_error", error=failure)
            return failure
        return None

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
        self._io.wake()

    def _flush_locked(self) -> None:
        conn = self._conn
        try:
            data = self.core.take_batch()
        except ProtocolError as exc:
            self._log.error("daemon_reports_unsendable", error=str(exc))
            self._break_locked(self.core.failure or str(exc))
            return
        if data and conn is not None:
            self._write_locked(conn, data)

    def _write_locked(self, conn: DaemonSocket, data: bytes) -> None:
        failure = conn.write(data)
        if failure is not None:
            self._break_locked(failure)

    def _break_locked(self, reason: str) -> None:
        # Hand the connection over to the IO thread: shutdown() wakes its poll
        # with an EOF, and it alone closes the descriptor, holding the baton.
        conn = self._conn
        if conn is not None:
            conn.shut(reason)

    # -- for the IO thread (_io_thread) --------------------------------------------------

    def connect(self) -> int | None:
        """One connection attempt: the new socket's descriptor, or None (the outage noted)."""
        self.attempts += 1
        conn = DaemonSocket.open(
            self.path,
            connect_timeout=self.connect_timeout,
            request_timeout=self.request_timeout,
            trusted_uids=self.trusted_uids,
        )
        if isinstance(conn, str):
            self._note_outage(conn)
            return None
        with self._lock:
            # Listed under the lock that attach() takes: a link is either in
            # this list or sees the socket and registers itself, never neither.
            links = self._links.listed_locked()
            if self._closing:
                conn.close()
                return None
            self.epoch += 1
            self.stalled = False
            self.welcome = None
            self.state_table = None
            self._had_welcome = False
            poller = self._io.poller
            assert poller is not None
            poller.add(conn.fd)
            self._conn = conn
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
            self._write_locked(conn, b"".join(data))
        return conn.fd

    def _welcomed(self, epoch: int) -> Reply:
        def on_welcome(result: Any, error: BaseException | None) -> None:
            if epoch != self.epoch or isinstance(error, DaemonUnavailableError):
                return  # the connection died first; connection_lost said why
            conn = self._conn
            assert conn is not None  # read in this thread, holding the baton
            table_fd = conn.take_table_fd()
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

    @property
    def had_welcome(self) -> bool:
        """The current (or last) connection got through its handshake."""
        return self._had_welcome

    @property
    def breaking(self) -> bool:
        """The connection is being dropped: the IO thread waits only for a reader to let go."""
        conn = self._conn
        return conn is not None and conn.break_reason is not None

    @property
    def reader_free(self) -> bool:
        return self._baton.free

    def next_deadline(self) -> float | None:
        """When the oldest pending request times out (None: nothing pending)."""
        with self._lock:
            return self.core.next_deadline()

    def serve_readable(self, fd: int) -> bool:
        """The socket is readable: read it unless a caller holds the baton (``_reader``).

        False once the connection is gone (dropped here).
        """
        return self._baton.serve_readable(fd)

    def send_due(self, now: float, *, flush: bool) -> None:
        """Send the queued reports (``flush``); drop the connection if a request timed out."""
        if flush:
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

    def finish_writing(self) -> bool:
        """End of file after the last reports (a graceful close); False if already broken."""
        with self._lock:
            conn = self._conn
            return conn is not None and conn.end_writing()

    def drop(self, reason: str) -> None:
        """Drop the connection (``reason`` goes to every request still pending)."""
        with self._lock:
            self._break_locked(reason)

    def drop_if_unread(self) -> bool:
        """Close a connection being dropped, unless a caller reads it; True if closed."""
        return self._baton.drop_if_unread()

    def log_crash(self) -> None:
        self._log.exception("daemon_client_crashed")

    def connection_lost(self, reason: str) -> None:
        """Holding the reader baton: close the connection; pending requests fail with ``reason``."""
        # No other thread reads this socket or will.
        with self._lock:
            conn = self._conn
            assert conn is not None
            self._conn = None
            self.welcome = None
            self.state_table = None
            actions = self.core.connection_lost(reason)
        poller = self._io.poller
        if poller is not None:
            poller.remove(conn.fd)
        conn.close()
        if not self._closing:
            self._note_outage(reason)
        # Links first: a request failed below is re-answered by its link's
        # policy, which must already see the daemon as gone.
        self._links.daemon_lost(announce=not self._closing)
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
        self._links.suspend()

    def _unstall(self) -> None:
        # In the thread reading: bytes came in, so the daemon runs again.
        self.stalled = False
        self._log.info("daemon_answering_again")
        self._links.resume()

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
        run_actions(actions, self._links, self._log)


def _client_name() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"breakerd.clients ({program})"
