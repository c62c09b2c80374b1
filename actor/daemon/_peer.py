"""One client connection to the daemon: hello, requests, reports, pushes, limits.

An ``asyncio.BufferedProtocol`` around the sans-IO
``breakerd.protocol.Connection``: bytes in, messages out, and the messages go
to the breaker actors' inboxes exactly as an in-process proxy's would. It
reads into the daemon's one receive buffer and answers from the loop thread.
Everything that protects the other clients from this one (its peer
credentials, its limits, its read budget, its leases) is enforced here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from breakerd.protocol import (
    NEED_DATA,
    Acquire,
    Admin,
    Admission,
    BreakerError,
    BreakerStatus,
    BudgetGrant,
    BudgetRequest,
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
    Status,
    StatusRequest,
    Subscribe,
    Subscribed,
    VersionMismatchError,
    Welcome,
    negotiate_version,
)

from .._actor import BreakerActor
from ._fairness import RepeatedEvents

if TYPE_CHECKING:
    from ._server import Daemon

__all__ = ["ADMIN_CLIENT", "SERVER_NAME", "STATUS_PAGE", "Peer"]

#: What the daemon calls itself in its welcome.
SERVER_NAME = "breakerd/0.1"

_PEERCRED = struct.Struct("3i")
_connection_ids = itertools.count(1)
#: What the admin CLI (``clients/_admin.py``) calls itself in its hello: the
#: one client the reserved connection slot is kept for.
ADMIN_CLIENT = "breakerd-cli"
#: Breakers per status page: ~200 bytes each plus the name, far below a frame.
STATUS_PAGE = 1000


class Peer(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.conn = Connection("server", max_frame_size=1 << 20, packer=daemon.packer)
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
        # Its max_concurrent leases, to whoever waits for one; its own waits dropped.
        released += daemon.budgets.forget(self, daemon.system.clock())
        daemon.budget_waits.settle()
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
            elif kind is BudgetRequest:
                self._budget(msgid, message)  # type: ignore[arg-type]
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

    def _budget(self, msgid: int, message: BudgetRequest) -> None:
        if message.name not in self.names:
            # Budgets exist only for breakers, so they are bounded as breakers are.
            raise InvalidRequestError(
                f"budget of breaker {message.name!r} asked before registering the breaker"
            )
        daemon = self.daemon
        grant = daemon.budgets.answer_or_park(self, msgid, message, daemon.system.clock())
        if grant is not None:
            self._reply(msgid, grant, None)
        # Leases it released may have gone to others waiting; it may wait itself.
        daemon.budget_waits.settle()

    def answer_budget(self, msgid: int, grant: BudgetGrant) -> None:
        """Answer a budget request that waited in line (a lease handed over, or refused)."""
        self._reply(msgid, grant, None)

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
                    budget = daemon.budgets.status(name, daemon.system.clock())
                    results[name] = dataclasses.replace(result, clients=clients, budget=budget)
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
