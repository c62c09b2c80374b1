"""The ``on_unavailable`` policies: what a daemon-mode breaker does with its daemon out of reach.

A link (``_link.RemoteBreaker``) holds one policy for its whole life and
hands it everything the daemon cannot take: the snapshot to show, the
requests to answer, the outcomes of calls the policy itself admitted. Each
policy is a full ``BreakerHandle`` (``_handle``), so the link hands it all
through that one protocol: ``admit``/``seen``/``snapshot``, ``ask`` (an
acquire, status, admin, and any report: one the daemon admitted before it
went away, or one of the policy's own generations), the ``post_*`` outcomes,
and ``listeners`` (the local breaker's transitions, as the link shows them).

* ``"local"`` (``LocalFallback``): an in-process breaker with the same
  settings, from the link's actor system (or the process-wide default);
* ``"allow"`` (``AllowFallback``): fail open, a ``closed`` snapshot and
  nothing recorded;
* ``"deny"`` (``DenyFallback``): fail closed, every acquire answered with
  ``DaemonUnavailableError``.

Generations
-----------
While the daemon is out of reach with ``on_unavailable="local"``, the link
shows the local breaker's snapshots with generations moved up by
``LOCAL_GENERATION_OFFSET``: an outcome carries the generation of the
snapshot that admitted it, so it goes back to the breaker that admitted it
even if the daemon came back meanwhile (a local trial lease must return to
the local breaker, a daemon lease must never reach it). ``allow`` admits with
generation ``NO_GENERATION`` (-1), and those outcomes are not counted anywhere.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeAlias

from breakerd.actor import (
    ActorSystem,
    BreakerActor,
    BreakerConfig,
    Transition,
    default_system,
    library_logger,
)
from breakerd.protocol import (
    Acquire,
    Admission,
    BreakerError,
    BreakerStatus,
    CircuitState,
    DaemonUnavailableError,
    Outcome,
    Report,
    Snapshot,
)

from ._core import Reply
from ._plan import plain_generation
from ._replies import answer

if TYPE_CHECKING:
    from ._daemon_client import DaemonClient

__all__ = [
    "LOCAL_GENERATION_OFFSET",
    "NO_GENERATION",
    "ON_UNAVAILABLE",
    "AllowFallback",
    "DenyFallback",
    "Fallback",
    "LocalFallback",
    "OnUnavailable",
    "make_fallback",
]

OnUnavailable: TypeAlias = Literal["local", "allow", "deny"]
ON_UNAVAILABLE: Final[frozenset[str]] = frozenset({"local", "allow", "deny"})

#: Generations of the local fallback breaker, as a link shows them.
LOCAL_GENERATION_OFFSET: Final = 1 << 48
#: The generation of the "allow" policy's admissions: counted nowhere.
NO_GENERATION: Final = -1

#: Called with a transition of the local breaker, as the link shows it.
TransitionListener: TypeAlias = Callable[[Transition, Snapshot], None]

_logger = library_logger()


class Fallback:
    """One ``on_unavailable`` policy of one breaker: the part of a link that needs no daemon.

    The link calls it only for what the daemon cannot take; every method
    may be called from any thread.
    """

    __slots__ = ("_seen", "client", "listeners", "name")

    #: The policy's name, as ``on_unavailable`` spells it.
    policy: ClassVar[OnUnavailable]

    def __init__(self, name: str, client: DaemonClient) -> None:
        self.name = name
        self.client = client
        #: Called with ``(transition, snapshot)`` when the policy's state changes
        #: (only the local breaker's ever does).
        self.listeners: list[TransitionListener] = []
        self._seen: Snapshot | None = None

    @property
    def snapshot(self) -> Snapshot:
        """The state the link shows while the daemon is out of reach."""
        raise NotImplementedError

    def admit(self) -> int | None:
        """The generation a plain call runs under now, or None (see ``BreakerHandle``)."""
        snapshot = self._seen = self.snapshot
        return plain_generation(snapshot)

    @property
    def seen(self) -> Snapshot:
        """The snapshot ``admit()`` last answered from (before any: the current one)."""
        seen = self._seen
        # Not made at construction: the local policy makes its breaker when first needed.
        return seen if seen is not None else self.snapshot

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None:
        """Answer a request meant for the daemon (an acquire, a report, status, admin).

        A report may be of a call the daemon admitted or of one this policy did.
        """
        if type(message) is Report:
            answer(reply, self.snapshot, None)  # nothing here counts outcomes
            return
        answer(reply, None, self.unavailable_error())

    def post_success(self, generation: int) -> bool:
        """A plain success of a call this policy admitted; False: send it with ``ask``."""
        return True

    def post_report(self, item: tuple[int, Outcome, float]) -> bool:
        """A fire-and-forget outcome of a call this policy admitted."""
        return True

    def post_rejection(self, count: int = 1) -> None:
        """Calls the link rejected on this policy's snapshot."""

    def in_own_thread(self) -> bool:
        """True in a thread that must never wait for this policy's answer."""
        return False

    def unavailable_error(self) -> DaemonUnavailableError:
        reason = self.client.outage or "not registered with it yet"
        return DaemonUnavailableError(
            f"breaker {self.name!r}: the breakerd daemon at {self.client.path} is "
            f"unavailable ({reason}) and on_unavailable={self.policy!r}"
            + (" fails closed" if self.policy == "deny" else "")
        )


class AllowFallback(Fallback):
    """Fail open: every call is admitted, and no outcome is counted anywhere."""

    __slots__ = ("_snapshot",)
    policy: ClassVar[OnUnavailable] = "allow"

    def __init__(self, name: str, client: DaemonClient) -> None:
        super().__init__(name, client)
        self._snapshot = Snapshot(name, CircuitState.CLOSED, NO_GENERATION)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None:
        if type(message) is Acquire:
            answer(reply, Admission(True, NO_GENERATION, 0, self._snapshot), None)
            return
        super().ask(message, reply, force=force)


class DenyFallback(Fallback):
    """Fail closed: every acquire is answered with ``DaemonUnavailableError``."""

    __slots__ = ("_snapshot",)
    policy: ClassVar[OnUnavailable] = "deny"

    def __init__(self, name: str, client: DaemonClient) -> None:
        super().__init__(name, client)
        self._snapshot = Snapshot(name, CircuitState.OPEN, NO_GENERATION)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot


class LocalFallback(Fallback):
    """An in-process breaker with the link's settings, made when first needed.

    Its snapshots and transitions are shown with generations moved up by
    ``LOCAL_GENERATION_OFFSET`` (see the module docstring).
    """

    __slots__ = (
        "_actor",
        "_config",
        "_lock",
        "_log",
        "_system",
        "_used",
        "_view",
    )
    policy: ClassVar[OnUnavailable] = "local"

    def __init__(
        self,
        name: str,
        client: DaemonClient,
        config: BreakerConfig,
        system: ActorSystem | None,
        on_transition: TransitionListener,
    ) -> None:
        super().__init__(name, client)
        self._config = config
        # The system asked for (None: the process's default when needed), and
        # the one the local breaker lives in once made.
        self._system = system
        self._used: ActorSystem | None = None
        self.listeners.append(on_transition)
        self._actor: BreakerActor | None = None
        self._lock = threading.Lock()
        # (local snapshot, as shown): one tuple, read and written whole, so
        # racing threads never pair a snapshot with another one's view.
        self._view: tuple[Snapshot, Snapshot] | None = None
        self._log = _logger.bind(breaker=name, socket=client.path)

    @property
    def actor(self) -> BreakerActor | None:
        """The local breaker, once needed."""
        return self._actor

    @property
    def snapshot(self) -> Snapshot:
        return self._to_view(self._ensure().snapshot)

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None:
        if type(message) is Report:
            generation = message.generation
            if generation >= LOCAL_GENERATION_OFFSET:
                # One of ours: back to the local breaker's own generation.
                moved = replace(message, generation=generation - LOCAL_GENERATION_OFFSET)
                self._ask(moved, reply, force)
            else:
                self._report(message, reply, force)
            return
        self._ask(message, reply, force)

    def post_success(self, generation: int) -> bool:
        actor = self._actor
        if actor is None:  # pragma: no cover - its snapshot made the generation
            return True
        return actor.post_success(generation - LOCAL_GENERATION_OFFSET)

    def post_report(self, item: tuple[int, Outcome, float]) -> bool:
        actor = self._actor
        if actor is None:  # pragma: no cover
            return True
        generation, outcome, duration = item
        return actor.post_report((generation - LOCAL_GENERATION_OFFSET, outcome, duration))

    def post_rejection(self, count: int = 1) -> None:
        actor = self._actor
        if actor is not None:
            actor.post_rejection(count)

    def in_own_thread(self) -> bool:
        system = self._used
        return system is not None and threading.get_ident() == system.loop_thread_id

    def _report(self, report: Report, reply: Reply | None, force: bool) -> None:
        # An outcome the daemon admitted, with the daemon out of reach (gone,
        # or not answering in time): the local breaker counts it, as of its
        # own generation, so a failing service trips it. A cancelled trial
        # only released a daemon lease: nothing to count here.
        if report.outcome is Outcome.CANCELLED:
            answer(reply, self.snapshot, None)
            return
        try:
            local = self._ensure()
        except BreakerError as exc:
            answer(reply, None, exc)
            return
        moved = replace(report, generation=local.snapshot.generation, lease=0)
        self._ask(moved, reply, force)

    def _ask(self, message: object, reply: Reply | None, force: bool) -> None:
        try:
            local = self._ensure()
        except BreakerError as exc:
            answer(reply, None, exc)
            return

        def from_local(result: Any, error: BaseException | None) -> None:
            if error is not None:
                answer(reply, None, error)
            else:
                answer(reply, self._shown(result), None)

        try:
            local.ask(message, from_local if reply is not None else None, force=force)
        except BreakerError as exc:
            answer(reply, None, exc)

    def _ensure(self) -> BreakerActor:
        local = self._actor
        if local is not None:
            return local
        with self._lock:
            if self._actor is None:
                system = self._system
                if system is None or system.pid != os.getpid():
                    system = default_system()
                actor, _ = system.actor(self.name, self._config)
                actor.listeners.append(self._transition)
                self._used = system
                self._actor = actor
                self._log.info("breaker_local_fallback", reason=self.client.outage)
            return self._actor

    def _to_view(self, snapshot: Snapshot) -> Snapshot:
        view = self._view
        if view is None or view[0] is not snapshot:
            view = (
                snapshot,
                replace(snapshot, generation=snapshot.generation + LOCAL_GENERATION_OFFSET),
            )
            self._view = view
        return view[1]

    def _shown(self, result: Any) -> Any:
        if isinstance(result, Snapshot):
            return self._to_view(result)
        if isinstance(result, Admission):
            return replace(
                result,
                generation=result.generation + LOCAL_GENERATION_OFFSET,
                snapshot=self._to_view(result.snapshot),
            )
        if isinstance(result, BreakerStatus):
            return replace(result, snapshot=self._to_view(result.snapshot))
        return result

    def _transition(self, transition: Transition, snapshot: Snapshot) -> None:
        moved = replace(transition, generation=transition.generation + LOCAL_GENERATION_OFFSET)
        shown = self._to_view(snapshot)
        for listener in list(self.listeners):
            listener(moved, shown)


def make_fallback(
    policy: OnUnavailable,
    name: str,
    client: DaemonClient,
    config: BreakerConfig,
    system: ActorSystem | None,
    on_transition: TransitionListener,
) -> Fallback:
    """The policy ``on_unavailable=policy`` names, for breaker ``name``."""
    if policy == "local":
        return LocalFallback(name, client, config, system, on_transition)
    if policy == "allow":
        return AllowFallback(name, client)
    if policy == "deny":
        return DenyFallback(name, client)
    raise ValueError(f"on_unavailable must be 'local', 'allow' or 'deny', not {policy!r}")
