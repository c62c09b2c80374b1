"""The daemon: breaker actors shared by every process on the host.

One asyncio loop runs the actor system and a Unix-socket server. Each
connection is an ``asyncio.Protocol`` around the sans-IO
``breakerd.protocol.Connection``: bytes in, messages out, and the messages go
to the breaker actors' inboxes exactly as an in-process proxy's would. Replies
and state pushes are written from the same loop thread, so nothing here needs
a lock either.

What protects the others from one bad client:

* peers are checked with ``SO_PEERCRED``: the daemon's own uid, root, and
  ``allowed_uids``; anyone else is closed at once and logged;
* a malformed frame (or an oversized length prefix, refused before its body
  is buffered) closes that one connection;
* ``max_breakers`` per daemon and ``max_breakers_per_client`` (the breakers
  a connection registered), a ``limit_exceeded`` error past either or once
  the state table is full; a closed breaker nobody holds is reclaimed after
  ``breaker_idle_timeout``;
* ``max_connections``, plus one slot kept for the admin CLI (a connection
  that gets it must say hello as ``breakerd-cli``), and at most
  ``max_connections_per_pid`` of them from one process;
* ``hello_timeout`` for a new connection to say hello, ``idle_timeout`` for
  one that holds nothing (no breaker, no request, no lease) and says nothing;
* ``max_inflight`` requests per connection (more get a ``busy`` error), and a
  bounded outbox: a client that stops reading is dropped once ``max_outbox``
  bytes wait for it, it never blocks an actor;
* ``read_budget`` bytes per connection per loop turn: a connection that sent
  more is read less often, so a flood of big frames from some connections
  cannot starve the others' requests (``_fairness.ReadScheduler``);
* repeated warnings a client causes are logged once, then summarized
  (``_fairness.RepeatedEvents``);
* a half-open trial lease is settled only by the connection it was granted
  to (anyone else's report of it is stale), and released when that
  connection closes;
* generations and lease ids start at a random offset per breaker, so a
  permit from before a restart names nothing after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import grp
import inspect
import itertools
import os
import pwd
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
import structlog

from breakerd.protocol import (
    MAX_SOCKET_PATH,
    NEED_DATA,
    Acquire,
    Admin,
    Admission,
    BreakerError,
    BreakerStatus,
    CircuitState,
    Connection,
    Hello,
    InboxFullError,
    InvalidRequestError,
    LimitExceededError,
    NotificationReceived,
    Outcome,
    ProtocolError,
    Register,
    Registered,
    Report,
    ReportBatch,
    RequestReceived,
    Snapshot,
    StatePush,
    Status,
    StatusRequest,
    Subscribe,
    Subscribed,
    TransitionEvent,
    UnknownBreakerError,
    VersionMismatchError,
    Welcome,
    frame_notification,
    negotiate_version,
)

from .._actor import BreakerActor
from .._machine import BreakerConfig, Transition
from .._system import ActorSystem
from . import _systemd as systemd
from ._config import DaemonSettings, MetricsUnavailableError
from ._fairness import LOG_SUMMARY_INTERVAL, ReadScheduler, RepeatedEvents
from ._reclaim import IdleBreakers, sweep_period
from ._reload import reload_config
from ._state_file import StateFile
from ._state_table import SharedStateTable, StateTableUnavailableError

if TYPE_CHECKING:
    from ._fleet import FleetLink
    from ._metrics import MetricsServer

__all__ = ["SERVER_NAME", "Daemon", "DaemonAlreadyRunningError", "UnsafeSocketPathError"]

SERVER_NAME = "breakerd/0.1"
_PEERCRED = struct.Struct("3i")
# Many workers may start at once (gunicorn forking 64 of them, say).
_BACKLOG = 1024
#: Bytes read from a connection at a time, into the daemon's one receive buffer.
_READ_SIZE = 1 << 18
_connection_ids = itertools.count(1)
#: What the admin CLI (``clients/_admin.py``) calls itself in its hello: the
#: one client the reserved connection slot is kept for.
ADMIN_CLIENT = "breakerd-cli"
#: Breakers per status page: ~200 bytes each plus the name, far below a frame.
STATUS_PAGE = 1000


async def _serve_unix(
    loop: asyncio.AbstractEventLoop,
    protocol: Callable[[], asyncio.BaseProtocol],
    listener: socket.socket,
) -> asyncio.Server:
    """``create_unix_server`` that never unlinks the socket file itself.

    asyncio from Python 3.13 and uvloop from 0.21 remove a server's socket
    file when it closes (``cleanup_socket``); the daemon decides that alone:
    its own socket goes at shutdown, but one systemd passed in must stay for
    the next activation. Loops without the parameter never remove it.
    """
    # Any: the typeshed of Python 3.11, which mypy checks against, lacks the parameter.
    create: Any = loop.create_unix_server
    if "cleanup_socket" in inspect.signature(create).parameters:
        server = await create(protocol, sock=listener, backlog=_BACKLOG, cleanup_socket=False)
    else:
        server = await create(protocol, sock=listener, backlog=_BACKLOG)
    return cast(asyncio.Server, server)


class DaemonAlreadyRunningError(BreakerError, RuntimeError):
    """Another daemon holds the lock for this socket."""


class UnsafeSocketPathError(BreakerError, RuntimeError):
    """The socket's directory or lock file could be another process's: not used."""


class Daemon:
    """``await Daemon(settings).run()`` serves until ``stop()`` or SIGTERM/SIGINT."""

    def __init__(
        self,
        settings: DaemonSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        handle_signals: bool = True,
        loop_name: str = "asyncio",
        wall_clock: Callable[[], float] = time.time,
        listen_socket: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        #: For the log: which event loop ``run`` was started on.
        self.loop_name = loop_name
        # Random starts: a permit or a trial lease from before a restart
        # must name nothing in this run (it would settle another's trial).
        self.system = ActorSystem(clock=clock, random_start=True)
        self.peers: set[_Peer] = set()
        #: The connections that hold each breaker (registered it), pushed its changes.
        self.subscribers: dict[str, set[_Peer]] = {}
        #: Breakers no connection holds: reclaimed once idle long enough.
        self.idle = IdleBreakers(settings.breaker_idle_timeout)
        #: Connections that asked for transition events, and the breakers
        #: they asked about (empty: every breaker).
        self.watchers: dict[_Peer, frozenset[str]] = {}
        #: The connection in the slot kept for the admin CLI, if taken.
        self.admin_peer: _Peer | None = None
        #: pid -> connections it holds (SO_PEERCRED's pid, at connect time).
        self.connections_by_pid: dict[int, int] = {}
        #: Who is read when, once connections go over their read budget.
        self.reads: ReadScheduler[_Peer] = ReadScheduler()
        self.uid = os.getuid()
        self.log = structlog.get_logger("breakerd.daemon")
        self._handle_signals = handle_signals
        self._stop = anyio.Event()
        self._lock_fd: int | None = None
        # The socket's name until it is published (see _bind).
        # Every connection reads into this one buffer: the loop is one thread,
        # and asyncio hands each read over (buffer_updated) before the next.
        # A plain Protocol would cost every read a fresh 256 KiB bytes object,
        # which glibc maps, shrinks and unmaps: three system calls and a page
        # fault per request.
        self.read_buffer = bytearray(_READ_SIZE)
        #: The shared state table, once run() has made it (None: not offered).
        self.state_table: SharedStateTable | None = None
        #: A socket systemd passed us (socket activation): served, never bound or unlinked.
        self.listen_socket = listen_socket
        path = settings.state_file_path()
        #: Breaker state across restarts (None: ``--state-file none``).
        self.state_file = (
            None
            if path is None
            else StateFile(path, self.system.actors, clock=clock, wall_clock=wall_clock)
        )
        #: The link to the other hosts' daemons through Redis (None: no fleet).
        self.fleet: FleetLink | None = None
        if settings.fleet is not None and settings.fleet.redis:
            from ._fleet import FleetLink

            self.fleet = FleetLink(settings.fleet, self.system.get, clock)

    @property
    def socket_path(self) -> Path:
        return self.settings.socket_path

    @property
    def lock_path(self) -> Path:
        return self.socket_path.with_name(self.socket_path.name + ".lock")

    def stop(self) -> None:
        self._stop.set()

    def peer_allowed(self, uid: int, gid: int) -> bool:
        """The daemon's own uid, root, ``allowed_uids``, and ``socket_group``'s members."""
        settings = self.settings
        if uid in (self.uid, 0) or uid in settings.allowed_uids:
            return True
        group = settings.socket_gid
        if group is None:
            return False
        if gid == group:
            return True
        try:
            members = grp.getgrgid(group).gr_mem
            return pwd.getpwuid(uid).pw_name in members
        except KeyError:
            return False

    # -- lifecycle ---------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._take_lock()
        server: asyncio.Server | None = None
        metrics: MetricsServer | None = None
        try:
            self._make_state_table()
            self._restore_state()
            # Before the socket appears, so that a ready daemon is scrapable.
            metrics = self._start_metrics()
            async with anyio.create_task_group() as group:
                await group.start(self.system.serve)
                group.start_soon(self._sweep_idle_breakers)
                if self.fleet is not None:
                    group.start_soon(self.fleet.run)
                if self._handle_signals:
                    await group.start(self._watch_signals)
                group.start_soon(self._sweep)
                # Readiness contract: the socket file appears only once signal
                # handlers are in place and the listener accepts connections.
                listener = self.listen_socket or self._bind()
                loop = asyncio.get_running_loop()
                server = await _serve_unix(loop, lambda: _Peer(self), listener)
                if self.listen_socket is None:
                    # Only now under its real name: whoever sees the file can
                    # connect, with the final mode. The log line comes after,
                    # so whoever reads it finds the socket in place too.
                    os.replace(self._bind_path, self.socket_path)
                self.log.info(
                    "daemon_started",
                    socket=str(self.socket_path),
                    pid=os.getpid(),
                    loop=self.loop_name,
                    state_table_slots=self.state_table.slots if self.state_table else 0,
                    breakers_configured=sorted(self.settings.breakers),
                    state_file=str(self.state_file.path) if self.state_file else None,
                    breakers_restored=self.state_file.restored if self.state_file else 0,
                    socket_activated=self.listen_socket is not None,
                )
                systemd.notify("READY=1")
                interval = systemd.watchdog_interval()
                if interval is not None:
                    group.start_soon(systemd.watchdog, interval, self.system.actors)
                if self.state_file is not None:
                    group.start_soon(self.state_file.run)
                task_status.started()
                await self._stop.wait()
                systemd.notify("STOPPING=1")
                self.log.info("daemon_stopping", connections=len(self.peers))
                server.close()
                if self.state_file is not None:
                    # Before the actors stop: what their inboxes hold counts too.
                    self.state_file.write(settle=True)
                # Stopping the actors fails every pending request with a
                # "shutting down" error, written to its peer before we close.
                self.system.stop()
                for peer in list(self.peers):
                    peer.close()
                group.cancel_scope.cancel()
        finally:
            if server is not None:
                server.close()
            if metrics is not None:
                metrics.close()
            if self.state_table is not None:
                self.state_table.close()
                self.state_table = None
            self._remove_socket()
            self._release_lock()
            self.log.info("daemon_stopped")

    async def _sweep(self) -> None:
        """Close connections that hold nothing and say nothing; summarize repeated warnings."""
        idle_timeout = self.settings.idle_timeout
        period = min(idle_timeout / 4, LOG_SUMMARY_INTERVAL / 2)
        loop = asyncio.get_running_loop()
        while True:
            await anyio.sleep(period)
            now = loop.time()
            for peer in tuple(self.peers):
                if peer.repeats.pending:
                    peer.repeats.summarize(peer.log)
                if peer.idle and now - peer.last_heard >= idle_timeout:
                    peer.log.info("peer_dropped", reason="idle", idle_timeout=idle_timeout)
                    peer.close(abort=True)

    def _make_state_table(self) -> None:
        slots = self.settings.state_table_slots
        if not slots:
            return
        try:
            self.state_table = SharedStateTable(slots)
        except StateTableUnavailableError as exc:
            self.log.warning(
                "state_table_unavailable",
                error=str(exc),
                effect="clients learn of transitions by push only",
            )

    def _start_metrics(self) -> MetricsServer | None:
        if self.settings.metrics is None:
            return None
        # Imported here: prometheus-client is an optional extra.
        from ._metrics import BreakerCollector, MetricsServer

        host, port = self.settings.metrics
        collector = BreakerCollector(
            self.system.actors, self.system.clock, clients=lambda: len(self.peers)
        )
        try:
            server = MetricsServer(collector, host, port)
        except OSError as exc:
            raise MetricsUnavailableError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self.log.info("metrics_serving", host=host, port=server.port, path="/metrics")
        return server

    def _restore_state(self) -> None:
        if self.state_file is None:
            return
        for machine in self.state_file.load():
            try:
                actor, _ = self.system.actor(machine.name, machine.config)
            except (ValueError, BreakerError) as exc:
                # A name or a number of breakers this daemon no longer accepts.
                self.log.error("state_breaker_skipped", breaker=machine.name[:200], error=str(exc))
                continue
            actor.restore(machine)
            self._attach(actor)
            # Nobody holds it until a client registers it: reclaimable when idle.
            self.idle.let_go(machine.name, self.system.clock())
            # The config file wins over the settings a breaker was saved with.
            configured = self.settings.configured(machine.name)
            if configured is not None and configured != machine.config:
                actor.reconfigure(configured)

    async def _watch_signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                self.log.info("signal_received", signal=signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    reload_config(self)
                    continue
                self.stop()
                return

    def _take_lock(self) -> None:
        directory = self.socket_path.parent
        try:
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            # Not ours: /tmp/breakerd-$UID can be made by anyone before us.
            self._check_directory(directory)
        fd = self._open_lock_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    holder = self.lock_path.read_text().strip() or "unknown"
                except OSError:
                    holder = "unknown"
                raise DaemonAlreadyRunningError(
                    f"another breakerd daemon (pid {holder}) is serving {self.socket_path}"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        if self.listen_socket is None and (
            self.socket_path.exists() or self.socket_path.is_symlink()
        ):
            # We hold the lock, so whoever made this socket is gone.
            if not stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                self._release_lock()
                raise UnsafeSocketPathError(
                    f"{self.socket_path} exists and is not a socket; not touching it"
                )
            self.socket_path.unlink()
            self.log.warning("stale_socket_removed", socket=str(self.socket_path))

    def _check_directory(self, directory: Path) -> None:
        """Refuse a directory someone else could have prepared (or can change under us)."""
        info = os.lstat(directory)
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeSocketPathError(
                f"socket directory {directory} is a symlink; refusing to serve through it"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeSocketPathError(f"socket directory {directory} is not a directory")
        if info.st_uid != self.uid:
            raise UnsafeSocketPathError(
                f"socket directory {directory} belongs to uid {info.st_uid}, not to the "
                f"daemon's uid {self.uid}; remove it or choose another --socket"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeSocketPathError(
                f"socket directory {directory} is writable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); make it 0700 or choose another --socket"
            )

    def _open_lock_file(self) -> int:
        """The lock file, made anew, or the one a previous daemon of ours left."""
        path = self.lock_path
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeSocketPathError(
                    f"lock file {path} is a symlink; not following it (remove it if it is stale)"
                ) from None
            raise
        # It existed: truncated below only if it can only be a lock file of
        # ours. A hard link to some other file has a second name.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != self.uid or info.st_nlink != 1:
            os.close(fd)
            raise UnsafeSocketPathError(
                f"lock file {path} is not a plain file of the daemon's uid {self.uid} "
                f"with one name; not touching it (remove it if it is stale)"
            )
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                self.lock_path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def _bind_path(self) -> Path:
        hidden = self.socket_path.with_name(f".{self.socket_path.name}.{os.getpid()}")
        if len(os.fsencode(hidden)) > MAX_SOCKET_PATH:
            return self.socket_path  # no room for the longer name: bind in place
        return hidden

    def _bind(self) -> socket.socket:
        """A listener bound under a temporary name; run() renames it into place."""
        mode = self.settings.socket_mode
        path = self._bind_path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a umask that already gives the final mode: no window in
        # which the socket is open to others.
        old_umask = os.umask(0o777 & ~mode)
        try:
            listener.bind(str(path))
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        if self.settings.socket_gid is not None:
            os.chown(path, -1, self.settings.socket_gid)
        os.chmod(path, mode)
        listener.listen(_BACKLOG)
        listener.setblocking(False)
        return listener

    def _remove_socket(self) -> None:
        if self._lock_fd is None or self.listen_socket is not None:
            return  # not ours (systemd's socket outlives us, for the next activation)
        for path in (self.socket_path, self._bind_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # -- breakers ----------------------------------------------------------------

    def register(
        self, name: str, requested: dict[str, Any]
    ) -> tuple[BreakerActor, tuple[str, ...]]:
        """The actor for ``name``; the config file wins, then the first client."""
        try:
            requested_config = BreakerConfig.from_dict(requested)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"breaker {name!r}: {exc}") from None
        existing = self.system.get(name)
        if existing is None:
            try:
                config = self.settings.for_client(name, requested)
            except (TypeError, ValueError) as exc:
                raise InvalidRequestError(f"breaker {name!r}: {exc}") from None
            self._check_room(name)
            try:
                actor, _ = self.system.actor(name, config)
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from None
            if actor.listeners == []:
                self._attach(actor)
            existing = actor
        conflicts = existing.config.differences(requested_config)
        if conflicts:
            self.log.warning(
                "breaker_config_conflict",
                breaker=name,
                settings=list(conflicts),
                rule="config file first, then the first client",
            )
        return existing, conflicts

    def _check_room(self, name: str) -> None:
        limit = self.settings.max_breakers
        if self.system.count >= limit:
            raise LimitExceededError(
                f"breaker {name!r} refused: this daemon has {limit} breakers, "
                f"its limit ([daemon] max_breakers)"
            )
        table = self.state_table
        if table is not None and table.full:
            raise LimitExceededError(
                f"breaker {name!r} refused: the state table is full "
                f"({table.slots - 1} breakers; [daemon] state_table_slots)"
            )

    def hold(self, name: str, peer: _Peer) -> None:
        """``peer`` registered ``name``: it gets its pushes, and it is not idle."""
        self.subscribers.setdefault(name, set()).add(peer)
        self.idle.held(name)

    def let_go(self, name: str, peer: _Peer) -> None:
        """``peer`` is gone; ``name`` is idle from now if nobody else holds it."""
        subscribers = self.subscribers.get(name)
        if subscribers is None:
            return
        subscribers.discard(peer)
        if not subscribers:
            del self.subscribers[name]
            self.idle.let_go(name, self.system.clock())

    def reclaim_idle(self) -> list[str]:
        """Reclaim the breakers idle long enough that are closed and quiet; their names."""
        reclaimed = []
        for name in self.idle.due(self.system.clock()):
            actor = self.system.get(name)
            if actor is None or name in self.subscribers:
                self.idle.forget(name)
                continue
            if actor.snapshot.state is not CircuitState.CLOSED or not actor.idle:
                # Open keeps its deadline, admin states stay until reset, and
                # outcomes still on their way are applied first: next sweep.
                continue
            self.system.remove(name)
            self.idle.forget(name)
            if self.fleet is not None:
                self.fleet.forget(name)
            if self.state_table is not None:
                self.state_table.release(name)
            reclaimed.append(name)
        return reclaimed

    async def _sweep_idle_breakers(self) -> None:
        period = sweep_period(self.settings.breaker_idle_timeout)
        while True:
            await anyio.sleep(period)
            reclaimed = self.reclaim_idle()
            if reclaimed:
                self.log.info(
                    "breakers_reclaimed",
                    count=len(reclaimed),
                    breakers=reclaimed[:10],
                    idle_after=self.settings.breaker_idle_timeout,
                    remaining=self.system.count,
                )

    def _attach(self, actor: BreakerActor) -> None:
        """Hook a new actor up to the state file, the pushes and the state table."""
        actor.listeners.append(self._pusher(actor.name))
        if self.state_file is not None:
            # After the pushes (the state table has told every client already;
            # a push held back by a write would only reach fewer of them), but
            # before the request that caused the transition is answered.
            actor.listeners.append(self.state_file.on_transition)
        table = self.state_table
        in_table = table is not None and table.slot_for(actor.name) != 0
        actor.on_publish = self._publisher(actor.name, in_table)
        actor.on_publish(actor.snapshot)  # the table's first word, and a baseline
        if self.fleet is not None:
            self.fleet.attach(actor)

    def fleet_admin(self, message: Admin) -> None:
        """Send an admin move to every daemon of the fleet; raises when it cannot go."""
        fleet = self.fleet
        if fleet is None:
            raise InvalidRequestError(
                "--fleet: this daemon is in no fleet (start it with --redis or [fleet] redis)"
            )
        if fleet.state != "up":
            raise InvalidRequestError(
                f"--fleet: the fleet link is {fleet.state}: nothing done; try again, or "
                f"leave out --fleet to act on this host only"
            )
        fleet.admin(message.name, message.op)

    def actor(self, name: str) -> BreakerActor:
        actor = self.system.get(name)
        if actor is None:
            raise UnknownBreakerError(f"no breaker named {name!r} is registered with this daemon")
        return actor

    def _publisher(self, name: str, in_table: bool) -> Callable[[Snapshot], None]:
        """What a breaker's actor calls with every snapshot it publishes.

        The state table first. Then a push when only ``successes_safe`` moved
        (a transition's push is the listener's): a client without the table
        learns that its successes must now wait, or need not any more.
        """
        table = self.state_table
        write = table.publisher if table is not None and in_table else None
        shown = [-1, True]  # generation and successes_safe of the last snapshot

        def publish(snapshot: Snapshot) -> None:
            if write is not None:
                write(snapshot)
            generation, safe = snapshot.generation, snapshot.successes_safe
            if generation == shown[0] and safe is not shown[1]:
                self._push(name, snapshot)
            shown[0], shown[1] = generation, safe

        return publish

    def _push(self, name: str, snapshot: Snapshot) -> None:
        subscribers = self.subscribers.get(name)
        if not subscribers:
            return
        # Encoded once for every subscriber: all of them are past hello.
        frame = frame_notification(StatePush(snapshot))
        for peer in tuple(subscribers):
            peer.push_frame(frame)

    def _pusher(self, name: str) -> Callable[[Transition, Snapshot], None]:
        def push(transition: Transition, snapshot: Snapshot) -> None:
            self._push(name, snapshot)
            if self.watchers:
                # After the clients' pushes: an operator's tail can wait a little.
                self._push_event(name, transition)

        return push

    def _push_event(self, name: str, transition: Transition) -> None:
        frame: bytes | None = None
        for peer, names in tuple(self.watchers.items()):
            if names and name not in names:
                continue
            if frame is None:
                frame = frame_notification(
                    TransitionEvent(
                        name,
                        transition.from_state,
                        transition.to_state,
                        transition.generation,
                        transition.reason,
                        self.system.clock(),
                        transition.failure_rate,
                        transition.slow_call_rate,
                        transition.open_until,
                    )
                )
            peer.push_frame(frame)


class _Peer(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.conn = Connection("server", max_frame_size=1 << 20)
        self.transport: asyncio.Transport | None = None
        self.id = next(_connection_ids)
        self.log = daemon.log.bind(conn=self.id)
        self.closed = False
        # An admin connection (``breakerd status``, ``open``...): one per
        # command, so its comings and goings are logged at debug, not info.
        self.admin = False
        self.inflight = 0
        self.peer_pid = 0
        self.names: set[str] = set()
        # (breaker name, lease) -> generation: trial permits this peer holds.
        self.leases: dict[tuple[str, int], int] = {}
        # Actors given successes without a drain armed (see _reports).
        self._unflushed: list[BreakerActor] = []
        self.repeats = RepeatedEvents()
        self.pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        #: loop.time() of the last read (for idle_timeout).
        self.last_heard = 0.0
        self._hello_timer: asyncio.TimerHandle | None = None
        # The read budget: bytes that may still be read this turn (negative:
        # overdrawn), as of turn _credit_turn.
        self._credit = daemon.settings.read_budget
        self._credit_turn = 0
        self._holds = 0

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports have the whole Transport API without subclassing it.
        transport = self.transport = cast(asyncio.Transport, base)
        daemon = self.daemon
        settings = daemon.settings
        sock = transport.get_extra_info("socket")
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        self.log = self.log.bind(peer_pid=pid, peer_uid=uid)
        # The kernel's word on who reports: it names the process that opened a breaker.
        self.peer_pid = pid
        if not daemon.peer_allowed(uid, gid):
            self._refuse("uid not allowed", peer_gid=gid)
            return
        held = daemon.connections_by_pid.get(pid, 0)
        if held >= settings.max_connections_per_pid:
            self._refuse(
                "too many connections from this process",
                limit=settings.max_connections_per_pid,
            )
            return
        if len(daemon.peers) - (daemon.admin_peer is not None) >= settings.max_connections:
            if daemon.admin_peer is not None:
                self._refuse("too many connections", limit=settings.max_connections)
                return
            # The last slot: kept for `breakerd status` and friends, so that an
            # operator can always look, even while the pool is full.
            daemon.admin_peer = self
        self.pid = pid
        daemon.connections_by_pid[pid] = held + 1
        daemon.peers.add(self)
        loop = self._loop = asyncio.get_running_loop()
        self.last_heard = loop.time()
        self._hello_timer = loop.call_later(settings.hello_timeout, self._no_hello)
        # client_connected is logged with the hello, which says whether it is
        # an admin command; the reserved slot being taken is news of its own.
        if daemon.admin_peer is self:
            self.log.info("connection_accepted", admin_slot=True)

    def _refuse(self, reason: str, **fields: Any) -> None:
        self.log.warning("peer_refused", reason=reason, **fields)
        self.closed = True
        assert self.transport is not None
        self.transport.abort()

    def _no_hello(self) -> None:
        self._hello_timer = None
        if not self.closed:
            self.log.warning(
                "peer_dropped",
                reason="no hello in time",
                hello_timeout=self.daemon.settings.hello_timeout,
            )
            self.close(abort=True)

    @property
    def idle(self) -> bool:
        """Past hello and holding nothing: no breaker, no request in flight, no lease."""
        return (
            self._hello_timer is None
            and not self.closed
            and not self.names
            and not self.inflight
            and not self.leases
        )

    def repaid(self) -> bool:
        """One more turn has passed: resume reading once what was overdrawn is paid back."""
        if self.closed:
            return True
        self._credit += self.daemon.settings.read_budget
        self._credit_turn = self.daemon.reads.turn
        if self._credit < 0:
            return False
        self._release()
        return True

    def _charge(self, nbytes: int) -> bool:
        daemon = self.daemon
        reads = daemon.reads
        budget = daemon.settings.read_budget
        credit = self._credit
        turn = reads.turn
        if turn != self._credit_turn:
            credit = min(budget, credit + (turn - self._credit_turn) * budget)
            self._credit_turn = turn
        credit -= nbytes
        self._credit = credit
        if credit >= 0:
            return False
        if not self.closed:
            reads.throttle(self)
        return True

    def handle_deferred(self) -> None:
        """Handle the bytes ``data_received`` left for a later turn, then read on."""
        self.handle_events()
        self._release()

    def hold(self) -> None:
        # Reading pauses while anything holds it (the read budget, a busy actor).
        self._holds += 1
        if self._holds == 1 and self.transport is not None:
            self.transport.pause_reading()

    def _release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.daemon.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # A copy of what was read (the connection buffers it anyway): the
        # shared buffer is the next connection's as soon as we return.
        self.data_received(self.daemon.read_buffer[:nbytes])

    def data_received(self, data: bytes | bytearray) -> None:
        if self.closed:
            return
        overdrawn = self._charge(len(data))
        if self._loop is not None:
            self.last_heard = self._loop.time()
        try:
            self.conn.receive_data(data)
        except ProtocolError as exc:
            self.log.warning("protocol_error", error=str(exc))
            self.close(abort=True)
            return
        daemon = self.daemon
        if overdrawn and not daemon.reads.may_work_for_big_readers():
            # Big readers had their share: these bytes wait for a later turn,
            # and the small requests of others are not kept waiting.
            daemon.reads.defer(self)
            return
        self.handle_events()

    def handle_events(self) -> None:
        """Handle every complete message received so far."""
        if self.closed:
            return
        conn = self.conn
        started = time.perf_counter()
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is NotificationReceived:
                    self._reports(event.message)
                elif type(event) is RequestReceived:
                    self._request(event.msgid, event.message)
                else:
                    # ConnectionClosed or anything a server should never get.
                    break
        except ProtocolError as exc:
            self.log.warning("protocol_error", error=str(exc))
            self.close(abort=True)
        finally:
            unflushed = self._unflushed
            if unflushed:
                for actor in unflushed:
                    actor.flush_soon()
                unflushed.clear()
            if self.repeats.pending:
                self.repeats.summarize(self.log)
            self.daemon.reads.spent(started)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        daemon = self.daemon
        if self not in daemon.peers:
            return
        daemon.peers.discard(self)
        daemon.watchers.pop(self, None)
        if daemon.admin_peer is self:
            daemon.admin_peer = None
        held = daemon.connections_by_pid.pop(self.pid, 1) - 1
        if held > 0:
            daemon.connections_by_pid[self.pid] = held
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        daemon.reads.forget(self)
        for name in self.names:
            daemon.let_go(name, self)
        released = 0
        for (name, lease), generation in self.leases.items():
            actor = daemon.system.get(name)
            if actor is not None:
                released += 1
                try:
                    actor.ask(
                        Report(name, generation, Outcome.CANCELLED, lease=lease), None, force=True
                    )
                except BreakerError:
                    pass  # shutting down: the lease dies with the actor
        self.leases.clear()
        self.repeats.summarize(self.log, final=True)
        (self.log.debug if self.admin else self.log.info)(
            "client_disconnected", leases_released=released, error=repr(exc) if exc else None
        )

    # -- writing -----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.daemon.settings.max_outbox:
            self.log.warning("client_too_slow", buffered=transport.get_write_buffer_size())
            self.close(abort=True)

    def push_frame(self, frame: bytes) -> None:
        if not self.closed:
            self._write(frame)

    def close(self, *, abort: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abort()
        else:
            transport.close()
        self.closed = True

    def _reply(self, msgid: int, result: Any, error: BaseException | None) -> None:
        self.inflight -= 1
        if self.closed:
            return
        try:
            if error is None:
                self._write(self.conn.send_response(msgid, result))
            else:
                if not isinstance(error, BreakerError):
                    error = BreakerError(repr(error))
                self._write(self.conn.send_error(msgid, error))
        except ProtocolError as exc:
            self.log.error("reply_failed", error=str(exc))
            self.close(abort=True)

    # -- reading -------------------------------------------------------------------

    def _request(self, msgid: int, message: object) -> None:
        self.inflight += 1
        try:
            if self.inflight > self.daemon.settings.max_inflight:
                raise InboxFullError(
                    f"too many requests in flight on this connection "
                    f"(limit {self.daemon.settings.max_inflight})"
                )
            kind = type(message)
            if kind is Acquire or kind is Report or kind is Admin:
                self._ask_actor(msgid, message)
            elif kind is Hello:
                self._hello(msgid, message)  # type: ignore[arg-type]
            elif kind is Register:
                self._register(msgid, message)  # type: ignore[arg-type]
            elif kind is StatusRequest:
                self._status(msgid, message)  # type: ignore[arg-type]
            elif kind is Subscribe:
                names: tuple[str, ...] = message.names  # type: ignore[attr-defined]
                self.daemon.watchers[self] = frozenset(names)
                self.log.info("events_subscribed", breakers=sorted(names) or "all")
                self._reply(msgid, Subscribed(), None)
            else:
                raise InvalidRequestError(f"unexpected request {kind.__name__}")
        except BreakerError as exc:
            self._reply(msgid, None, exc)
            if isinstance(exc, VersionMismatchError):
                self.close()

    def _hello(self, msgid: int, hello: Hello) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self.log = self.log.bind(client=hello.client)
        if self.daemon.admin_peer is self and hello.client != ADMIN_CLIENT:
            self.log.warning("peer_refused", reason="too many connections", admin_slot=True)
            self._reply(
                msgid,
                None,
                InboxFullError(
                    f"too many connections (max_connections "
                    f"{self.daemon.settings.max_connections}); the one slot left is kept "
                    "for breakerd admin commands"
                ),
            )
            self.close()
            return
        version = negotiate_version(hello)
        self.admin = hello.client == ADMIN_CLIENT
        (self.log.debug if self.admin else self.log.info)("client_connected")
        table = self.daemon.state_table
        if table is not None and self._send_with_table(
            msgid, Welcome(version, SERVER_NAME, os.getpid(), table.slots), table.reader_fd
        ):
            return
        self._reply(msgid, Welcome(version, SERVER_NAME, os.getpid()), None)

    def _send_with_table(self, msgid: int, welcome: Welcome, table_fd: int) -> bool:
        """Send ``welcome`` with the table's descriptor attached; False if it cannot go first.

        The descriptor rides on the reply's first byte (``SCM_RIGHTS``), so a
        client finds it exactly when it reads its welcome. The transport
        must have nothing queued, or the reply would overtake it.
        """
        transport = self.transport
        if self.closed or transport is None or transport.get_write_buffer_size():
            return False
        data = self.conn.send_response(msgid, welcome)
        self.inflight -= 1
        sent = 0
        try:
            # A descriptor of its own: the transport keeps its socket object
            # (under uvloop a stand-in, not a socket.socket).
            raw = transport.get_extra_info("socket").fileno()
            with socket.socket(fileno=os.dup(raw)) as sock:
                sent = socket.send_fds(sock, [data], [table_fd])
        except OSError as exc:
            # Nothing went out; the client finds no descriptor and does without.
            self.log.warning("state_table_not_sent", error=str(exc))
        if sent < len(data):
            self._write(data[sent:])
        return True

    def _register(self, msgid: int, message: Register) -> None:
        daemon = self.daemon
        limit = daemon.settings.max_breakers_per_client
        if message.name not in self.names and len(self.names) >= limit:
            raise LimitExceededError(
                f"breaker {message.name!r} refused: this connection holds {limit} "
                f"breakers, its limit ([daemon] max_breakers_per_client)"
            )
        actor, conflicts = daemon.register(message.name, dict(message.config))
        if message.name not in self.names:
            self.names.add(message.name)
            daemon.hold(message.name, self)
        table = daemon.state_table
        slot = table.slot_for(message.name) if table is not None else 0
        self._reply(msgid, Registered(actor.snapshot, conflicts, slot), None)

    def _ask_actor(self, msgid: int, message: Any) -> None:
        actor = self.daemon.actor(message.name)
        if type(message) is Report and message.pid != self.peer_pid:
            message = dataclasses.replace(message, pid=self.peer_pid)
        if (
            type(message) is Report
            and message.lease
            and self.leases.pop((message.name, message.lease), None) is None
        ):
            # Not a lease granted on this connection: it settles nothing, as
            # a stale report settles nothing (another connection's trial
            # stays its own; half_open_calls stays a bound).
            self._reply(msgid, actor.snapshot, None)
            return
        if type(message) is Acquire:
            if message.successes:
                # Counted first; served inline, the acquire applies them.
                counts = ((message.name, message.successes_generation, message.successes),)
                self._post_counts(counts, (), deferred=True)

            def reply(result: Any, error: BaseException | None) -> None:
                if error is None and isinstance(result, Admission) and result.lease:
                    if self.closed:
                        # Granted after we left: give it straight back.
                        actor.ask(
                            Report(
                                message.name,
                                result.generation,
                                Outcome.CANCELLED,
                                lease=result.lease,
                            ),
                            None,
                            force=True,
                        )
                    else:
                        self.leases[(message.name, result.lease)] = result.generation
                self._reply(msgid, result, error)

            actor.ask(message, reply)
        else:
            if type(message) is Admin and message.fleet:
                self.daemon.fleet_admin(message)  # refused (raises) unless the link is up
            actor.ask(message, lambda result, error: self._reply(msgid, result, error))

    def _status(self, msgid: int, message: StatusRequest) -> None:
        daemon = self.daemon
        next_offset: int | None = None
        if message.name is not None:
            actors = [daemon.actor(message.name)]
        else:
            # A page at a time, so that every reply fits in one frame.
            everyone = sorted(daemon.system.actors(), key=lambda actor: actor.name)
            limit = min(message.limit or STATUS_PAGE, STATUS_PAGE)
            end = message.offset + limit
            actors = everyone[message.offset : end]
            if end < len(everyone):
                next_offset = end
        if not actors:
            self._reply(msgid, Status((), None), None)
            return
        results: dict[str, BreakerStatus] = {}
        failed: list[BaseException] = []
        fleet = daemon.fleet

        def collect(name: str) -> Callable[[Any, BaseException | None], None]:
            def on_status(result: Any, error: BaseException | None) -> None:
                if error is not None:
                    failed.append(error)
                else:
                    clients = len(daemon.subscribers.get(name, ()))
                    results[name] = dataclasses.replace(result, clients=clients)
                    if fleet is not None:
                        results[name] = dataclasses.replace(
                            results[name],
                            share=str(fleet.share_for(name)),
                            hosts_open=tuple(fleet.hosts_open(name)),
                        )
                if len(results) + len(failed) == len(actors):
                    if failed:
                        self._reply(msgid, None, failed[0])
                    else:
                        ordered = tuple(results[n] for n in sorted(results))
                        link = None if fleet is None else fleet.state
                        self._reply(msgid, Status(ordered, next_offset, link), None)

            return on_status

        for actor in actors:
            actor.ask(StatusRequest(actor.name), collect(actor.name), force=True)

    def _reports(self, message: object) -> None:
        if type(message) is not ReportBatch:
            return
        daemon = self.daemon
        system = daemon.system
        if not message.items:
            # Counts only (plain successes, local rejections): what a busy
            # client sends. The drain is armed once the whole read is handled
            # (data_received): a request behind the counts, served inline,
            # applies them first.
            self._post_counts(message.successes, message.rejections, deferred=True)
            return
        successes: dict[tuple[str, int], int] = {}
        busy: BreakerActor | None = None
        repeats = self.repeats
        for report in message.items:
            actor = system.get(report.name)
            if actor is None:
                repeats.warning(self.log, "report_for_unknown_breaker", breaker=report.name)
                continue
            if report.lease:
                if self.leases.pop((report.name, report.lease), None) is not None:
                    actor.ask(report, None, force=True)  # else not ours: stale
            elif report.outcome is Outcome.SUCCESS and (
                actor.config.slow_call_duration is None
                or report.duration <= actor.config.slow_call_duration
            ):
                key = (report.name, report.generation)
                successes[key] = successes.get(key, 0) + 1
            elif report.outcome is Outcome.RATE_LIMITED or not actor.post_report(
                (report.generation, report.outcome, report.duration)
            ):
                # The batched tuple form has no room for retry_after; a full
                # inbox still takes it, and this peer is paused below.
                actor.ask(dataclasses.replace(report, pid=self.peer_pid), None, force=True)
            if actor.backlog > actor.max_inbox // 2:
                busy = actor
        for name, generation, count in message.successes:
            key = (name, generation)
            successes[key] = successes.get(key, 0) + count
        self._post_counts(
            [(name, generation, count) for (name, generation), count in successes.items()],
            message.rejections,
            deferred=False,
        )
        if busy is not None:
            self._pause_until_drained(busy)

    def _post_counts(
        self,
        successes: Iterable[tuple[str, int, int]],
        rejections: Iterable[tuple[str, int]],
        *,
        deferred: bool,
    ) -> None:
        """Hand counted successes and local rejections to their actors.

        ``deferred``: arm no drain per actor; data_received arms one for each
        once the whole read is handled.
        """
        system = self.daemon.system
        for name, generation, count in successes:
            actor = system.get(name)
            if actor is None:
                self.repeats.warning(self.log, "report_for_unknown_breaker", breaker=name)
            elif deferred:
                actor.add_successes(generation, count, flush=False)
                self._unflushed.append(actor)
            else:
                actor.add_successes(generation, count)
        for name, count in rejections:
            actor = system.get(name)
            if actor is not None:
                actor.post_rejection(count)

    def _pause_until_drained(self, actor: BreakerActor) -> None:
        # Backpressure: stop reading this peer's socket until the actor has
        # caught up; its writes then block in its own process, not in ours.
        if self.transport is None or self.closed:
            return
        self.hold()
        loop = asyncio.get_running_loop()

        def resume() -> None:
            if self.closed:
                return
            if actor.backlog > actor.max_inbox // 4:
                loop.call_later(0.001, resume)
            else:
                self._release()

        loop.call_later(0.001, resume)
