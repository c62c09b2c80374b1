"""The IO shell of daemon mode: one connection per process and socket, one link per breaker.

``DaemonClient`` owns the Unix socket to one daemon for one process and moves
bytes between it and a ``ClientCore`` (``_core``), which holds every protocol
decision. ``RemoteBreaker`` is what a ``CircuitBreaker`` talks to in daemon
mode: it offers the duck-typed surface of ``BreakerActor`` (``snapshot``,
``listeners``, ``post_success``, ``post_report``, ``post_rejection``, ``ask``),
so the facade runs unchanged on top of it.

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

The hot path (a success while ``closed``, when the snapshot says no success
can change the state) takes no lock: it appends to its breaker's success
tally in the core (``list.append``, atomic under the GIL) and, only when no
flush is armed yet, writes one byte to the IO thread's wake-up pipe. The IO
thread then sends everything queued ``FLUSH_DELAY`` seconds later as one
``reports`` notification, whether or not the process makes another call; it
takes a tally whole (its length is the count), so its cost per batch does not
grow with the successes in it. While a success may change the state
(``Snapshot.successes_safe`` is false: the daemon says so through the state
table, a push or a reply) the link's tally key matches no generation, and the
facade sends the success as a request and waits for its answer.

Disconnects, forks and exit
---------------------------
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
  facade's links are lazy (``RemoteBreaker.open(lazy=True)``).
* After ``fork()`` the child forgets every client (closing its copies of
  their file descriptors, never touching the parent's connection); the
  facade's breakers are repointed so that the child's next call takes the
  slow path, which opens the child's own connection.
* At exit every client flushes its queued reports and closes its
  connection: atexit, and a multiprocessing finalizer for the children that
  end in ``os._exit()`` (``flush_all_clients`` for the rest).
* The registry of clients and these hooks are process-wide state: they live
  in ``_globals``, with the rest of the library's.

The state table
---------------
A daemon that can offer it sends a read-only descriptor of its state table
with the ``welcome`` (see ``breakerd.protocol.state_table``); the client
maps it, and each link gets its breaker's slot with ``Registered``. A link's
``snapshot`` then compares one word of shared memory (the slot's ``seq``)
with the last one it read, on every call, and rebuilds its snapshot from
the slot when it moved: a trip reaches every process on the host the moment
the daemon writes it, without waking any of them. Pushes still come (they
carry the failure rate and the rest, and drive ``on_transition``); a push
older than what the table already showed is ignored.

Generations
-----------
While the daemon is out of reach with ``on_unavailable="local"``, the link
shows the local breaker's snapshots with generations moved up by
``LOCAL_GENERATION_OFFSET``: an outcome carries the generation of the
snapshot that admitted it, so it goes back to the breaker that admitted it
even if the daemon came back meanwhile (a local trial lease must return to
the local breaker, a daemon lease must never reach it). ``allow`` admits with
generation -1, and those outcomes are not counted anywhere.
"""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
import random
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeAlias, cast

from breakerd.actor import (
    ActorSystem,
    BreakerActor,
    BreakerConfig,
    Transition,
    TransitionReason,
    default_system,
    library_logger,
)
from breakerd.protocol import (
    MAX_SOCKET_PATH,
    Acquire,
    ActorStoppedError,
    Admin,
    Admission,
    BreakerError,
    BreakerStatus,
    CircuitState,
    DaemonUnavailableError,
    Outcome,
    ProtocolError,
    Register,
    Registered,
    Report,
    RequestMessage,
    Snapshot,
    Status,
    StatusRequest,
    UnknownBreakerError,
    Welcome,
    state_table,
)

from ._core import Action, ClientCore, Completion, NotConnectedError, Reply, ReportItem
from ._globals import close_all_clients, flush_all_clients, forget_client, get_client
from ._peer import trusted_uids as _trusted_uids
from ._peer import untrusted_peer

__all__ = [
    "FLUSH_DELAY",
    "LOCAL_GENERATION_OFFSET",
    "ON_UNAVAILABLE",
    "ActorSurface",
    "DaemonClient",
    "OnUnavailable",
    "RemoteBreaker",
    "check_socket_path",
    "close_all_clients",
    "flush_all_clients",
    "get_client",
]

OnUnavailable: TypeAlias = Literal["local", "allow", "deny"]
ON_UNAVAILABLE: Final[frozenset[str]] = frozenset({"local", "allow", "deny"})

#: How long a fire-and-forget report may wait before its batch is sent.
FLUSH_DELAY: Final = 0.002
#: Generations of the local fallback breaker, as a link shows them.
LOCAL_GENERATION_OFFSET: Final = 1 << 48
#: The generation of the "allow" policy's admissions: counted nowhere.
_NO_GENERATION: Final = -1
#: A link's tally key while successes must be sent as requests: no permit has it.
_ASK_FOR_SUCCESSES: Final = -(1 << 62)

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
#: Callers read their own replies where the IO thread can be kept off the socket (epoll).
_BATON: Final = hasattr(select, "epoll")
#: What a link forwards to the daemon; anything else is answered by the policy.
_DAEMON_REQUESTS: Final[frozenset[type]] = frozenset({Acquire, Admin, Report, StatusRequest})
#: What a call waits on (at most daemon_timeout); admin and status wait for the daemon.
_CALL_REQUESTS: Final[frozenset[type]] = frozenset({Acquire, Report})
_SUCCESS: Final = Outcome.SUCCESS

_logger = library_logger()


class ActorSurface(Protocol):
    """What ``CircuitBreaker`` uses of its breaker: ``BreakerActor`` and ``RemoteBreaker``."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def listeners(self) -> list[Any]: ...

    def post_success(self, generation: int) -> bool: ...

    def post_report(self, item: tuple[int, Outcome, float]) -> bool: ...

    def post_rejection(self, count: int = 1) -> None: ...

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None: ...


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

    # Slots, as for RemoteBreaker: every daemon-mode call reads _flush_armed.
    __slots__ = (
        "__weakref__",
        "_awaiting_welcome",
        "_break_reason",
        "_closing",
        "_first_attempt",
        "_flush_armed",
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
        "flush_delay",
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
        self._poller: _IOPoller | None = None
        self._read_poll: select.poll | None = None
        self._break_reason: str | None = None
        self._links: dict[str, weakref.WeakSet[RemoteBreaker]] = {}
        # Set by posters, cleared by the IO thread; see post() for the race.
        self._flush_armed = False
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
            forget_client(self)
            return
        self._wake()
        if self._thread.is_alive() and not self.in_io_thread():
            self._thread.join(timeout)
        forget_client(self)

    def flush(self) -> None:
        """Send every queued report now (the IO thread does this on its own within ms)."""
        with self._lock:
            self._flush_locked()

    def after_fork_in_child(self) -> None:
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

    def attach(self, link: RemoteBreaker) -> bool:
        """Track ``link`` (re-registered on every reconnect) and register it now if connected.

        Returns True if a ``Register`` is on its way (its reply settles the link).
        """
        with self._lock:
            self._links.setdefault(link.name, weakref.WeakSet()).add(link)
            if self._sock is None:
                return False
            self._send_request_locked(
                Register(link.name, link.config.as_dict()), link._registered_reply(self.epoch)
            )
            return True

    def detach(self, link: RemoteBreaker) -> None:
        with self._lock:
            links = self._links.get(link.name)
            if links is not None:
                links.discard(link)

    def _all_links(self) -> list[RemoteBreaker]:
        with self._lock:
            return [link for links in self._links.values() for link in links]

    def _links_named(self, name: str) -> list[RemoteBreaker]:
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
        if read and _BATON:
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
            # closed under us (that takes the baton). The pending table is the
            # core's: `msgid in pending` is core.is_pending(msgid), inlined.
            pending = self.core._pending
            timeout = self.request_timeout
            if read_timeout is not None and read_timeout < timeout:
                timeout = read_timeout
            deadline = time.monotonic() + timeout
            while msgid in pending and self._break_reason is None:
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
        if not self._flush_armed:
            self._flush_armed = True
            self._wake()
        return True

    def post_rejection(self, name: str) -> None:
        """Count one local rejection of ``name`` for the daemon's status (no lock)."""
        if self.core.post_rejection(name) and not self._flush_armed:
            self._flush_armed = True
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
            self._poller = _IOPoller(self._wake_r)
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
                        link._registered_reply(self.epoch),
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
                self.state_table = self._map_state_table(table_fd, result.state_table)
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

    def _map_state_table(self, fd: int, slots: int) -> MappedStateTable | None:
        try:
            return MappedStateTable(fd, slots)
        except (OSError, ValueError) as exc:
            # Pushes alone still work: slower to spread a trip, never wrong.
            self._log.warning("state_table_unusable", error=str(exc))
            return None
        finally:
            os.close(fd)

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
                if flush_at is None and self._flush_armed:
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
                    self._flush_armed = False
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
            link._daemon_lost(announce=not self._closing)
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
            link._suspend()

    def _unstall(self) -> None:
        # In the thread reading: bytes came in, so the daemon runs again.
        self.stalled = False
        self._log.info("daemon_answering_again")
        for link in self._all_links():
            link._resume()

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
                link._daemon_snapshot(action.snapshot)


class _IOPoller:
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
        if _BATON:
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


# -- the per-process registry ----------------------------------------------------------

_clients: dict[str, DaemonClient] = {}
_clients_lock = threading.Lock()


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


def _socket_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _client_name() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"breakerd.clients ({program})"


# -- one breaker's link ------------------------------------------------------------------


class RemoteBreaker:
    """One breaker as seen through a ``DaemonClient``: the facade's actor in daemon mode.

    While registered on the live connection it shows the daemon's snapshot and
    sends outcomes there; otherwise it follows ``on_unavailable``:

    * ``"local"``: an in-process breaker with the same settings, from
      ``system`` (or the process-wide default system);
    * ``"allow"``: fail open, a ``closed`` snapshot and nothing recorded;
    * ``"deny"``: fail closed, every acquire answered with
      ``DaemonUnavailableError``.

    ``daemon_timeout`` (None: no bound but the client's ``request_timeout``)
    is how long a caller waits for the daemon's answer to an acquire or an
    acknowledged report -- through ``ask_sync``, or ``ask`` from a thread
    running an asyncio loop -- before the policy answers it instead; the
    client then sends every link's requests to its policy until the daemon
    is heard from again (``DaemonClient.note_stalled``).
    """

    # Slots: every call reads a few of these, and an instance dict with this
    # many keys stops sharing them, which makes each read a dict lookup
    # instead of a fixed offset (measured: about 40 ns more per daemon-mode
    # call once a thirtieth attribute was added).
    __slots__ = (
        "__weakref__",
        "_allow_snapshot",
        "_announce_lock",
        "_announced",
        "_deny_snapshot",
        "_live_words",
        "_local",
        "_local_lock",
        "_local_system",
        "_local_view",
        "_log",
        "_queue_limit",
        "_refused",
        "_register_error",
        "_rejected",
        "_remote",
        "_remote_snapshot",
        "_settled",
        "_slot_seq",
        "_slot_words",
        "_suspended",
        "_system",
        "_tally",
        "_unstarted",
        "client",
        "config",
        "conflicts",
        "daemon_timeout",
        "listeners",
        "name",
        "on_unavailable",
    )

    def __init__(
        self,
        client: DaemonClient,
        name: str,
        config: BreakerConfig,
        on_unavailable: OnUnavailable = "local",
        system: ActorSystem | None = None,
        *,
        daemon_timeout: float | None = None,
    ) -> None:
        if on_unavailable not in ON_UNAVAILABLE:
            raise ValueError(
                f"on_unavailable must be 'local', 'allow' or 'deny', not {on_unavailable!r}"
            )
        if daemon_timeout is not None and not daemon_timeout > 0:
            raise ValueError(f"daemon_timeout must be > 0 seconds, got {daemon_timeout!r}")
        self.daemon_timeout = daemon_timeout
        # A lazy link (see open) until its first use connects it.
        self._unstarted = False
        # The daemon refused to register it: every use raises this.
        self._refused: BaseException | None = None
        self.name = name
        self.config = config
        self.on_unavailable: OnUnavailable = on_unavailable
        self.client = client
        #: Called (in the IO thread, or the local breaker's thread) after every change of state.
        self.listeners: list[Any] = []
        #: Settings the daemon kept different from ours (its config file or an earlier client won).
        self.conflicts: tuple[str, ...] = ()
        self._system = system
        self._remote = False
        self._remote_snapshot = Snapshot(name, CircuitState.CLOSED, _NO_GENERATION)
        # The breaker's slot in the daemon's state table (None: no table), and
        # the slot's seq when _remote_snapshot last caught up with it.
        self._slot_words: memoryview | None = None
        # _slot_words while the daemon's breaker is in use, else None: the hot
        # path's one test (see _sync_live, called wherever either changes).
        self._live_words: memoryview | None = None
        self._slot_seq = -1
        self._local: BreakerActor | None = None
        self._local_system: ActorSystem | None = None
        self._local_view: tuple[Snapshot, Snapshot] | None = None
        self._local_lock = threading.Lock()
        self._allow_snapshot = Snapshot(name, CircuitState.CLOSED, _NO_GENERATION)
        self._deny_snapshot = Snapshot(name, CircuitState.OPEN, _NO_GENERATION)
        self._announce_lock = threading.Lock()
        self._announced: CircuitState | None = None
        # Registered on the live connection, but the daemon stopped answering
        # (DaemonClient.note_stalled): the policy serves until it answers.
        self._suspended = False
        self._settled = threading.Event()
        self._register_error: BaseException | None = None
        self._log = _logger.bind(breaker=name, socket=client.path)
        # The hot path: (key, tally). The key is the generation whose plain
        # successes go into the tally without waiting, or _ASK_FOR_SUCCESSES.
        # One attribute, read whole, so a thread never pairs one generation's
        # check with another's tally.
        self._tally: tuple[int, list[int]] = (_ASK_FOR_SUCCESSES, [])
        self._queue_limit = client.core.max_queued_reports
        self._rejected = client.core.rejection_tally(name)

    @classmethod
    def open(
        cls,
        path: str | Path,
        name: str,
        config: BreakerConfig,
        on_unavailable: OnUnavailable = "local",
        system: ActorSystem | None = None,
        *,
        client: DaemonClient | None = None,
        lazy: bool = False,
        daemon_timeout: float | None = None,
    ) -> RemoteBreaker:
        """Register ``name`` with the daemon at ``path`` and return its link.

        Waits at most the client's ``connect_timeout`` for the registration;
        a daemon that is not there (or slow) leaves the link in its
        ``on_unavailable`` mode, and it switches over once registered.
        Raises the daemon's error if it refuses the registration.

        With ``lazy`` it neither connects nor waits: the link is registered
        with the connection whenever there is one, and its first use (a
        snapshot, a request) starts the client if nobody has, then waits
        as above, at most ``daemon_timeout`` if set; a refused registration
        is raised by that use and every later one.
        """
        if client is None:
            client = get_client(path, start=not lazy)
        link = cls(client, name, config, on_unavailable, system, daemon_timeout=daemon_timeout)
        if lazy:
            link._unstarted = True
            client.attach(link)
            return link
        if client.attach(link):
            link._settled.wait(client.connect_timeout)
        error = link._register_error
        if error is not None:
            client.detach(link)
            raise error
        if not link._remote:
            link.snapshot  # noqa: B018 - build the fallback breaker now, not on the first call
        link._announced = link.snapshot.state
        return link

    def __repr__(self) -> str:
        if self._unstarted:
            return f"<RemoteBreaker {self.name!r} not connected yet>"
        mode = "daemon" if self._remote else self.on_unavailable
        return f"<RemoteBreaker {self.name!r} {mode} {self.snapshot.state.value}>"

    def ensure_started(self) -> None:
        """Connect a lazy link (see ``open``); raises the daemon's refusal if it refused."""
        if self._unstarted:
            self._begin()

    def _begin(self) -> None:
        if self._refused is not None:
            raise self._refused
        client = self.client
        client.start_nowait()
        if not self.in_own_thread():
            # Every thread that gets here first waits for the same events (at
            # most this long, once): none falls back while the others connect.
            limit = self.daemon_timeout or client.connect_timeout
            deadline = time.monotonic() + limit
            if client.wait_first_attempt(limit) and client.connected:
                self._settled.wait(max(0.0, deadline - time.monotonic()))
        error = self._register_error
        if error is not None:
            self._refused = error
            client.detach(self)
            raise error
        self._unstarted = False

    @property
    def remote(self) -> bool:
        """True while the daemon's breaker is in use (registered on the live connection)."""
        return self._remote

    @property
    def local_actor(self) -> BreakerActor | None:
        """The fallback breaker, once ``on_unavailable="local"`` has needed it."""
        return self._local

    def in_own_thread(self) -> bool:
        """True in a thread that must never wait for this link (it would wait for itself)."""
        if self.client.in_io_thread():
            return True
        system = self._local_system
        return system is not None and threading.get_ident() == system.loop_thread_id

    # -- the actor surface (any thread) -----------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        # The common case first, in as few loads as possible: the table's slot
        # has not moved since this link last caught up with it.
        words = self._live_words
        if words is not None and words[0] == self._slot_seq:
            return self._remote_snapshot
        return self._snapshot_slow()

    def _snapshot_slow(self) -> Snapshot:
        if self._remote:
            words = self._slot_words
            if words is not None and words[0] != self._slot_seq:
                return self._snapshot_from_table(words)
            return self._remote_snapshot
        return self._fallback_snapshot()

    def _sync_live(self) -> None:
        self._live_words = self._slot_words if self._remote else None

    def _snapshot_from_table(self, words: memoryview) -> Snapshot:
        # Any thread, no lock: racing threads build equal snapshots.
        current = self._remote_snapshot
        slot = state_table.read_slot(words)
        if slot is None:
            return current  # mid-write on every try (a daemon killed writing): keep ours
        seq, generation, state, open_until, successes_safe = slot
        if generation > current.generation:
            # The rates and counts come with the push that follows.
            current = Snapshot(
                self.name,
                state,
                generation,
                open_until,
                slow_call_duration=current.slow_call_duration,
                successes_safe=successes_safe,
            )
            self._show(current)
        elif generation == current.generation and successes_safe is not current.successes_safe:
            current = replace(current, successes_safe=successes_safe)
            self._show(current)
        self._slot_seq = seq
        return current

    def _show(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the daemon's state as this link shows it (any thread)."""
        self._remote_snapshot = snapshot
        generation = snapshot.generation
        if snapshot.successes_safe and snapshot.state is CircuitState.CLOSED and generation >= 0:
            tally = self._tally
            if tally[0] != generation:
                self._tally = (generation, self.client.core.success_tally(self.name, generation))
        else:
            self._tally = (_ASK_FOR_SUCCESSES, self._tally[1])

    def _fallback_snapshot(self) -> Snapshot:
        if self._unstarted:
            self._begin()
            if self._remote:
                return self.snapshot
        policy = self.on_unavailable
        if policy == "allow":
            return self._allow_snapshot
        if policy == "deny":
            return self._deny_snapshot
        return self._to_local_view(self._ensure_local().snapshot)

    def post_success(self, generation: int) -> bool:
        key, tally = self._tally
        if key == generation:
            if len(tally) >= self._queue_limit:
                return False
            tally.append(1)
            client = self.client
            if not client._flush_armed:
                client._flush_armed = True
                client._wake()
            return True
        return self._post_success_slow(generation)

    def _post_success_slow(self, generation: int) -> bool:
        if generation >= LOCAL_GENERATION_OFFSET:
            local = self._local
            if local is None:  # pragma: no cover - its snapshot made the generation
                return True
            return local.post_success(generation - LOCAL_GENERATION_OFFSET)
        if generation < 0 or not (self._remote or self._suspended):
            # Admitted by "allow", or by a daemon now out of reach: nowhere to count it.
            return True
        if self._remote and generation == self._remote_snapshot.generation:
            return False  # this success may change the state: send it, and wait
        # An older generation's (for the daemon's totals), or one the daemon
        # admitted before it stalled: the connection lives, and the daemon
        # reads it when it runs again.
        return self.client.post((self.name, generation, _SUCCESS, 0.0, 0, None))

    def post_report(self, item: tuple[int, Outcome, float]) -> bool:
        generation, outcome, duration = item
        if outcome is _SUCCESS and 0 <= generation < LOCAL_GENERATION_OFFSET and self._remote:
            slow = self._remote_snapshot.slow_call_duration
            if slow is None or duration <= slow:
                # The daemon counts it as a plain success, whatever its duration
                # (its actor's slow_call_duration is the snapshot's): send it as
                # one, a count per batch rather than an item per call.
                return self.post_success(generation)
        if generation >= LOCAL_GENERATION_OFFSET:
            local = self._local
            if local is None:  # pragma: no cover
                return True
            return local.post_report((generation - LOCAL_GENERATION_OFFSET, outcome, duration))
        if generation < 0 or not (self._remote or self._suspended):
            return True
        return self.client.post((self.name, generation, outcome, duration, 0, None))

    def post_rejection(self, count: int = 1) -> None:
        if self._remote:
            # The hot path of an open breaker: a tally append, as for successes.
            rejected = self._rejected
            if len(rejected) < self._queue_limit:  # status totals only: drop past it
                rejected.append(count)
                client = self.client
                if not client._flush_armed:
                    client._flush_armed = True
                    client._wake()
        elif self._local is not None:
            self._local.post_rejection(count)

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None:
        """Send a request; ``reply(result, error)`` is called exactly once (maybe at once).

        Never raises: errors, ``DaemonUnavailableError`` included, go to ``reply``.
        Called with a reply from a thread running an asyncio loop, the
        policy answers it if the daemon has not within ``daemon_timeout``.
        """
        if self._unstarted:
            try:
                self._begin()
            except BaseException as exc:
                _answer(reply, None, exc)
                return
        limit = self._wait_limit(message, reply)
        if limit is None:
            self._ask(message, reply, force, False)
            return
        assert reply is not None
        bounded = _Bounded(reply, self._late_reply(message))
        self._ask(message, bounded, force, False)
        if not bounded.settled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to time it on: request_timeout bounds it
            loop.call_later(limit, self._expire, bounded, message, reply, force, limit)

    def ask_sync(self, message: object, *, force: bool = False) -> Any:
        """``ask``, and wait in this thread: the result, or the error raised.

        A request that goes to the daemon is read off the socket by this
        thread if no other thread is reading (``DaemonClient.request(read=True)``).
        An acquire or a report waits at most ``daemon_timeout`` for it; then
        the policy answers.
        """
        self.ensure_started()
        waiter = _SyncReply()
        limit = self._wait_limit(message, waiter)
        if limit is None:
            self._ask(message, waiter, force, True)
            return waiter.wait()
        deadline = time.monotonic() + limit
        bounded = _Bounded(waiter, self._late_reply(message))
        self._ask(message, bounded, force, True, limit)
        if not waiter.ready(deadline - time.monotonic()):
            self._expire(bounded, message, waiter, force, limit)
        return waiter.wait()

    def _wait_limit(self, message: object, reply: Reply | None) -> float | None:
        # How long a caller waits for the daemon: calls only (an acquire, an
        # acknowledged report); status and admin wait for the daemon's answer.
        if reply is None or self.daemon_timeout is None or not self._remote:
            return None
        kind = type(message)
        if kind is Report:
            if cast(Report, message).generation >= LOCAL_GENERATION_OFFSET:
                return None
        elif kind is not Acquire:
            return None
        return self.daemon_timeout

    def _expire(
        self, bounded: _Bounded, message: object, reply: Reply, force: bool, waited: float
    ) -> None:
        if not bounded.expire():
            return  # answered in time
        self.client.note_stalled(waited)
        self._ask_unavailable(message, reply, force)

    def _late_reply(self, message: object) -> Reply:
        # The daemon answered a caller that had given up on it: a trial lease
        # it granted would be held by nobody until its deadline (and then
        # count as a failure). Give it back.
        def late(result: Any, error: BaseException | None) -> None:
            if isinstance(result, Admission) and result.admitted and result.lease:
                release = Report(
                    self.name, result.generation, Outcome.CANCELLED, lease=result.lease
                )
                self.client.request(release, _ignore_reply)

        return late

    def _ask(
        self,
        message: object,
        reply: Reply | None,
        force: bool,
        read: bool,
        read_timeout: float | None = None,
    ) -> None:
        kind = type(message)
        if type(message) is Report:
            name, generation = message.name, message.generation
            if generation >= LOCAL_GENERATION_OFFSET:
                self._ask_local(
                    replace(message, generation=generation - LOCAL_GENERATION_OFFSET),
                    reply,
                    force,
                )
                return
            if generation < 0:
                _answer(reply, self.snapshot, None)  # admitted by "allow": counted nowhere
                return
            if not self._remote:
                self._ask_unavailable(message, reply, force)  # the daemon went away meanwhile
                return
            if (
                reply is None
                and not message.lease
                and self.client.post(
                    (name, generation, message.outcome, message.duration, 0, message.retry_after)
                )
            ):
                return  # fire and forget: batched like post_report
        if self._remote and kind in _CALL_REQUESTS and reply is not None and self.client.stalled:
            # The daemon left a caller waiting in vain: do not make this one wait too.
            self._ask_unavailable(message, reply, force)
            return
        if (
            self._remote
            and kind in _DAEMON_REQUESTS
            and self.client.request(
                cast(RequestMessage, message),
                self._remote_reply(message, reply, force),
                read=read,
                read_timeout=read_timeout,
            )
        ):
            return
        self._ask_unavailable(message, reply, force)

    # -- replies ---------------------------------------------------------------------------

    def _remote_reply(self, message: object, reply: Reply | None, force: bool) -> Reply:
        def on_reply(result: Any, error: BaseException | None) -> None:
            if error is not None:
                if isinstance(error, (DaemonUnavailableError, ActorStoppedError)):
                    # The daemon went away under this request: answer it as if
                    # it had come after (the policy counts an outcome, if any does).
                    self._ask_unavailable(message, reply, force)
                    return
                if reply is None:
                    self._log.warning("daemon_report_failed", error=str(error))
                    return
                reply(None, error)
                return
            if isinstance(message, StatusRequest) and isinstance(result, Status):
                # The facade wants what an actor answers: this breaker's status.
                mine = [s for s in result.breakers if s.snapshot.name == self.name]
                if not mine:
                    _answer(reply, None, UnknownBreakerError(f"no breaker {self.name!r}"))
                    return
                result = mine[0]
            _answer(reply, result, None)

        return on_reply

    def _ask_unavailable(self, message: object, reply: Reply | None, force: bool) -> None:
        policy = self.on_unavailable
        if policy == "local":
            if type(message) is Report:
                self._report_locally(message, reply, force)
                return
            self._ask_local(message, reply, force)
            return
        if type(message) is Acquire:
            if policy == "allow":
                _answer(reply, Admission(True, _NO_GENERATION, 0, self._allow_snapshot), None)
            else:
                _answer(reply, None, self._unavailable_error())
            return
        if type(message) is Report:
            _answer(reply, self.snapshot, None)
            return
        _answer(reply, None, self._unavailable_error())

    def _report_locally(self, report: Report, reply: Reply | None, force: bool) -> None:
        # An outcome the daemon admitted, with the daemon out of reach (gone,
        # or not answering in time): the local breaker counts it, as of its
        # own generation, so a failing service trips it. A cancelled trial
        # only released a daemon lease: nothing to count here.
        if report.outcome is Outcome.CANCELLED:
            _answer(reply, self.snapshot, None)
            return
        try:
            local = self._ensure_local()
        except BreakerError as exc:
            _answer(reply, None, exc)
            return
        moved = replace(report, generation=local.snapshot.generation, lease=0)
        self._ask_local(moved, reply, force)

    def _unavailable_error(self) -> DaemonUnavailableError:
        reason = self.client.outage or "not registered with it yet"
        return DaemonUnavailableError(
            f"breaker {self.name!r}: the breakerd daemon at {self.client.path} is "
            f"unavailable ({reason}) and on_unavailable={self.on_unavailable!r}"
            + (" fails closed" if self.on_unavailable == "deny" else "")
        )

    def _ask_local(self, message: object, reply: Reply | None, force: bool) -> None:
        try:
            local = self._ensure_local()
        except BreakerError as exc:
            _answer(reply, None, exc)
            return

        def from_local(result: Any, error: BaseException | None) -> None:
            if error is not None:
                _answer(reply, None, error)
            else:
                _answer(reply, self._from_local(result), None)

        try:
            local.ask(message, from_local if reply is not None else None, force=force)
        except BreakerError as exc:
            _answer(reply, None, exc)

    # -- the local fallback ------------------------------------------------------------------

    def _ensure_local(self) -> BreakerActor:
        local = self._local
        if local is not None:
            return local
        with self._local_lock:
            if self._local is None:
                system = self._system
                if system is None or system.pid != os.getpid():
                    system = default_system()
                actor, _ = system.actor(self.name, self.config)
                actor.listeners.append(self._local_transition)
                self._local_system = system
                self._local = actor
                self._log.info("breaker_local_fallback", reason=self.client.outage)
            return self._local

    def _to_local_view(self, snapshot: Snapshot) -> Snapshot:
        # One tuple, read and written whole, so racing threads never pair a
        # snapshot with another one's view.
        view = self._local_view
        if view is None or view[0] is not snapshot:
            view = (
                snapshot,
                replace(snapshot, generation=snapshot.generation + LOCAL_GENERATION_OFFSET),
            )
            self._local_view = view
        return view[1]

    def _from_local(self, result: Any) -> Any:
        if isinstance(result, Snapshot):
            return self._to_local_view(result)
        if isinstance(result, Admission):
            return replace(
                result,
                generation=result.generation + LOCAL_GENERATION_OFFSET,
                snapshot=self._to_local_view(result.snapshot),
            )
        if isinstance(result, BreakerStatus):
            return replace(result, snapshot=self._to_local_view(result.snapshot))
        return result

    def _local_transition(self, transition: Transition, snapshot: Snapshot) -> None:
        if self._remote:
            return  # the daemon's state is the one shown
        view = self._to_local_view(snapshot)
        moved = replace(transition, generation=transition.generation + LOCAL_GENERATION_OFFSET)
        with self._announce_lock:
            self._announced = transition.to_state
        self._notify(moved, view)

    # -- called by the client's IO thread ---------------------------------------------------

    def _registered_reply(self, epoch: int) -> Reply:
        def on_registered(result: Any, error: BaseException | None) -> None:
            if epoch != self.client.epoch:
                return  # an answer from a connection that is gone
            if error is not None:
                if not isinstance(error, DaemonUnavailableError):
                    self._log.error("breaker_register_failed", error=str(error))
                    self._register_error = error
                self._settled.set()
                return
            assert isinstance(result, Registered)
            if result.conflicts:
                self._log.warning(
                    "breaker_config_conflict",
                    settings=list(result.conflicts),
                    rule="the daemon's config file, then the first client, wins",
                )
            self.conflicts = result.conflicts
            self._suspended = False
            # The core's cache holds this snapshot or a newer push.
            self._show(self.client.core.snapshots.get(self.name, result.snapshot))
            table = self.client.state_table
            self._slot_seq = -1  # before the new slot: its first read catches up
            self._slot_words = table.slot(result.slot) if table is not None else None
            self._remote = True
            self._sync_live()
            self._register_error = None
            self._settled.set()
            self._announce(self._remote_snapshot, "daemon_available")

        return on_registered

    def _daemon_snapshot(self, snapshot: Snapshot) -> None:
        if self._slot_words is not None and snapshot.generation < self._remote_snapshot.generation:
            return  # the table showed a newer state first; its push is on the way
        self._show(snapshot)
        # The table may be newer than this reply (it is written before any
        # reply leaves): the next read of the slot has the last word.
        self._slot_seq = -1
        if self._remote:
            self._announce(snapshot, "daemon")

    def _suspend(self) -> None:
        if not self._remote:
            return
        self._suspended = True
        self._remote = False
        self._sync_live()
        try:
            snapshot = self.snapshot
        except BreakerError:  # the local actor system is stopped (exit)
            return
        self._announce(snapshot, "daemon_unavailable")

    def _resume(self) -> None:
        if not self._suspended:
            return
        self._suspended = False
        self._slot_seq = -1  # catch up with the table first
        self._remote = True
        self._sync_live()
        self._announce(self.snapshot, "daemon_available")

    def _daemon_lost(self, *, announce: bool) -> None:
        self._suspended = False
        was_remote = self._remote
        self._remote = False
        self._tally = (_ASK_FOR_SUCCESSES, [])
        self._slot_words = None
        self._sync_live()
        self._settled.set()
        # Not when the client closes (at exit): announcing would build the
        # local fallback, and its actor thread, for nothing.
        if was_remote and announce:
            try:
                snapshot = self.snapshot
            except BreakerError:  # the local actor system is stopped (exit)
                return
            self._announce(snapshot, "daemon_unavailable")

    def _announce(self, snapshot: Snapshot, reason: str) -> None:
        # Pushes and mode switches carry no Transition: make one when the
        # state shown to the facade changes, so on_transition() works as in
        # embedded mode.
        with self._announce_lock:
            previous = self._announced
            if previous is None or previous is snapshot.state:
                self._announced = snapshot.state
                return
            self._announced = snapshot.state
        transition = Transition(
            previous,
            snapshot.state,
            snapshot.generation,
            TransitionReason(reason),
            snapshot.failure_rate,
            snapshot.slow_call_rate,
            snapshot.open_until,
        )
        self._notify(transition, snapshot)

    def _notify(self, transition: Transition, snapshot: Snapshot) -> None:
        for listener in tuple(self.listeners):
            try:
                listener(transition, snapshot)
            except Exception:
                self._log.exception("transition_listener_failed")


def _answer(reply: Reply | None, result: Any, error: BaseException | None) -> None:
    if reply is not None:
        reply(result, error)


def _ignore_reply(result: Any, error: BaseException | None) -> None:
    pass


class _Bounded:
    """A reply its caller may stop waiting for: the first of the answer and ``expire`` wins.

    An answer that comes after ``expire`` goes to ``late`` instead, once. One
    that comes again (a dispatch run twice after an interrupt) is dropped.
    """

    __slots__ = ("_late", "_lock", "_reply", "_state")

    _PENDING, _ANSWERED, _EXPIRED, _LATE = range(4)

    def __init__(self, reply: Reply, late: Reply) -> None:
        self._reply = reply
        self._late = late
        self._lock = threading.Lock()
        self._state = self._PENDING

    @property
    def settled(self) -> bool:
        return self._state != self._PENDING

    def __call__(self, result: Any, error: BaseException | None) -> None:
        with self._lock:
            state = self._state
            if state == self._PENDING:
                self._state = self._ANSWERED
            elif state == self._EXPIRED:
                self._state = self._LATE
        if state == self._PENDING:
            self._reply(result, error)
        elif state == self._EXPIRED:
            self._late(result, error)

    def expire(self) -> bool:
        """True if no answer came first (the caller now answers itself)."""
        with self._lock:
            if self._state != self._PENDING:
                return False
            self._state = self._EXPIRED
            return True


class _SyncReply:
    """A reply callback that one thread waits on (lighter than a ``concurrent.futures.Future``)."""

    __slots__ = ("_error", "_lock", "_result", "done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._result: Any = None
        self._error: BaseException | None = None
        self.done = False

    def __call__(self, result: Any, error: BaseException | None) -> None:
        if self.done:
            return  # run again after an interrupted dispatch: the first answer stands
        self._result = result
        self._error = error
        self.done = True
        self._lock.release()

    def ready(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the answer; True if it is in."""
        if self.done:
            return True
        if timeout > 0 and self._lock.acquire(timeout=timeout):
            self._lock.release()  # for wait()
            return True
        return self.done

    def wait(self) -> Any:
        if not self.done:
            self._lock.acquire()
        error = self._error
        if error is not None:
            raise error
        return self._result


if TYPE_CHECKING:
    # Both implement the surface the facade relies on.
    _actor_conforms: ActorSurface = BreakerActor("x", BreakerConfig(), clock=time.monotonic)
    _link_conforms: ActorSurface = RemoteBreaker(DaemonClient("x"), "x", BreakerConfig())
