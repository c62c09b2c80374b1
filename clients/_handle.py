"""The handle a ``CircuitBreaker`` holds on its breaker, and the binding that opens it.

The facade holds one ``BreakerHandle`` and never asks which it is:

* embedded: the breaker's ``BreakerActor`` itself (one per name and actor
  system, shared by every facade of that name);
* daemon mode: the facade's link to the daemon's breaker (``RemoteBreaker``),
  which hands what the daemon cannot take to its ``on_unavailable`` policy,
  through this same protocol (each policy, ``_fallback``, is a handle too);
* in a forked child, until its first call: a placeholder whose every call
  takes the slow path, which opens a handle for the child first.

The hot path is two calls: ``admit()`` before the user's function (the
generation a plain call runs under, or None: take the slow path) and
``post_success(generation)`` after it. Each handle answers ``admit`` from
what it keeps ready (the embedded actor: one attribute set when it
publishes; the daemon link: one look at the shared state table), so the
fast path reads no snapshot; a call it sends down the slow path (a
rejection, a trial) decides on ``seen``, the snapshot that answer came from,
without a second look. Everything else goes through ``snapshot`` and ``ask``.

A ``Binding`` (``LocalBinding``, ``DaemonBinding``) is how a facade reaches
its breaker from the process it runs in: it opens the handle (at
construction, and again in a forked child, where the parent's actor thread
or daemon connection does not exist), and it knows how a caller waits for
an answer (``ask_sync``; a daemon link reads its own reply off the socket)
and which thread must never wait (``in_own_thread``).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from breakerd.actor import ActorSystem, BreakerActor, BreakerConfig, default_system
from breakerd.protocol import CircuitState, Outcome, Snapshot, default_socket_path

from ._core import Reply
from ._daemon_client import DaemonClient
from ._daemon_socket import check_socket_path
from ._fallback import (
    ON_UNAVAILABLE,
    AllowFallback,
    DenyFallback,
    LocalFallback,
    OnUnavailable,
    TransitionListener,
)
from ._link import RemoteBreaker

__all__ = [
    "Binding",
    "BreakerHandle",
    "BreakerState",
    "DaemonBinding",
    "ForkedPlaceholder",
    "LocalBinding",
    "OnUnavailable",
    "bind",
    "future_reply",
]


def future_reply() -> tuple[concurrent.futures.Future[Any], Reply]:
    """A reply callback and the future it settles (its result, or the error as raised)."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def reply(result: Any, error: BaseException | None) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    return future, reply


class BreakerState(Protocol):
    """A breaker's state and the outcomes that need no answer (any thread, never waits).

    The half of ``BreakerHandle`` that never waits for an answer.
    """

    @property
    def snapshot(self) -> Snapshot:
        """The state last published (the daemon's, or the policy's while it is away)."""

    def post_success(self, generation: int) -> bool:
        """Count a plain success without waiting; False: it may change the state, ask instead."""

    def post_report(self, item: tuple[int, Outcome, float]) -> bool:
        """Any ``(generation, outcome, duration)`` without waiting; False: ask instead."""

    def post_rejection(self, count: int = 1) -> None:
        """Count rejections made here (for the totals only)."""


class BreakerHandle(BreakerState, Protocol):
    """What ``CircuitBreaker`` uses of its breaker (all of it, from any thread)."""

    def admit(self) -> int | None:
        """The generation a plain call runs under now (closed, no slow-call timing), or None."""

    @property
    def seen(self) -> Snapshot:
        """The snapshot ``admit()`` last answered from, or a newer one.

        What a caller that ``admit()`` sent down the slow path decides on: a
        plain read, where ``snapshot`` may look at the state table again.
        """

    @property
    def listeners(self) -> list[TransitionListener]:
        """Called with ``(transition, snapshot)`` after every change of state."""

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None:
        """Send a request; ``reply(result, error)`` is called once, from another thread or here."""


class Binding(Protocol):
    """Opens a facade's handle, in the process it is called in."""

    #: The socket in daemon mode, else None.
    daemon_path: str | None
    #: How the facade's repr says where its breaker lives ("" when in-process).
    where: str
    #: The clock of the breaker's deadlines and durations.
    clock: Callable[[], float]

    def open(self) -> BreakerHandle:
        """A handle for this process (again in a forked child)."""

    def ask_sync(self, handle: BreakerHandle, message: object, *, force: bool = False) -> Any:
        """Ask ``handle`` (the one ``open`` gave) and wait in this thread: the result, or
        the error raised. Waiting is the binding's: a daemon link reads its own reply."""

    def in_own_thread(self) -> bool:
        """True in a thread that answers the handle's requests: it must never wait for one."""

    def conflicts(self) -> tuple[str, ...]:
        """Settings the shared breaker kept different from ours (daemon mode: connects)."""

    def release(self) -> None:
        """The facade is done with its breaker (an expired scope): let it go if we own it."""


class LocalBinding:
    """Embedded: the actor of ``name`` in an actor system of this process."""

    daemon_path: str | None = None
    where = ""

    def __init__(self, name: str, config: BreakerConfig, system: ActorSystem | None) -> None:
        self._name = name
        self._config = config
        self._explicit = system
        self._system = system or default_system()
        self.clock: Callable[[], float] = self._system.clock
        self._conflicts: tuple[str, ...] = ()

    def open(self) -> BreakerHandle:
        system = self._system
        if system.pid != os.getpid():
            # Forked: the parent's actor thread does not exist here.
            explicit = self._explicit
            if explicit is None or explicit.pid != os.getpid():
                explicit = default_system()
            system = self._system = explicit
        actor, self._conflicts = system.actor(self._name, self._config)
        return actor

    def ask_sync(self, handle: BreakerHandle, message: object, *, force: bool = False) -> Any:
        future, reply = future_reply()
        handle.ask(message, reply, force=force)
        return future.result()

    def in_own_thread(self) -> bool:
        # The system's loop thread runs every actor of the system, started or not.
        return threading.get_ident() == self._system.loop_thread_id

    def conflicts(self) -> tuple[str, ...]:
        return self._conflicts

    def release(self) -> None:
        self._system.remove(self._name)


class DaemonBinding:
    """Daemon mode: a link to the daemon's breaker ``name``, connected on first use."""

    def __init__(
        self,
        path: str,
        name: str,
        config: BreakerConfig,
        on_unavailable: OnUnavailable,
        system: ActorSystem | None,
        daemon_timeout: float,
    ) -> None:
        self.daemon_path: str | None = path
        self.where = f" daemon={path!r}"
        # The daemon's open deadlines are time.monotonic() instants (one clock
        # for the whole host on Linux): durations and deadlines use it too.
        self.clock: Callable[[], float] = time.monotonic
        self._path = path
        self._name = name
        self._config = config
        self._on_unavailable: OnUnavailable = on_unavailable
        self._system = system
        self._daemon_timeout = daemon_timeout
        self._link: RemoteBreaker | None = None

    def open(self) -> BreakerHandle:
        system = self._system
        # Lazy: a process that never calls (a gunicorn --preload master)
        # holds no connection and no IO thread.
        link = self._link = RemoteBreaker.open(
            self._path,
            self._name,
            self._config,
            self._on_unavailable,
            system if system is not None and system.pid == os.getpid() else None,
            lazy=True,
            daemon_timeout=self._daemon_timeout,
        )
        return link

    def ask_sync(self, handle: BreakerHandle, message: object, *, force: bool = False) -> Any:
        link = self._link
        assert link is not None, "ask_sync() before open()"
        # The link (the handle open() gave) waits itself: it may read the reply
        # off the socket in this thread.
        return link.ask_sync(message, force=force)

    def in_own_thread(self) -> bool:
        link = self._link
        return link is not None and link.in_own_thread()

    def conflicts(self) -> tuple[str, ...]:
        link = self._link
        assert link is not None, "conflicts() before open()"
        link.ensure_started()
        return link.conflicts

    def release(self) -> None:
        pass  # the daemon forgets an idle breaker by itself


def bind(
    name: str,
    config: BreakerConfig,
    daemon: bool | str | Path | None,
    on_unavailable: OnUnavailable,
    system: ActorSystem | None,
    daemon_timeout: float,
) -> Binding:
    """Check the mode's arguments and return the binding for them."""
    if on_unavailable not in ON_UNAVAILABLE:
        raise ValueError(
            f"on_unavailable must be 'local', 'allow' or 'deny', not {on_unavailable!r}"
        )
    if daemon is None or daemon is False:
        if on_unavailable != "local":
            raise ValueError(
                f"on_unavailable={on_unavailable!r} only applies in daemon mode; "
                "pass daemon=True or daemon=<socket path>"
            )
        return LocalBinding(name, config, system)
    if daemon is True:
        path = check_socket_path(default_socket_path())
    elif isinstance(daemon, (str, os.PathLike)) and not isinstance(daemon, bytes):
        path = check_socket_path(daemon)
    else:
        raise TypeError(
            f"daemon must be None, True or a socket path (str or pathlib.Path), got {daemon!r}"
        )
    if system is not None and system.clock is not time.monotonic:
        raise ValueError(
            "in daemon mode the actor system (which hosts the on_unavailable='local' "
            "fallback) must use time.monotonic: the daemon's deadlines are on that clock"
        )
    return DaemonBinding(path, name, config, on_unavailable, system, daemon_timeout)


class ForkedPlaceholder:
    """Stands in for a handle that stayed behind in the parent process.

    Its snapshot sends every call down the slow path, which opens a handle
    for the child first; a call that straddled ``fork()`` reports here, and
    its outcome belongs to no one.
    """

    def __init__(self, name: str) -> None:
        self.snapshot = self.seen = Snapshot(name, CircuitState.HALF_OPEN, -1)
        self.listeners: list[TransitionListener] = []

    def admit(self) -> int | None:
        return None

    def post_success(self, generation: int) -> bool:
        return True

    def post_report(self, item: tuple[int, Outcome, float]) -> bool:
        return True

    def post_rejection(self, count: int = 1) -> None:
        pass

    def ask(self, message: object, reply: Reply | None, *, force: bool = False) -> None:
        raise RuntimeError("a forked child's breaker opens its own handle before asking")


if TYPE_CHECKING:
    # Each implements the handle the facade holds, and each on_unavailable
    # policy the same handle, which its link hands what the daemon cannot take.
    _actor_conforms: BreakerHandle = BreakerActor("x", BreakerConfig(), clock=time.monotonic)
    _link_conforms: BreakerHandle = RemoteBreaker(DaemonClient("x"), "x", BreakerConfig())
    _placeholder_conforms: BreakerHandle = ForkedPlaceholder("x")
    _policies_conform: tuple[BreakerHandle, ...] = (
        AllowFallback("x", DaemonClient("x")),
        DenyFallback("x", DaemonClient("x")),
        LocalFallback("x", DaemonClient("x"), BreakerConfig(), None, lambda t, s: None),
    )
