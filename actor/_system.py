"""The actor system: creates breaker actors by name, supervises and stops them.

It runs on an asyncio event loop, either the caller's (the daemon: ``await
system.serve()``) or a background thread of its own (embedded use:
``system.start()``), so sync code with no event loop and async code on any
loop can share one actor per breaker name. Its actors are no tasks: one
dispatcher gives each a turn when it has work (``_dispatcher.py``), so a
system runs a fixed number of tasks however many breakers it holds.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.abc

from breakerd.protocol import ActorStoppedError

from ._actor import BreakerActor
from ._dispatcher import Dispatcher
from ._logging import library_logger
from ._machine import BreakerConfig

__all__ = ["MAX_NAME_LENGTH", "RANDOM_START_LIMIT", "ActorSystem"]

#: Long enough for any service name; short enough that a page of status fits a frame.
MAX_NAME_LENGTH = 200

#: With ``random_start``, generations and lease ids start below this: clients
#: mark their local fallback's generations from 2**48 up, and 2**47 leaves as
#: many transitions of headroom under that mark (64-bit words in the state
#: table and msgpack integers carry either with room to spare).
RANDOM_START_LIMIT = 1 << 47
#: Distinct settings a system keeps one shared copy of: breakers registered
#: with equal settings (every scope of a parent, most breakers of a daemon)
#: share one ``BreakerConfig`` instead of holding a copy each.
_SHARED_CONFIGS = 256

_logger = library_logger()


class ActorSystem:
    """A registry of breaker actors, one per name, with supervision.

    The first registration of a name fixes its settings; a later one with
    different settings joins the existing breaker, gets the list of settings
    that differ back from ``actor()``, and is logged as
    ``breaker_config_conflict``.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_inbox: int = 10_000,
        random_start: bool = False,
    ) -> None:
        """``random_start``: each breaker's generations and lease ids start at
        a random number below ``RANDOM_START_LIMIT`` instead of 0 and 1, so
        numbers handed out by another run (a daemon killed and restarted), or
        by an earlier breaker of the same name, name nothing in this one."""
        if max_inbox < 1:
            raise ValueError(f"max_inbox must be >= 1, got {max_inbox!r}")
        self.clock = clock
        self.max_inbox = max_inbox
        self.random_start = random_start
        self._actors: dict[str, BreakerActor] = {}
        self._configs: dict[BreakerConfig, BreakerConfig] = {}
        # Guards registration only: creating two actors for one name from two
        # threads would split a breaker in half. Never held on the call path.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: Dispatcher | None = None
        self._stop_requested: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._stopped = False
        self.pid = os.getpid()

    # -- registry --------------------------------------------------------------

    def actor(
        self, name: str, config: BreakerConfig | None = None
    ) -> tuple[BreakerActor, tuple[str, ...]]:
        """The actor for ``name``, created on first use.

        Returns the actor and the names of the settings in ``config`` that
        differ from the existing breaker's (empty when created or equal).
        """
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"a breaker name must be a non-empty string of at most "
                f"{MAX_NAME_LENGTH} characters, got {name!r:.80}"
            )
        with self._lock:
            if self._stopped:
                raise ActorStoppedError("the actor system is stopped")
            existing = self._actors.get(name)
            if existing is not None:
                conflicts = () if config is None else existing.config.differences(config)
                if conflicts:
                    _logger.warning(
                        "breaker_config_conflict",
                        breaker=name,
                        settings=list(conflicts),
                        rule="the first registration wins",
                    )
                return existing, conflicts
            generation, first_lease = 0, 1
            if self.random_start:
                generation = secrets.randbelow(RANDOM_START_LIMIT)
                first_lease = 1 + secrets.randbelow(RANDOM_START_LIMIT)
            config = config or BreakerConfig()
            shared = self._configs.get(config)
            if shared is not None:
                config = shared
            elif len(self._configs) < _SHARED_CONFIGS:
                self._configs[config] = config
            actor = BreakerActor(
                name,
                config,
                clock=self.clock,
                max_inbox=self.max_inbox,
                generation=generation,
                first_lease=first_lease,
            )
            self._actors[name] = actor
            dispatcher = self._dispatcher
        if dispatcher is not None:
            self._call_in_loop(dispatcher.attach, actor)
        return actor, ()

    def get(self, name: str) -> BreakerActor | None:
        return self._actors.get(name)

    @property
    def count(self) -> int:
        """Breakers in the registry (not ``__len__``: an empty system is still a system)."""
        return len(self._actors)

    def remove(self, name: str) -> BreakerActor | None:
        """Forget breaker ``name`` and stop its actor (it gets no more turns).

        Requests still in its inbox fail with ``ActorStoppedError``; the next
        ``actor(name)`` creates a new breaker.
        """
        with self._lock:
            actor = self._actors.pop(name, None)
        if actor is not None:
            actor.stop()
        return actor

    def actors(self) -> list[BreakerActor]:
        with self._lock:
            return list(self._actors.values())

    # -- running -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._dispatcher is not None and not self._stopped

    @property
    def loop_thread_id(self) -> int | None:
        return self._thread.ident if self._thread is not None else None

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every actor on the current (asyncio) loop until ``stop()``.

        One task (this one) and one dispatcher, however many actors: each
        actor gets a turn from the dispatcher when it has work.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        dispatcher = Dispatcher(loop)
        try:
            with self._lock:
                self._dispatcher = dispatcher
                actors = list(self._actors.values())
            for actor in actors:
                dispatcher.attach(actor)
            task_status.started()
            await self._stop_requested.wait()
        finally:
            with self._lock:
                self._stopped = True
                self._dispatcher = None
                actors = list(self._actors.values())
            for actor in actors:
                actor.stop()

    def start(self) -> ActorSystem:
        """Run the system in a background thread; returns once it is ready."""
        if self._thread is not None:
            raise RuntimeError("this actor system is already started")
        ready = threading.Event()

        async def main() -> None:
            await self._serve_and_signal(ready)

        def target() -> None:
            try:
                anyio.run(main)
            except BaseException as exc:  # surfaced by start()/stop()
                self._thread_error = exc
                ready.set()

        self._thread = threading.Thread(target=target, name="breakerd-actors", daemon=True)
        self._thread.start()
        ready.wait()
        if self._thread_error is not None:
            raise RuntimeError("the actor system failed to start") from self._thread_error
        return self

    async def _serve_and_signal(self, ready: threading.Event) -> None:
        async with anyio.create_task_group() as group:
            await group.start(self.serve)
            ready.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every actor. Pending requests fail with ``ActorStoppedError``."""
        loop, event = self._loop, self._stop_requested
        if loop is not None and event is not None and not self._stopped:
            self._call_in_loop(event.set)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            self._stopped = True
            actors = list(self._actors.values())
        for actor in actors:
            # Idempotent; catches requests that raced the loop's own sweep.
            actor.stop()

    def _call_in_loop(self, func: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        if self._in_loop_thread():
            func(*args)
        else:
            try:
                loop.call_soon_threadsafe(func, *args)
            except RuntimeError:
                pass  # the loop is closed: the system is stopped already

    def _in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    @contextmanager
    def running_in_thread(self) -> Iterator[ActorSystem]:
        """``with ActorSystem().running_in_thread() as system:`` for tests and scripts."""
        self.start()
        try:
            yield self
        finally:
            self.stop()
