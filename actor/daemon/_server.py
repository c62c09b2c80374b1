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
import grp
import os
import pwd
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import structlog

from breakerd.protocol import (
    Admin,
    BreakerError,
    CircuitState,
    InvalidRequestError,
    LimitExceededError,
    Snapshot,
    StatePush,
    TransitionEvent,
    UnknownBreakerError,
    frame_notification,
    new_packer,
)

from .._actor import BreakerActor
from .._budget_table import BudgetTable
from .._machine import BreakerConfig, Transition
from .._system import ActorSystem
from . import _systemd as systemd
from ._budget_waits import BudgetWaits
from ._config import DaemonSettings, MetricsUnavailableError
from ._fairness import LOG_SUMMARY_INTERVAL, ReadScheduler
from ._peer import SERVER_NAME, Peer
from ._reclaim import IdleBreakers, sweep_period
from ._reload import reload_config
from ._socket_file import (
    DaemonAlreadyRunningError,
    SocketFile,
    UnsafeSocketPathError,
    serve_unix,
)
from ._state_file import StateFile
from ._state_table import SharedStateTable, StateTableUnavailableError

if TYPE_CHECKING:
    from ._fleet import FleetLink
    from ._metrics import MetricsServer

__all__ = ["SERVER_NAME", "Daemon", "DaemonAlreadyRunningError", "UnsafeSocketPathError"]

#: Bytes read from a connection at a time, into the daemon's one receive buffer.
_READ_SIZE = 1 << 18


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
        self.peers: set[Peer] = set()
        #: The connections that hold each breaker (registered it), pushed its changes.
        #: A tuple, not a set: one or two a breaker, and an empty set costs 216 bytes.
        self.subscribers: dict[str, tuple[Peer, ...]] = {}
        #: Breakers no connection holds: reclaimed once idle long enough.
        self.idle = IdleBreakers(settings.breaker_idle_timeout)
        #: Connections that asked for transition events, and the breakers
        #: they asked about (empty: every breaker).
        self.watchers: dict[Peer, frozenset[str]] = {}
        #: Host-wide budgets (max_rate, max_concurrent, the API's headers) by breaker.
        self.budgets = BudgetTable()
        #: Answers to the lease requests waiting in line in ``budgets``.
        self.budget_waits = BudgetWaits(self.budgets, self.system.clock)
        #: The connection in the slot kept for the admin CLI, if taken.
        self.admin_peer: Peer | None = None
        #: pid -> connections it holds (SO_PEERCRED's pid, at connect time).
        self.connections_by_pid: dict[int, int] = {}
        #: Who is read when, once connections go over their read budget.
        self.reads: ReadScheduler[Peer] = ReadScheduler()
        self.uid = os.getuid()
        self.log = structlog.get_logger("breakerd.daemon")
        self._handle_signals = handle_signals
        self._stop = anyio.Event()
        self.socket_file = SocketFile(
            settings.socket_path, activated=listen_socket is not None, log=self.log
        )
        # Every connection reads into this one buffer: the loop is one thread,
        # and asyncio hands each read over (buffer_updated) before the next.
        # A plain Protocol would cost every read a fresh 256 KiB bytes object,
        # which glibc maps, shrinks and unmaps: three system calls and a page
        # fault per request.
        self.read_buffer = bytearray(_READ_SIZE)
        #: Every connection's encoder: they are all served from the loop thread.
        self.packer = new_packer()
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
        # Bound once, shared by every actor: a closure or a bound method per
        # breaker cost ~700 bytes of each of the 100,000 a daemon may hold.
        self._on_transition = self._push_transition
        self._on_publish = self._publish_snapshot
        self._state_file_listener = (
            None if self.state_file is None else self.state_file.on_transition
        )

    @property
    def socket_path(self) -> Path:
        return self.settings.socket_path

    @property
    def lock_path(self) -> Path:
        return self.socket_file.lock_path

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
        self.socket_file.take_lock()
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
                listener = self.listen_socket or self.socket_file.bind(
                    self.settings.socket_mode, self.settings.socket_gid
                )
                loop = asyncio.get_running_loop()
                server = await serve_unix(loop, lambda: Peer(self), listener)
                if self.listen_socket is None:
                    # Only now under its real name: whoever sees the file can
                    # connect, with the final mode. The log line comes after,
                    # so whoever reads it finds the socket in place too.
                    os.replace(self.socket_file.bind_path, self.socket_path)
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
            self.socket_file.remove()
            self.socket_file.release_lock()
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
            self.system.actors,
            self.system.clock,
            clients=lambda: len(self.peers),
            budgets=self.budgets.status,
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

    def hold(self, name: str, peer: Peer) -> None:
        """``peer`` registered ``name``: it gets its pushes, and it is not idle."""
        subscribers = self.subscribers.get(name, ())
        if peer not in subscribers:
            self.subscribers[name] = (*subscribers, peer)
        self.idle.held(name)

    def let_go(self, name: str, peer: Peer) -> None:
        """``peer`` is gone; ``name`` is idle from now if nobody else holds it."""
        subscribers = self.subscribers.get(name)
        if subscribers is None:
            return
        subscribers = tuple(other for other in subscribers if other is not peer)
        if subscribers:
            self.subscribers[name] = subscribers
        else:
            del self.subscribers[name]
            self.idle.let_go(name, self.system.clock())

    def reclaim_idle(self) -> list[str]:
        """Reclaim the breakers idle long enough that are closed and quiet; their names."""
        reclaimed = []
        now = self.system.clock()
        for name in self.idle.due(now):
            actor = self.system.get(name)
            if actor is None or name in self.subscribers:
                self.idle.forget(name)
                continue
            if actor.snapshot.state is not CircuitState.CLOSED or not actor.idle:
                # Open keeps its deadline, admin states stay until reset, and
                # outcomes still on their way are applied first: next sweep.
                continue
            if not self.budgets.reclaim(name, now):
                continue  # its budgets go with it, once quiet (a slot still ahead...)
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
        actor.listeners.append(self._on_transition)
        if self._state_file_listener is not None:
            # After the pushes (the state table has told every client already;
            # a push held back by a write would only reach fewer of them), but
            # before the request that caused the transition is answered.
            actor.listeners.append(self._state_file_listener)
        table = self.state_table
        if table is not None:
            table.slot_for(actor.name)  # given now, if the table has one left
        actor.on_publish = self._on_publish
        self._on_publish(actor.snapshot, None)  # the table's first word
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

    def _publish_snapshot(self, snapshot: Snapshot, previous: Snapshot | None) -> None:
        """What every breaker's actor calls with each snapshot it publishes.

        The state table first (a breaker without a slot has nothing written).
        Then a push when only ``successes_safe`` moved since ``previous`` (a
        transition's push is the listener's): a client without the table
        learns that its successes must now wait, or need not any more.
        """
        table = self.state_table
        if table is not None:
            table.publish(snapshot)
        if (
            previous is not None
            and snapshot.generation == previous.generation
            and snapshot.successes_safe is not previous.successes_safe
        ):
            self._push(snapshot.name, snapshot)

    def _push(self, name: str, snapshot: Snapshot) -> None:
        subscribers = self.subscribers.get(name)
        if not subscribers:
            return
        # Encoded once for every subscriber: all of them are past hello.
        frame = frame_notification(StatePush(snapshot))
        for peer in tuple(subscribers):
            peer.push_frame(frame)

    def _push_transition(self, transition: Transition, snapshot: Snapshot) -> None:
        """Every breaker's transition listener: its subscribers' push, then the watchers'."""
        self._push(snapshot.name, snapshot)
        if self.watchers:
            # After the clients' pushes: an operator's tail can wait a little.
            self._push_event(snapshot.name, transition)

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
