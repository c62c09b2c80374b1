"""The sans-IO core of a daemon client: everything but the socket.

A shell keeps one ``ClientCore`` for its whole life and calls ``connect()``
for each new socket. The core holds the logic of the client side of the
protocol:

* msgid allocation and the pending table (msgid -> reply callback and the
  instant after which the shell should give up on the daemon);
* the per-breaker state cache: the newest ``Snapshot`` of each breaker, from
  replies and ``state`` pushes alike;
* report batching: fire-and-forget outcomes queue up here and leave as one
  ``reports`` notification (split so no frame nears the size limit); plain
  successes are *tallies*, one list per breaker and generation to which a
  link appends (atomic under the GIL), taken whole at flush time: the
  flusher's cost per batch does not grow with the successes in it;
* error mapping: replies that carry an error complete with that
  ``BreakerError``; a lost connection completes every pending request with
  ``DaemonUnavailableError`` naming the socket and the reason.

No sockets, no threads, no clock: the shell passes ``now`` in, feeds the bytes
it reads to ``receive_data``, writes the bytes the methods return, and runs
the ``Action`` values they hand back (outside its lock: a reply callback may
do anything). It is not thread-safe, except ``post``, whose single
``deque.append`` is atomic under the GIL so the hot path can skip the shell's
lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from breakerd.protocol import (
    MAX_FRAME_SIZE,
    MAX_MSGID,
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PROTOCOL_VERSION,
    Acquire,
    Admission,
    BreakerError,
    ConnectionClosed,
    DaemonUnavailableError,
    Hello,
    NotificationReceived,
    Outcome,
    ProtocolError,
    Registered,
    RemoteProtocolError,
    Report,
    ReportBatch,
    RequestMessage,
    ResponseReceived,
    Snapshot,
    StatePush,
    Status,
)
from breakerd.protocol import Connection as _Connection

__all__ = [
    "Action",
    "ClientCore",
    "Completion",
    "NotConnectedError",
    "Reply",
    "ReportItem",
    "SnapshotChanged",
]

#: ``reply(result, None)`` or ``reply(None, error)``, called exactly once.
Reply: TypeAlias = Callable[[Any, BaseException | None], None]

#: A queued fire-and-forget outcome:
#: ``(name, generation, outcome, duration, lease, retry_after)``, the field
#: order of a ``reports`` item on the wire. A tuple, not a ``Report``: it is
#: built on the caller's hot path, the ``Report`` only at flush time.
_SUCCESS: Final = Outcome.SUCCESS
ReportItem: TypeAlias = tuple[str, int, Outcome, float, int, float | None]

#: Queued outcomes beyond this are refused (``post`` returns False), so a
#: process that outruns its flusher falls back to requests, which push back.
DEFAULT_MAX_QUEUED_REPORTS: Final = 100_000
#: Success tallies kept per breaker: the current generation's and a few older
#: ones, so a thread that read a tally just before the generation moved on
#: still has its success taken (for the daemon's totals).
_TALLIES_PER_BREAKER: Final = 4

# A ``reports`` item costs its name plus at most ~50 bytes of msgpack (array
# header, a 9-byte generation, the outcome string, a 9-byte float, a lease, a
# retry_after). Frames are cut at half the limit so the estimate never has to
# be exact.
_ITEM_OVERHEAD: Final = 56
_BATCH_BUDGET: Final = MAX_FRAME_SIZE // 2


@dataclass(frozen=True, slots=True)
class Completion:
    """Run ``reply(result, error)``: the end of one request."""

    reply: Reply
    result: Any
    error: BaseException | None

    def run(self) -> None:
        self.reply(self.result, self.error)


@dataclass(frozen=True, slots=True)
class SnapshotChanged:
    """The cached state of breaker ``snapshot.name`` moved on (``previous`` was cached)."""

    snapshot: Snapshot
    previous: Snapshot | None


Action: TypeAlias = Completion | SnapshotChanged


class NotConnectedError(BreakerError, RuntimeError):
    """``request`` was called with no connection (a bug in the shell, or a race it handles)."""


class ClientCore:
    """Protocol logic of one daemon client, free of IO.

    Args:
        socket_path: Only for error messages: which daemon was unavailable.
        client: Name sent in ``hello``.
        pid: Process id sent in ``hello``.
        request_timeout: Seconds a request may wait for its reply before the
            shell should consider the daemon hung (see ``next_deadline``).
        max_queued_reports: Bound on outcomes waiting for a flush.
    """

    def __init__(
        self,
        *,
        socket_path: str,
        client: str,
        pid: int,
        request_timeout: float = 5.0,
        max_queued_reports: int = DEFAULT_MAX_QUEUED_REPORTS,
    ) -> None:
        if request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {request_timeout!r}")
        if max_queued_reports < 1:
            raise ValueError(f"max_queued_reports must be >= 1, got {max_queued_reports!r}")
        self.socket_path = socket_path
        self.client = client
        self.pid = pid
        self.request_timeout = request_timeout
        self.max_queued_reports = max_queued_reports
        #: The newest snapshot of each breaker seen on the current connection.
        self.snapshots: dict[str, Snapshot] = {}
        #: Why the current connection must be dropped (a protocol error), if it must.
        self.failure: str | None = None
        self._conn: _Connection | None = None
        # Insertion order is deadline order: every request gets the same
        # timeout and `now` never goes back, so the first entry expires first.
        self._pending: dict[int, tuple[Reply, float]] = {}
        self._next_msgid = 1
        self._reports: deque[ReportItem] = deque()
        # (name, generation) -> tally: plain successes, one entry each.
        self._tallies: dict[tuple[str, int], list[int]] = {}
        # Actions of a receive_data call that did not return (interrupted):
        # the next call, or connection_lost, hands them over.
        self._undelivered: list[Action] = []
        # Names of breakers that rejected a call locally, one entry per call.
        self._rejections: deque[str] = deque()
        # name -> tally of local rejections (a count each), kept for the
        # core's life so a link holds its list for good; emptied, never dropped.
        self._rejection_tallies: dict[str, list[int]] = {}
        self._name_sizes: dict[str, int] = {}

    # -- the connection's lifetime ---------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def connect(self, on_welcome: Reply, now: float) -> bytes:
        """Start a new connection: the bytes of its ``hello``.

        ``on_welcome`` completes with the ``Welcome`` or the daemon's error.
        Outcomes queued before this belong to another connection (perhaps
        another daemon, whose generations mean nothing here) and are dropped.
        """
        if self._conn is not None:
            raise RuntimeError("connect() while connected: call connection_lost() first")
        self._conn = _Connection("client")
        self.failure = None
        self.snapshots.clear()
        self._drop_queued()
        hello = Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, self.client, self.pid)
        return self.request(hello, on_welcome, now, flush=False)

    def connection_lost(self, reason: str) -> list[Action]:
        """The socket is gone: every pending request fails with ``DaemonUnavailableError``.

        Queued outcomes are dropped: the daemon that should have counted them
        is unreachable, and a later daemon would not know their generations.
        """
        self._conn = None
        self._drop_queued()
        pending = list(self._pending.values())
        self._pending.clear()
        error = self.unavailable_error(reason)
        actions, self._undelivered = self._undelivered, []
        actions.extend(Completion(reply, None, error) for reply, _ in pending)
        return actions

    def _drop_queued(self) -> None:
        self._reports.clear()
        for tally in list(self._tallies.values()):
            del tally[:]
        self._tallies.clear()
        for rejected in list(self._rejection_tallies.values()):
            del rejected[:]

    def unavailable_error(self, reason: str) -> DaemonUnavailableError:
        return DaemonUnavailableError(
            f"the breakerd daemon at {self.socket_path} is unavailable: {reason}"
        )

    # -- requests --------------------------------------------------------------------

    def request(
        self, message: RequestMessage, reply: Reply, now: float, *, flush: bool = True
    ) -> bytes:
        """The bytes of a request; ``reply`` will complete it.

        With ``flush`` (the default) queued outcomes go first, so the daemon
        applies a caller's earlier successes before its next request, as the
        in-process actor does with its FIFO inbox.

        Raises ``NotConnectedError`` without a connection and ``ProtocolError``
        when the message cannot be sent (the connection is then dead:
        ``failure`` says why).
        """
        return self.send_request(message, reply, now, flush=flush)[1]

    def send_request(
        self, message: RequestMessage, reply: Reply, now: float, *, flush: bool = True
    ) -> tuple[int, bytes]:
        """``request``, and the msgid it got: ``is_pending(msgid)`` until its reply is in."""
        conn = self._conn
        if conn is None:
            raise NotConnectedError("no connection to the daemon")
        msgid = self._allocate_msgid()
        head = b""
        if flush and (self._reports or self._rejections or self._tallied()):
            message = self._fold_successes(message)
            if self._reports or self._rejections or self._tallied():
                head = self.take_batch()
        try:
            data = conn.send_request(msgid, message)
        except ProtocolError as exc:
            self.failure = f"cannot send a request: {exc}"
            raise
        self._pending[msgid] = (reply, now + self.request_timeout)
        return msgid, head + data if head else data

    def _fold_successes(self, message: RequestMessage) -> RequestMessage:
        # A strict caller's queued successes ride on its next acquire: the
        # daemon decodes one frame instead of two.
        if (
            type(message) is not Acquire
            or self._reports
            or self._rejections
            or message.successes
            or any(self._rejection_tallies.values())
        ):
            return message
        found: tuple[int, list[int]] | None = None
        for (name, generation), tally in list(self._tallies.items()):
            if tally:
                if found is not None or name != message.name:
                    return message
                found = (generation, tally)
        if found is None:
            return message
        generation, tally = found
        taken = len(tally)
        del tally[:taken]  # one entry per success: the length is the count
        return Acquire(message.name, taken, generation)

    def _tallied(self) -> bool:
        return any(self._tallies.values()) or any(self._rejection_tallies.values())

    def _allocate_msgid(self) -> int:
        msgid = self._next_msgid
        pending = self._pending
        # msgids wrap at 2**32; skip any still waiting for its reply.
        while msgid in pending:
            msgid = msgid + 1 if msgid < MAX_MSGID else 1
        self._next_msgid = msgid + 1 if msgid < MAX_MSGID else 1
        return msgid

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    def is_pending(self, msgid: int) -> bool:
        """True until the reply to ``msgid`` is in (or the connection is lost).

        Its ``Completion`` is among the actions of the ``receive_data`` (or
        ``connection_lost``) call that ends this. One dict lookup, atomic under
        the GIL: a shell may ask without its lock.
        """
        return msgid in self._pending

    def next_deadline(self) -> float | None:
        """When the oldest pending request times out (None: nothing pending)."""
        for _, deadline in self._pending.values():
            return deadline
        return None

    def timed_out(self, now: float) -> bool:
        """True when some request has waited past its deadline: drop the connection."""
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline

    # -- fire-and-forget outcomes ---------------------------------------------------------

    def post(self, item: ReportItem) -> bool:
        """Queue one outcome for the next batch. False when the queue is full.

        Safe from any thread without the shell's lock (one ``deque.append``).
        """
        reports = self._reports
        if len(reports) >= self.max_queued_reports:
            return False
        reports.append(item)
        return True

    def post_rejection(self, name: str) -> bool:
        """Count one local rejection for the next batch (one ``deque.append``)."""
        rejections = self._rejections
        if len(rejections) >= self.max_queued_reports:
            return False  # status totals only: dropping beats growing without bound
        rejections.append(name)
        return True

    def success_tally(self, name: str, generation: int) -> list[int]:
        """The list to which a link appends ``1`` per plain success of ``name``
        admitted under ``generation`` (no lock: ``list.append``), bounded by
        ``max_queued_reports`` by the appender. Any thread."""
        key = (name, generation)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies.setdefault(key, [])
            self._forget_old_tallies(name)
        return tally

    def rejection_tally(self, name: str) -> list[int]:
        """The list to which a link appends the count of each local rejection
        of ``name`` (no lock: ``list.append``), bounded by the appender. Any thread."""
        rejected = self._rejection_tallies.get(name)
        if rejected is None:
            rejected = self._rejection_tallies.setdefault(name, [])
        return rejected

    def _forget_old_tallies(self, name: str) -> None:
        keys = [key for key, tally in list(self._tallies.items()) if key[0] == name]
        for key in keys[:-_TALLIES_PER_BREAKER]:
            if not self._tallies.get(key, True):
                self._tallies.pop(key, None)  # empty: its successes were taken

    @property
    def queued_reports(self) -> int:
        return len(self._reports) + sum(len(tally) for tally in list(self._tallies.values()))

    def take_batch(self) -> bytes:
        """Every queued outcome as ``reports`` notifications (``b""`` if none or no connection)."""
        reports = self._reports
        conn = self._conn
        if conn is None:
            self._drop_queued()
            return b""
        chunks: list[bytes] = []
        items: list[Report] = []
        size = 0
        sizes = self._name_sizes
        # Reports are immutable, so equal items share one: a batch is mostly
        # the same plain success over and over, and building a frozen
        # dataclass per item would cost more than everything else here.
        made: dict[ReportItem, Report] = {}
        # Plain successes leave as counts per (name, generation): a busy
        # process sends one entry per breaker, not one per call.
        successes: dict[tuple[str, int], int] = {}
        for key, tally in list(self._tallies.items()):
            taken = len(tally)
            if taken:
                # One entry per success: the length is the count, and one
                # slice deletion takes them all, whatever their number.
                del tally[:taken]
                successes[key] = taken
        popleft = reports.popleft
        # popleft until empty (one flusher at a time: the shell's lock) rather
        # than up to a length read first: posters may append meanwhile, and
        # what they add either leaves now or waits for the next flush.
        while reports:
            item = popleft()
            if item[2] is _SUCCESS and not item[3] and not item[4] and item[5] is None:
                key = (item[0], item[1])
                successes[key] = successes.get(key, 0) + 1
                continue
            report = made.get(item)
            if report is None:
                report = made[item] = Report(*item)
            item_size = sizes.get(report.name)
            if item_size is None:
                item_size = sizes[report.name] = len(report.name.encode()) + _ITEM_OVERHEAD
            if size + item_size > _BATCH_BUDGET and items:
                chunks.append(self._notification(conn, items))
                items = []
                size = 0
            items.append(report)
            size += item_size
        if items:
            chunks.append(self._notification(conn, items))
        rejected: dict[str, int] = {}
        rejections = self._rejections
        while rejections:
            name = rejections.popleft()
            rejected[name] = rejected.get(name, 0) + 1
        for name, tally in list(self._rejection_tallies.items()):
            taken = len(tally)
            if taken:
                count = sum(tally[:taken])
                del tally[:taken]
                rejected[name] = rejected.get(name, 0) + count
        if successes or rejected:
            counts = ReportBatch(
                (),
                tuple((name, generation, n) for (name, generation), n in successes.items()),
                tuple(rejected.items()),
            )
            # Counts first: a thread's successes count before its later outcomes.
            chunks.insert(0, self._send_batch(conn, counts))
        return b"".join(chunks)

    def _notification(self, conn: _Connection, items: list[Report]) -> bytes:
        return self._send_batch(conn, ReportBatch(tuple(items)))

    def _send_batch(self, conn: _Connection, batch: ReportBatch) -> bytes:
        try:
            return conn.send_notification(batch)
        except ProtocolError as exc:
            self.failure = f"cannot send reports: {exc}"
            raise

    # -- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Action]:
        """Feed bytes read from the socket; returns what to run, in order.

        For a reply that carries snapshots, the ``SnapshotChanged`` actions come
        before its ``Completion``, so a caller woken by the reply already
        sees the new state (read your own writes).

        Never raises for what the bytes say: a protocol violation sets
        ``failure`` (the shell must drop the connection) and returns the
        actions of the frames before it. ``data`` must not be empty: the shell
        calls ``connection_lost`` at EOF.
        """
        conn = self._conn
        if conn is None or self.failure is not None:
            return []
        # Appended to in place: if this call is interrupted (an exception
        # raised in the middle of it by a signal handler), the replies it took
        # out of the pending table are still here for connection_lost.
        actions = self._undelivered
        try:
            conn.receive_data(data)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, ResponseReceived):
                    self._response(event, actions)
                elif isinstance(event, NotificationReceived):
                    message = event.message
                    if isinstance(message, StatePush):
                        self._note(message.snapshot, actions)
                elif isinstance(event, ConnectionClosed):  # pragma: no cover - b"" never fed
                    break
                else:  # pragma: no cover - Connection refuses requests from a server
                    raise RemoteProtocolError("the daemon sent a request")
        except ProtocolError as exc:
            self.failure = f"protocol error: {exc}"
        self._undelivered = []
        return actions

    def _response(self, event: ResponseReceived, actions: list[Action]) -> None:
        entry = self._pending.pop(event.msgid, None)
        if entry is None:
            raise RemoteProtocolError(f"a reply to msgid {event.msgid}, which is not pending")
        reply = entry[0]
        if event.error is not None:
            actions.append(Completion(reply, None, event.error))
            return
        result = event.result
        if isinstance(result, Snapshot):
            self._note(result, actions)
        elif isinstance(result, (Admission, Registered)):
            self._note(result.snapshot, actions)
        elif isinstance(result, Status):
            for status in result.breakers:
                self._note(status.snapshot, actions)
        actions.append(Completion(reply, result, None))

    def _note(self, snapshot: Snapshot, actions: list[Action]) -> None:
        previous = self.snapshots.get(snapshot.name)
        # Replies and pushes travel in the order the daemon wrote them, which
        # need not be the order its actor made them; the generation only moves
        # forward within one daemon, so an older one is stale news.
        if previous is not None and snapshot.generation < previous.generation:
            return
        if previous == snapshot:
            return
        self.snapshots[snapshot.name] = snapshot
        actions.append(SnapshotChanged(snapshot, previous))
