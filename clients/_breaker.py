"""``CircuitBreaker``: the user-facing proxy.

A protected call is ``acquire -> run the user's function here -> report``.
The actor never runs user code. While the breaker is ``closed`` the proxy
admits from the published snapshot and hands successes over without waiting;
an outcome that can change the state (a failure, a slow call, a rate limit,
any trial) waits for the actor's acknowledgement, so the caller's next call
already sees the new state ("read your own writes").
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast, overload

import anyio.to_thread

from breakerd.actor import (
    DEFAULT_MAX_TIMEOUT,
    DEFAULT_QUOTA_TIMEOUT,
    ActorSystem,
    BreakerConfig,
    Transition,
)
from breakerd.protocol import (
    Admin,
    AdminOp,
    BreakerStatus,
    CircuitBreakerOpenError,
    CircuitState,
    Report,
    Snapshot,
    StatusRequest,
    new_open_error,
)

from ._budgeted import BreakerBudgets, attempt_only, with_budgets
from ._calls_async import AsyncCalls
from ._calls_sync import SyncCalls
from ._classify import Classifier, ClassifyFunc, Verdict
from ._globals import live_breakers
from ._handle import BreakerHandle, ForkedPlaceholder, OnUnavailable, bind
from ._scope_budgets import ScopeBudgetsSpec, check_scope_budgets, scope_budget_settings
from ._scope_first_async import AsyncScopedCalls
from ._scope_first_sync import SyncScopedCalls
from ._scopes import (
    DEFAULT_MAX_SCOPES,
    DEFAULT_SCOPE_TTL,
    KeyWideOnly,
    ScopeFunc,
    ScopeOnly,
    Scopes,
    model_scope,
)

#: See ``CircuitBreaker``'s ``daemon_timeout``.
DEFAULT_DAEMON_TIMEOUT: Final = 0.25

__all__ = ["CircuitBreaker"]

P = ParamSpec("P")
T = TypeVar("T")

_OPEN: Final = CircuitState.OPEN
_FORCED_OPEN: Final = CircuitState.FORCED_OPEN
#: A state's plain string. ``CircuitState.X.value`` runs Python code in the
#: enum module on every read, a third of a rejection's cost.
_STATE_NAMES: Final[dict[CircuitState, str]] = {state: state.value for state in CircuitState}


class CircuitBreaker(AsyncCalls, SyncCalls, AsyncScopedCalls, SyncScopedCalls, BreakerBudgets):
    """A circuit breaker around calls to one service.

    Every ``CircuitBreaker`` with the same name in a process shares one breaker
    actor (async and sync callers alike); the first one created fixes the
    settings, later ones with different settings join it and get a warning in
    the log (``breaker_config_conflict``, and ``config_conflicts`` here).
    With ``daemon=``, the breaker is the daemon's instead, shared by every
    process on the host that uses the same socket and name.

    Args:
        name: The protected service, e.g. ``"LLM"``.
        failure_threshold: Open when the failure rate in the window is greater
            than this (0..1).
        timeout: Seconds the breaker stays open before one trial call.
        min_calls: Outcomes the window must hold before the rate is judged.
        fallback: ``fallback(*args, **kwargs)``, sync or async, returns the
            answer for a rejected call instead of raising
            ``CircuitBreakerOpenError``. It gets the arguments of the call.
        half_open_calls: Trial calls allowed while half-open (host-wide in
            daemon mode).
        daemon: ``None`` (or False) for an in-process breaker. ``True`` shares
            the breaker with every process on the host through the
            ``breakerd serve`` daemon at the default socket
            (``$BREAKERD_SOCKET``, else ``$XDG_RUNTIME_DIR/breakerd/breakerd.sock``,
            else ``/tmp/breakerd-$UID/breakerd.sock``); a ``str`` or ``Path``
            names the socket. The settings here register the breaker; the
            daemon's config file and the first client to register win over
            them (``config_conflicts`` lists what differs). One connection
            per process and socket is shared by all its breakers; a process
            forked after connecting opens its own.
        on_unavailable: Daemon mode only: what a call does while the daemon
            cannot be reached (not started, restarting, killed, hung).
            ``"local"`` (default) uses an in-process breaker with the same
            settings; ``"allow"`` admits every call and records nothing
            (fail open); ``"deny"`` raises ``DaemonUnavailableError`` (fail
            closed). A warning is logged once per outage; the client
            reconnects in the background and switches back by itself, and
            no call waits for a dead daemon.
        max_timeout: Upper bound on any open duration, under backoff or from
            a server's ``retry_after``: 600 s by default (raised to
            ``timeout`` when that is longer); ``None`` for no bound.
        daemon_timeout: Daemon mode only: how long a call may wait for the
            daemon (its first connection, a trial or strict acquire, an
            acknowledged outcome such as a failure) before ``on_unavailable``
            answers instead (default 0.25 s: a healthy daemon answers in
            microseconds, a busy one in milliseconds, so it runs out only on
            a hung one, well inside any web timeout). The policy counts the
            outcome of such a call (``"local"``: the local breaker). Status
            and admin calls wait for the daemon's answer (up to 5 s).
        window_size, window_seconds, slow_call_duration, slow_call_threshold,
        backoff, jitter, half_open_max_wait: see ``BreakerConfig``.
        quota_timeout: Seconds a key-wide error keeps the breaker open: a
            quota error (429 ``insufficient_quota``, 402) and, with
            ``auth_opens``, a 401/403. Default 900 s; it is also their cap
            (``max_timeout`` does not apply to them). Then one trial.
        auth_opens: Open the breaker for ``quota_timeout`` on a 401/403 from
            the openai SDK (default False: they are logged at error and
            ignored, as a caller's bad request would be).
        scope: ``None`` (default): one breaker. ``"model"``: a call's
            ``model=`` keyword selects a child breaker ``NAME/MODEL``,
            created on first use with these settings; a callable
            ``scope(*args, **kwargs) -> str | None`` selects any other key
            (None: the parent alone). A call runs only if the parent and its
            scope both admit it; failures, slow calls and rate limits count
            in the scope, key-wide classes (quota, 402, 401/403 with
            ``auth_opens``) open the parent and so reject every scope. The
            fallback answers for either. ``scoped(key)`` gives a scope.
        scope_ttl: Seconds after which a closed scope nobody used is
            forgotten (default 3600).
        max_scopes: Live scopes at most (default 256); a new key past it is
            governed by the parent alone, with a warning logged once.
        scope_budgets: Budgets per scope, on top of the parent's (which bind
            every scope's calls together): a mapping ``{key: {"max_rate":
            ..., "burst": ..., "max_concurrent": ...}}`` or a callable ``key
            -> such a dict | None``. A scope's budgets are named like it,
            ``NAME/KEY`` (host-wide in daemon mode); they admit a scoped call
            before the parent's, within the one ``wait``. With it, the API's
            headers seen during a scoped call feed its scope, not the parent.
        max_rate, burst, max_concurrent, wait: Budgets, none by default: a
            paced request rate (``"500/min"``), calls at once after idling
            (1), calls in flight at most, and seconds a call may wait to be
            admitted (0); see ``BreakerBudgets``.
        record: Exception types that count as failures (default: all).
        ignore: Exception types that count as neither success nor failure.
        classify: ``classify(exc)`` returning an ``Outcome``, ``RateLimited`` or
            None (fall through to the other rules). Runs first.
        openai: Apply the openai SDK rules (see ``breakerd.clients.openai.classify_openai``).
        strict: Send every acquire to the actor instead of admitting from the
            snapshot (slower; exact admission under heavy concurrency).
        system: The actor system to use (default: the process-wide one). In
            daemon mode, the one that hosts the ``"local"`` fallback; it must
            run on ``time.monotonic``, the clock of the daemon's deadlines.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: float = 0.5,
        timeout: float = 30.0,
        min_calls: int = 5,
        fallback: Callable[..., Any] | None = None,
        half_open_calls: int = 1,
        daemon: bool | str | Path | None = None,
        *,
        window_size: int = 100,
        window_seconds: float | None = None,
        slow_call_duration: float | None = None,
        slow_call_threshold: float = 1.0,
        backoff: float = 1.0,
        max_timeout: float | None = DEFAULT_MAX_TIMEOUT,
        jitter: float = 0.0,
        half_open_max_wait: float = 60.0,
        quota_timeout: float = DEFAULT_QUOTA_TIMEOUT,
        auth_opens: bool = False,
        scope: str | ScopeFunc | None = None,
        scope_ttl: float = DEFAULT_SCOPE_TTL,
        max_scopes: int = DEFAULT_MAX_SCOPES,
        scope_budgets: ScopeBudgetsSpec | None = None,
        record: tuple[type[BaseException], ...] = (Exception,),
        ignore: tuple[type[BaseException], ...] = (),
        classify: ClassifyFunc | None = None,
        openai: bool = True,
        strict: bool = False,
        system: ActorSystem | None = None,
        on_unavailable: OnUnavailable = "local",
        daemon_timeout: float = DEFAULT_DAEMON_TIMEOUT,
        max_rate: str | None = None,
        burst: int | None = None,
        max_concurrent: int | None = None,
        wait: float = 0.0,
    ) -> None:
        if fallback is not None and not callable(fallback):
            raise TypeError(f"fallback must be callable, got {fallback!r}")
        if not daemon_timeout > 0:
            raise ValueError(f"daemon_timeout must be > 0 seconds, got {daemon_timeout!r}")
        self.daemon_timeout = daemon_timeout
        self.config = BreakerConfig(
            failure_threshold=failure_threshold,
            timeout=timeout,
            min_calls=min_calls,
            half_open_calls=half_open_calls,
            window_size=window_size,
            window_seconds=window_seconds,
            slow_call_duration=slow_call_duration,
            slow_call_threshold=slow_call_threshold,
            backoff=backoff,
            max_timeout=max_timeout,
            jitter=jitter,
            half_open_max_wait=half_open_max_wait,
            quota_timeout=quota_timeout,
        )
        self.name = name
        #: This breaker's key under its parent when it is a scope, else None.
        self._scope_key: str | None = None
        # (snapshot, its open deadline on the wall clock) for rejections.
        self._wall_deadline: tuple[Snapshot | None, float] = (None, 0.0)
        self.fallback = fallback
        self.strict = strict
        self._classifier: Callable[[BaseException], Verdict] = Classifier(
            record=record, ignore=ignore, classify=classify, openai=openai, auth_opens=auth_opens
        )
        self._binding = bind(name, self.config, daemon, on_unavailable, system, daemon_timeout)
        #: The daemon's socket in daemon mode, else None.
        self.daemon_path = self._binding.daemon_path
        self.on_unavailable: OnUnavailable = on_unavailable
        self._clock = self._binding.clock
        self._pid = os.getpid()
        # Set in a forked child (by an at-fork hook): the slow path rebinds
        # first. A flag, because os.getpid() is a system call per check.
        self._needs_rebind = False
        self._actor: BreakerHandle = self._binding.open()
        live_breakers.add(self)
        self._scopes: Scopes | None = None
        if scope is not None:
            settings = {
                "failure_threshold": failure_threshold,
                "timeout": timeout,
                "min_calls": min_calls,
                "half_open_calls": half_open_calls,
                "daemon": daemon,
                "window_size": window_size,
                "window_seconds": window_seconds,
                "slow_call_duration": slow_call_duration,
                "slow_call_threshold": slow_call_threshold,
                "backoff": backoff,
                "max_timeout": max_timeout,
                "jitter": jitter,
                "half_open_max_wait": half_open_max_wait,
                "quota_timeout": quota_timeout,
                "auth_opens": auth_opens,
                "record": record,
                "ignore": ignore,
                "classify": classify,
                "openai": openai,
                "strict": strict,
                "system": system,
                "on_unavailable": on_unavailable,
                "daemon_timeout": daemon_timeout,
            }
            self._init_scopes(scope, scope_ttl, max_scopes, settings, scope_budgets, wait)
        elif scope_budgets is not None:
            raise ValueError(
                f"breaker {name!r}: scope_budgets needs scope= (budgets per scope of what?)"
            )
        BreakerBudgets.__init__(self, max_rate, burst, max_concurrent, wait)

    def _init_scopes(
        self,
        scope: object,
        ttl: float,
        max_scopes: int,
        settings: dict[str, Any],
        scope_budgets: ScopeBudgetsSpec | None,
        wait: float,
    ) -> None:
        if scope == "model":
            scope_func: ScopeFunc = model_scope
        elif callable(scope):
            scope_func = scope
        else:
            raise TypeError(f"scope must be None, 'model' or a callable, got {scope!r}")
        if "/" in self.name:
            raise ValueError(
                f"a breaker with scopes cannot have '/' in its name ({self.name!r}): "
                "its scopes are named NAME/KEY"
            )
        if not (isinstance(ttl, (int, float)) and ttl > 0):
            raise ValueError(f"scope_ttl must be a number of seconds > 0, got {ttl!r}")
        if not isinstance(max_scopes, int) or isinstance(max_scopes, bool) or max_scopes < 0:
            raise ValueError(f"max_scopes must be an integer >= 0, got {max_scopes!r}")
        if scope_budgets is not None:
            check_scope_budgets(scope_budgets)
        # The parent as a scoped call sees it: the same breaker (same name),
        # counting only the key-wide classes; the scope counts the rest.
        guard = CircuitBreaker(self.name, **settings)
        guard._classifier = KeyWideOnly(self._classifier)
        self._key_guard = guard
        self._scope_func = scope_func

        def make(key: str) -> CircuitBreaker:
            budgets = {} if scope_budgets is None else scope_budget_settings(scope_budgets, key)
            if budgets:
                # Its own wait too: a call made on the scope itself may wait as ours do.
                budgets["wait"] = wait
            child = CircuitBreaker(f"{self.name}/{key}", **settings, **budgets)
            child._classifier = ScopeOnly(child._classifier)
            child._scope_key = key
            if child.budgets is not None:  # its refusals name the scope
                child.budgets.scope = key
            return child

        def forget(child: CircuitBreaker) -> None:
            live_breakers.discard(child)
            child._binding.release()  # an expired scope's actor stops
            child.release_budgets()

        self._scopes = Scopes(
            self.name, make, self._clock, ttl=ttl, max_scopes=max_scopes, forget=forget
        )
        # Instance attributes: a breaker without scopes keeps its call path untouched.
        if scope_budgets is None:
            self.call = self._call_scoped  # type: ignore[method-assign]
            self.call_sync = self._call_sync_scoped  # type: ignore[method-assign]
            return
        # The budgets are asked here, scope first: the parent's must not wrap this path.
        self._budgets_inside = True
        self._wait = wait
        self.call = self._call_scope_first  # type: ignore[method-assign]
        self.call_sync = self._call_sync_scope_first  # type: ignore[method-assign]

    def scoped(self, key: str) -> CircuitBreaker:
        """The scope ``key`` (``NAME/KEY``), created if need be: its ``state``, ``status()``...

        Past ``max_scopes`` a new key has no scope of its own and this returns
        the parent, which governs it.
        """
        scopes = self._scopes
        if scopes is None:
            raise ValueError(f"breaker {self.name!r} has no scopes (pass scope=)")
        child = scopes.get(key)
        return self if child is None else cast(CircuitBreaker, child)

    @property
    def has_scopes(self) -> bool:
        """Whether this breaker was made with ``scope=``."""
        return self._scopes is not None

    @property
    def scope_count(self) -> int:
        """Live scopes under this breaker (0 without ``scope``)."""
        return 0 if self._scopes is None else len(self._scopes)

    if TYPE_CHECKING:
        # The scoped call paths (``AsyncScopedCalls``, ``SyncScopedCalls``) a
        # breaker with scopes takes in place of ``call`` and ``call_sync``.

        async def _call_scoped(
            self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
        ) -> T: ...

        def _call_sync_scoped(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

        async def _call_scope_first(
            self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
        ) -> T: ...

        def _call_sync_scope_first(
            self, func: Callable[..., T], *args: Any, **kwargs: Any
        ) -> T: ...

    def _scope_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CircuitBreaker | None:
        key = self._scope_func(*args, **kwargs)
        if not isinstance(key, str) or not key:
            return None
        assert self._scopes is not None
        return cast("CircuitBreaker | None", self._scopes.get(key))

    def _rebind_after_fork(self) -> None:
        # The parent's actor thread (or daemon connection) does not exist in a
        # forked child. The pid last: if opening raises, the next call retries.
        if self._pid != os.getpid():
            self._actor = self._binding.open()
            self._pid = os.getpid()
        self._needs_rebind = False

    def after_fork_in_child(self) -> None:
        """Internal: breakerd's at-fork hook runs this in a forked child."""
        # Right after fork(): no thread may be started here,
        # so point the hot path at a placeholder whose state sends every call
        # down the slow path, which rebinds first.
        self._actor = ForkedPlaceholder(self.name)
        self._needs_rebind = True

    # -- inspection ------------------------------------------------------------

    @property
    def config_conflicts(self) -> tuple[str, ...]:
        """Settings the shared breaker kept different from ours (the first to register won).

        In daemon mode reading it connects, like a call.
        """
        if self._needs_rebind:
            self._rebind_after_fork()
        return self._binding.conflicts()

    @property
    def state(self) -> CircuitState:
        """The state last published by the breaker's actor."""
        return self._actor.snapshot.state

    @property
    def snapshot(self) -> Snapshot:
        return self._actor.snapshot

    def status(self) -> BreakerStatus:
        """Counts and rates from the actor (a round trip), and its budgets if it has any."""
        status = cast(BreakerStatus, self._request_sync(StatusRequest(self.name)))
        return with_budgets(status, self.budgets)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state.value}{self._binding.where}>"

    # -- decorator use ---------------------------------------------------------------

    @overload
    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]: ...
    @overload
    def __call__(self, func: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        """Use the breaker as a decorator on a sync or an async function."""
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call(func, *args, **kwargs)

            return async_wrapper

        @functools.wraps(func)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            return self.call_sync(func, *args, **kwargs)

        return sync_wrapper

    # -- administration ----------------------------------------------------------------

    def force_open(self) -> CircuitState:
        """Reject every call until ``reset()`` (host-wide in daemon mode)."""
        return self._admin("force_open")

    def disable(self) -> CircuitState:
        """Admit every call and record nothing until ``reset()``."""
        return self._admin("disable")

    def reset(self) -> CircuitState:
        """Back to ``closed`` with an empty window."""
        return self._admin("reset")

    def _admin(self, op: AdminOp) -> CircuitState:
        snapshot = cast(Snapshot, self._request_sync(Admin(self.name, op)))
        return snapshot.state

    # -- observing transitions -----------------------------------------------------------

    def on_transition(self, callback: Callable[[Transition], None]) -> Callable[[], None]:
        """Call ``callback(transition)`` after every state change; returns an unsubscribe.

        The callback runs in the actor system's thread (in daemon mode, the
        thread reading the daemon's socket -- the client's IO thread, or a
        ``call_sync`` caller reading its own reply -- or the local fallback's
        thread): keep it short and do not call this breaker's ``call_sync``
        from it. In daemon
        mode a transition is reported when the state this process sees
        changes: a push from the daemon (reason ``"daemon"``) or a switch
        between the daemon and the ``on_unavailable`` fallback (reasons
        ``"daemon_unavailable"``, ``"daemon_available"``).
        """

        def listener(transition: Transition, snapshot: Snapshot) -> None:
            callback(transition)

        listeners = self._actor.listeners
        listeners.append(listener)

        def unsubscribe() -> None:
            try:
                listeners.remove(listener)
            except ValueError:
                pass

        return unsubscribe

    async def transitions(self) -> AsyncGenerator[Transition, None]:
        """Async iterator over state changes from now on (asyncio only)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Transition] = asyncio.Queue()

        def forward(transition: Transition) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, transition)

        unsubscribe = self.on_transition(forward)
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    # -- helpers -----------------------------------------------------------------------------

    def _local_rejection(self, snapshot: Snapshot) -> CircuitBreakerOpenError | None:
        # Reject here? Forced open, or open until a deadline still ahead. Not
        # in _plan: this is the hot path of an open breaker, where one more
        # function call measured 3-7 % of a rejection.
        state = snapshot.state
        if state is _FORCED_OPEN:
            self._actor.post_rejection()
            return new_open_error(
                self.name, None, "forced_open", None, self._scope_key, "forced_open"
            )
        if state is _OPEN and snapshot.open_until is not None:
            remaining = snapshot.open_until - self._clock()
            if remaining > 0:
                self._actor.post_rejection()
                # The wall-clock deadline is read once per published snapshot,
                # not once per rejection.
                wall = self._wall_deadline
                if wall[0] is not snapshot:
                    wall = self._wall_deadline = (snapshot, time.time() + remaining)
                return new_open_error(
                    self.name,
                    remaining,
                    "open",
                    None,
                    self._scope_key,
                    snapshot.reason,
                    snapshot.error_code,
                    wall[1],
                    snapshot.opened_by_pid or None,
                )
        return None

    def _rejection(self, snapshot: Snapshot, retry_after: float | None) -> CircuitBreakerOpenError:
        # The deadline leaves the monotonic clock only here, at the edge: the
        # wall clock is what a person (or another host) can read.
        return new_open_error(
            self.name,
            retry_after,
            _STATE_NAMES[snapshot.state],
            None,
            self._scope_key,
            snapshot.reason,
            snapshot.error_code,
            None if retry_after is None else time.time() + retry_after,
            snapshot.opened_by_pid or None,
        )

    def _fallback_for(
        self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # What the fallback returns for a refused call (perhaps an awaitable),
        # or the refusal raised when there is none to ask.
        fallback = self.fallback
        if fallback is None or attempt_only.get():
            raise error
        return fallback(*args, **kwargs)

    async def _reject_async(
        self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.fallback is None:
            raise error  # the common rejection, without a frame more to raise through
        result = self._fallback_for(error, args, kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _reject_sync(
        self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.fallback is None:
            raise error  # the common rejection, without a frame more to raise through
        result = self._fallback_for(error, args, kwargs)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"breaker {self.name!r}: the fallback returned an awaitable, which call_sync "
                "cannot await; use a sync fallback or `await breaker.call(...)`"
            )
        return result

    def _report_nowait(self, report: Report) -> None:
        if report.lease:
            # A lease must come back even if the inbox is full: force it in.
            self._actor.ask(report, None, force=True)
        elif not self._actor.post_report((report.generation, report.outcome, report.duration)):
            self._actor.ask(report, None, force=True)

    async def _request_async(self, message: object, *, force: bool = False) -> Any:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Not asyncio (trio through anyio): wait in a worker thread instead.
            return await anyio.to_thread.run_sync(
                functools.partial(self._request_sync, message, force=force)
            )
        future: asyncio.Future[Any] = loop.create_future()

        def reply(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle_future, future, result, error)

        self._actor.ask(message, reply, force=force)
        return await future

    def _request_sync(self, message: object, *, force: bool = False) -> Any:
        if self._needs_rebind:
            self._rebind_after_fork()  # status() or an admin call first thing in a child
        binding = self._binding
        if binding.in_own_thread():
            raise RuntimeError(
                "a breaker cannot wait for its own actor thread; "
                "do not call call_sync() or admin methods from a transition callback"
            )
        return binding.ask_sync(self._actor, message, force=force)


def _settle_future(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # the waiter was cancelled
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
