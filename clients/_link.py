"""One breaker's link to the daemon: what a ``CircuitBreaker`` holds in daemon mode.

``RemoteBreaker`` is a ``BreakerHandle`` (``_handle``), as ``BreakerActor`` is;
its ``admit`` and ``snapshot`` read one word of the daemon's state table
(``_table_reader``: the slot's ``seq``) per call. It talks to its
``DaemonClient`` through the client's public methods, and the client calls it
back through ``LinkEvents``; while the daemon is out of reach, its
``on_unavailable`` policy (``_fallback``) serves in its place.

The hot path (a success while ``closed``) takes no lock: a tally append in
the client's core, and ``DaemonClient.arm_flush`` when no flush is armed.
While a success may change the state (``Snapshot.successes_safe`` is false)
the link's tally key matches no generation: the facade asks and waits.

A request that goes to the daemon carries one reply wrapper, ``_Answer``,
around the caller's own reply: a sync caller's ``SyncReply``, or an async
caller's, which settles an asyncio future with ``loop.call_soon_threadsafe``
(the facade's ``_request_async``), so there is no separate anyio shell.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Final, cast

from breakerd.actor import (
    ActorSystem,
    BreakerActor,
    BreakerConfig,
    Transition,
    TransitionReason,
    library_logger,
)
from breakerd.protocol import (
    Acquire,
    ActorStoppedError,
    Admin,
    Admission,
    BreakerError,
    CircuitState,
    DaemonUnavailableError,
    Outcome,
    Registered,
    Report,
    RequestMessage,
    Snapshot,
    Status,
    StatusRequest,
    UnknownBreakerError,
)

from ._core import Reply
from ._daemon_client import DaemonClient
from ._fallback import (
    LOCAL_GENERATION_OFFSET,
    NO_GENERATION,
    ON_UNAVAILABLE,
    Fallback,
    LocalFallback,
    OnUnavailable,
    make_fallback,
)
from ._globals import get_client
from ._plan import plain_generation
from ._replies import SyncReply, answer, ignore_reply
from ._table_reader import read_snapshot

__all__ = ["RemoteBreaker"]

#: A link's tally key while successes must be sent as requests: no permit has it.
_ASK_FOR_SUCCESSES: Final = -(1 << 62)
#: What a link forwards to the daemon; anything else is answered by the policy.
_DAEMON_REQUESTS: Final[frozenset[type]] = frozenset({Acquire, Admin, Report, StatusRequest})
#: What a call waits on (at most daemon_timeout); admin and status wait for the daemon.
_CALL_REQUESTS: Final[frozenset[type]] = frozenset({Acquire, Report})
_SUCCESS: Final = Outcome.SUCCESS
# An _Answer's states: a bounded one settles once, between the answer and expire().
_PENDING, _ANSWERED, _EXPIRED, _LATE = range(4)

_logger = library_logger()


class RemoteBreaker:
    """One breaker as seen through a ``DaemonClient``: the facade's actor in daemon mode.

    While registered on the live connection it shows the daemon's snapshot and
    sends outcomes there; otherwise its ``on_unavailable`` policy serves
    (``fallback``: ``"local"``, an in-process breaker from ``system`` or the
    default system; ``"allow"``, fail open; ``"deny"``, fail closed).

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
        "_announce_lock",
        "_announced",
        "_live_words",
        "_log",
        "_plain",
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
        "_tally",
        "_unstarted",
        "client",
        "config",
        "conflicts",
        "daemon_timeout",
        "fallback",
        "listeners",
        "name",
        "on_unavailable",
        "seen",
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
        self._remote = False
        self._remote_snapshot = Snapshot(name, CircuitState.CLOSED, NO_GENERATION)
        self._plain: int | None = None  # admit()'s answer for _remote_snapshot (see _show)
        self.seen = self._remote_snapshot  # what admit() last answered from (BreakerHandle)
        # The breaker's slot in the daemon's state table (None: no table), and
        # the slot's seq when _remote_snapshot last caught up with it.
        self._slot_words: memoryview | None = None
        # _slot_words while the daemon's breaker is in use, else None: the hot
        # path's one test (see _sync_live, called wherever either changes).
        self._live_words: memoryview | None = None
        self._slot_seq = -1
        #: What serves while the daemon is out of reach (see ``_fallback``).
        self.fallback: Fallback = make_fallback(
            on_unavailable, name, client, config, system, self._fallback_transition
        )
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
        fallback = self.fallback
        return fallback.actor if isinstance(fallback, LocalFallback) else None

    def in_own_thread(self) -> bool:
        """True in a thread that must never wait for this link (it would wait for itself)."""
        return self.client.in_io_thread() or self.fallback.in_own_thread()

    def admit(self) -> int | None:
        words = self._live_words  # the snapshot property's common case, minus the property
        if words is not None and words[0] == self._slot_seq:
            return self._plain
        snapshot = self.seen = self.snapshot  # the daemon's or the policy's; may connect
        return plain_generation(snapshot)

    @property
    def snapshot(self) -> Snapshot:
        # The common case first: the table's slot has not moved since last read.
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
        read = read_snapshot(words, current)
        if read is None:
            return current  # mid-write on every try (a daemon killed writing): keep ours
        snapshot, seq = read
        if snapshot is not current:
            self._show(snapshot)
        self.seen = snapshot  # then the seq: a thread that sees it finds what was made of it
        self._slot_seq = seq
        return snapshot

    def _show(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the daemon's state as this link shows it (any thread)."""
        self._remote_snapshot = snapshot  # and `seen` before _plain: see BreakerHandle.seen
        if self._remote:
            self.seen = snapshot
        self._plain = plain_generation(snapshot)
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
        return self.fallback.snapshot

    def post_success(self, generation: int) -> bool:
        key, tally = self._tally
        if key == generation:
            if len(tally) >= self._queue_limit:
                return False
            tally.append(1)
            client = self.client
            if not client.flush_armed:
                client.arm_flush()
            return True
        return self._post_success_slow(generation)

    def _post_success_slow(self, generation: int) -> bool:
        if generation >= LOCAL_GENERATION_OFFSET:
            return self.fallback.post_success(generation)
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
            return self.fallback.post_report(item)
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
                if not client.flush_armed:
                    client.arm_flush()
        else:
            self.fallback.post_rejection(count)

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
                answer(reply, None, exc)
                return
        limit = self._wait_limit(message, reply)
        sent = self._ask(message, reply, force, False, bounded=limit is not None)
        if limit is None or sent is None or sent.settled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to time it on: request_timeout bounds it
        loop.call_later(limit, sent.expire, limit)

    def ask_sync(self, message: object, *, force: bool = False) -> Any:
        """``ask``, and wait in this thread: the result, or the error raised.

        A request that goes to the daemon is read off the socket by this
        thread if no other thread is reading (``DaemonClient.request(read=True)``).
        An acquire or a report waits at most ``daemon_timeout`` for it; then
        the policy answers.
        """
        self.ensure_started()
        waiter = SyncReply()
        limit = self._wait_limit(message, waiter)
        if limit is None:
            self._ask(message, waiter, force, True)
            return waiter.wait()
        deadline = time.monotonic() + limit
        sent = self._ask(message, waiter, force, True, limit, bounded=True)
        if sent is not None and not waiter.ready(deadline - time.monotonic()):
            sent.expire(limit)
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

    def _ask(
        self,
        message: object,
        reply: Reply | None,
        force: bool,
        read: bool,
        read_timeout: float | None = None,
        *,
        bounded: bool = False,
    ) -> _Answer | None:
        # The request's _Answer if it went to the daemon; None if answered here.
        kind = type(message)
        if type(message) is Report:
            name, generation = message.name, message.generation
            if generation >= LOCAL_GENERATION_OFFSET:
                self._ask_unavailable(message, reply, force)  # admitted by the policy: its own
                return None
            if generation < 0:
                answer(reply, self.snapshot, None)  # admitted by "allow": counted nowhere
                return None
            if not self._remote:
                self._ask_unavailable(message, reply, force)  # the daemon went away meanwhile
                return None
            if (
                reply is None
                and not message.lease
                and self.client.post(
                    (name, generation, message.outcome, message.duration, 0, message.retry_after)
                )
            ):
                return None  # fire and forget: batched like post_report
        if self._remote and kind in _CALL_REQUESTS and reply is not None and self.client.stalled:
            # The daemon left a caller waiting in vain: do not make this one wait too.
            self._ask_unavailable(message, reply, force)
            return None
        if self._remote and kind in _DAEMON_REQUESTS:
            sent = _Answer(self, message, reply, force, bounded)
            if self.client.request(
                cast(RequestMessage, message), sent, read=read, read_timeout=read_timeout
            ):
                return sent
        self._ask_unavailable(message, reply, force)
        return None

    def _ask_unavailable(self, message: object, reply: Reply | None, force: bool) -> None:
        self.fallback.ask(message, reply, force=force)

    def _fallback_transition(self, transition: Transition, snapshot: Snapshot) -> None:
        if self._remote:
            return  # the daemon's state is the one shown
        with self._announce_lock:
            self._announced = transition.to_state
        self._notify(transition, snapshot)

    # -- called by the client (LinkEvents), in the thread reading or giving up -------------

    def registration(self, epoch: int) -> Reply:
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

    def daemon_snapshot(self, snapshot: Snapshot) -> None:
        if self._slot_words is not None and snapshot.generation < self._remote_snapshot.generation:
            return  # the table showed a newer state first; its push is on the way
        self._show(snapshot)
        # The table may be newer than this reply (it is written before any
        # reply leaves): the next read of the slot has the last word.
        self._slot_seq = -1
        if self._remote:
            self._announce(snapshot, "daemon")

    def suspend(self) -> None:
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

    def resume(self) -> None:
        if not self._suspended:
            return
        self._suspended = False
        self._slot_seq = -1  # catch up with the table first
        self._remote = True
        self._sync_live()
        self._announce(self.snapshot, "daemon_available")

    def daemon_lost(self, *, announce: bool) -> None:
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


class _Answer:
    """The reply a link hands its client for one request: the daemon's answer, made the caller's.

    The one wrapper between the client and the caller's own reply. It maps
    the answer: a request the daemon could not answer (the connection went)
    goes to the policy, as if it had come after; a status list becomes this
    breaker's status. A ``bounded`` one (a caller that stops waiting at
    ``daemon_timeout``) settles once, between the answer and ``expire``:
    expired, the policy answers the caller, and an answer that comes after
    only gives back a trial lease nobody holds. One that comes again (a
    dispatch run twice after an interrupt) is dropped.
    """

    __slots__ = ("_force", "_link", "_lock", "_message", "_reply", "_state")

    def __init__(
        self, link: RemoteBreaker, message: object, reply: Reply | None, force: bool, bounded: bool
    ) -> None:
        self._link = link
        self._message = message
        self._reply = reply
        self._force = force
        self._lock = threading.Lock() if bounded else None
        self._state = _PENDING

    @property
    def settled(self) -> bool:
        return self._state != _PENDING

    def __call__(self, result: Any, error: BaseException | None) -> None:
        lock = self._lock
        if lock is not None:
            with lock:
                state = self._state
                if state == _PENDING:
                    self._state = _ANSWERED
                elif state == _EXPIRED:
                    self._state = _LATE
            if state != _PENDING:
                if state == _EXPIRED:
                    self._give_back(result)
                return
        link, reply = self._link, self._reply
        if error is not None:
            if isinstance(error, (DaemonUnavailableError, ActorStoppedError)):
                # The daemon went away under this request: answer it as if
                # it had come after (the policy counts an outcome, if any does).
                link._ask_unavailable(self._message, reply, self._force)
            elif reply is None:
                link._log.warning("daemon_report_failed", error=str(error))
            else:
                reply(None, error)
            return
        if type(self._message) is StatusRequest and isinstance(result, Status):
            # The facade wants what an actor answers: this breaker's status.
            mine = [s for s in result.breakers if s.snapshot.name == link.name]
            if not mine:
                answer(reply, None, UnknownBreakerError(f"no breaker {link.name!r}"))
                return
            result = mine[0]
        answer(reply, result, None)

    def _give_back(self, result: Any) -> None:
        # The daemon answered a caller that had given up on it: a trial lease
        # it granted would be held by nobody until its deadline (and then
        # count as a failure). Give it back.
        if isinstance(result, Admission) and result.admitted and result.lease:
            link = self._link
            release = Report(link.name, result.generation, Outcome.CANCELLED, lease=result.lease)
            link.client.request(release, ignore_reply)

    def expire(self, waited: float) -> None:
        """The caller waited ``waited`` seconds in vain: the policy answers it, unless answered."""
        lock = self._lock
        assert lock is not None
        with lock:
            if self._state != _PENDING:
                return  # answered in time
            self._state = _EXPIRED
        link = self._link
        link.client.note_stalled(waited)
        link._ask_unavailable(self._message, self._reply, self._force)
