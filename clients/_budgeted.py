"""The call path of a breaker with budgets, and the budget surface of ``CircuitBreaker``.

``BreakerBudgets`` is mixed into ``CircuitBreaker``: ``max_rate``,
``burst``, ``max_concurrent``, ``wait`` (see the README's "Budgets"),
``observe_limits`` and ``in_flight``. A breaker without any of them keeps
its call path untouched: ``BudgetedCalls`` wraps ``call`` and ``call_sync``
(instance attributes, as scopes do) only when a budget or a wait is set, or
when the API's limits are first fed in.

A budgeted call: wait for an open breaker's recovery if it may (up to
``wait``), then for the budgets' admission (``Budgets``), then the
breaker's own call path runs the function. A rejection before the function
ran (the breaker not closed yet, its trial taken) while time is left sends
the call back to waiting; the fallback answers only once it cannot wait
any longer. Calls that waited through an outage leave in a doubling ramp
once the breaker closes (``ramp_offset``). The call path is written once,
in ``_budgeted_async`` (``call_sync`` is generated from it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from breakerd.protocol import (
    BreakerError,
    BreakerStatus,
    CircuitBreakerOpenError,
    CircuitState,
    Snapshot,
)

from . import _globals
from ._budgeted_async import AsyncBudgetedCalls
from ._budgeted_sync import SyncBudgetedCalls
from ._budgets import (
    RECHECK,
    Budgets,
    Clock,
    attempt_only,
    current_ticket,
    estimate_cost,
    shared_budgets,
)
from ._openai import parse_rate_limits

if TYPE_CHECKING:
    from ._link import RemoteBreaker

__all__ = [
    "BreakerBudgets",
    "BudgetedCalls",
    "attempt_only",
    "current_scope",
    "current_ticket",
    "with_budgets",
]

P = ParamSpec("P")
T = TypeVar("T")

#: (the parent breaker, the call's scope) while a scoped call of a breaker
#: with ``scope_budgets`` runs in this context: what the API says then is
#: about the scope's limit (see ``_scope_budgets``).
current_scope: ContextVar[tuple[object, Any] | None] = ContextVar(
    "breakerd_current_scope", default=None
)


def with_budgets(status: BreakerStatus, budgets: Budgets | None) -> BreakerStatus:
    """``status`` with these budgets, unless it has the daemon's.

    The daemon's are the host-wide ones, there once a call of this host
    asked it for some; else (embedded, or none asked yet) this process's.
    """
    if status.budget is None and budgets is not None:
        status = dataclasses.replace(status, budget=budgets.status())
    return status


class BudgetedCalls(AsyncBudgetedCalls, SyncBudgetedCalls):
    """The call path of a breaker with budgets or ``wait``: admission, then the breaker's own.

    Args:
        budgets: The breaker's (shared) budgets.
        wait: Seconds a call may wait to be admitted.
        snapshot: Returns the breaker's current snapshot.
        clock: The breaker's monotonic clock.
    """

    def __init__(
        self,
        budgets: Budgets,
        wait: float,
        snapshot: Callable[[], Snapshot],
        clock: Clock,
    ) -> None:
        self.budgets = budgets
        self.wait = wait
        self._snapshot = snapshot
        self._clock = clock

    def _recovery_wait(self, deadline: float) -> tuple[float, bool]:
        # (seconds to wait before trying the breaker, whether it is waiting
        # out an outage). Zero: try now, and a call that cannot wait long
        # enough is rejected by the breaker itself.
        snapshot = self._snapshot()
        state = snapshot.state
        if state is CircuitState.CLOSED or state is CircuitState.DISABLED:
            return 0.0, False
        now = self._clock()
        if state is CircuitState.OPEN and snapshot.open_until is not None:
            until = snapshot.open_until
        elif state is CircuitState.HALF_OPEN:
            until = now + RECHECK  # the trial decides: look again soon
        else:
            return 0.0, False  # forced open: no end to wait for
        if until > deadline:
            return -1.0, True  # it will not recover in time: refused now
        if until <= now:
            return 0.0, True
        return min(until - now, RECHECK), True


class BreakerBudgets:
    """The budgets of a ``CircuitBreaker`` (mixed into it; see the module's doc)."""

    # What the breaker that mixes this in provides.
    name: str
    daemon_path: str | None
    daemon_timeout: float
    _clock: Clock
    _actor: Any
    _needs_rebind: bool
    _scope_key: str | None
    _budgeted: BudgetedCalls | None
    #: With ``scope_budgets`` the scoped call path asks the budgets itself
    #: (the scope's first): the parent's must not wrap it.
    _budgets_inside = False
    call: Callable[..., Any]
    call_sync: Callable[..., Any]

    def _rebind_after_fork(self) -> None:
        raise NotImplementedError  # the breaker's

    async def _reject_async(
        self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        raise NotImplementedError  # the breaker's

    def _reject_sync(
        self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        raise NotImplementedError  # the breaker's

    def __init__(
        self, max_rate: str | None, burst: int | None, max_concurrent: int | None, wait: float
    ) -> None:
        # Called last by the breaker's own __init__, once its call path is set.
        self._budgeted = None
        if max_rate is not None or max_concurrent is not None or burst is not None or wait:
            self._install_budgets(max_rate, burst, max_concurrent, wait)

    def _install_budgets(
        self, max_rate: str | None, burst: int | None, max_concurrent: int | None, wait: float
    ) -> BudgetedCalls:
        daemon = None
        if self.daemon_path is not None:
            daemon = (self.daemon_path, self._daemon_client, self.daemon_timeout)
        budgets = shared_budgets(
            self.name,
            max_rate=max_rate,
            burst=burst,
            max_concurrent=max_concurrent,
            wait=wait,
            clock=self._clock,
            daemon=daemon,
        )
        budgets.scope = self._scope_key
        budgeted = BudgetedCalls(budgets, float(wait), lambda: self._actor.snapshot, self._clock)
        self._budgeted = budgeted
        if self._budgets_inside:
            return budgeted
        # The budgets wrap whatever call path the breaker has (its scopes').
        inner_async, inner_sync = self.call, self.call_sync
        reject_async, reject_sync = self._reject_async, self._reject_sync

        async def call(func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
            cost = estimate_cost(kwargs)
            return cast(
                T, await budgeted.call_async(inner_async, reject_async, func, args, kwargs, cost)
            )

        def call_sync(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
            cost = estimate_cost(kwargs)
            return cast(T, budgeted.call_sync(inner_sync, reject_sync, func, args, kwargs, cost))

        self.call = call
        self.call_sync = call_sync
        return budgeted

    def _daemon_client(self) -> Any:
        # The process's daemon client while the daemon's breaker is in use,
        # else None (the budgets of this process stand in).
        if self._needs_rebind:
            self._rebind_after_fork()
        link = cast("RemoteBreaker", self._actor)
        try:
            link.ensure_started()
        except BreakerError:
            return None
        return link.client if link.remote else None

    def observe_limits(
        self,
        headers: Mapping[str, str] | None = None,
        *,
        remaining_requests: float | None = None,
        reset_requests: float | None = None,
        remaining_tokens: float | None = None,
        reset_tokens: float | None = None,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        used_tokens: float | None = None,
    ) -> None:
        """Tell the breaker what the API said is left, so its calls stay under the limit.

        ``headers``: a response's headers, read as OpenAI sends them
        (``x-ratelimit-remaining-requests``/``-tokens``,
        ``x-ratelimit-reset-requests``/``-tokens`` such as ``"1s"`` or
        ``"6m0s"``, ``x-ratelimit-limit-*``). Or the numbers themselves, for
        other APIs (reset times in seconds from now). ``used_tokens``: what
        the call running now really used (its ``usage``), correcting the
        estimate it was admitted with. The OpenAI client wrapper
        (``breakerd.clients.openai.protect``) feeds every response it sees.

        Once fed, calls are admitted against it: while plenty is left they
        go at once; when the requests left run low, they are spread over the
        time to the reset; with none left a call waits for the reset (up to
        ``wait``) or raises ``BudgetExceededError`` (``rate_budget``).
        """
        scoped = current_scope.get()
        if scoped is not None and scoped[0] is self:
            # With scope_budgets: the API spoke of the limit of this call's scope.
            scoped[1].observe_limits(
                headers,
                remaining_requests=remaining_requests,
                reset_requests=reset_requests,
                remaining_tokens=remaining_tokens,
                reset_tokens=reset_tokens,
                limit_requests=limit_requests,
                limit_tokens=limit_tokens,
                used_tokens=used_tokens,
            )
            return
        limits: dict[str, float] = {} if headers is None else parse_rate_limits(headers)
        for key, value in (
            ("remaining_requests", remaining_requests),
            ("reset_requests", reset_requests),
            ("remaining_tokens", remaining_tokens),
            ("reset_tokens", reset_tokens),
            ("limit_requests", limit_requests),
            ("limit_tokens", limit_tokens),
        ):
            if value is not None:
                limits[key] = value
        budgeted = self._budgeted
        if budgeted is None:
            if not limits:
                return  # a usage alone corrects nothing without budgets
            with _globals.budgets_lock:  # two first responses at once install one path
                budgeted = self._budgeted or self._install_budgets(None, None, None, 0.0)
        ticket = current_ticket.get()
        if ticket is not None and ticket.belongs_to(budgeted.budgets):
            if used_tokens is not None:
                ticket.used_tokens = used_tokens
            if "remaining_tokens" in limits:
                # The call's own response counted it: nothing left to correct.
                ticket.cost = 0.0
        if limits:
            budgeted.budgets.observe(**limits)

    def release_budgets(self) -> None:
        """Internal: an expired scope lets its budgets go (other holders of its name keep them)."""
        if self._budgeted is None:
            return
        self._budgeted = None
        # The call paths close over the budgets: back to the class's.
        self.__dict__.pop("call", None)
        self.__dict__.pop("call_sync", None)

    @property
    def in_flight(self) -> int:
        """Calls holding a ``max_concurrent`` lease now (0 without one)."""
        return 0 if self._budgeted is None else self._budgeted.budgets.in_flight

    @property
    def budgets(self) -> Budgets | None:
        """This breaker's budgets (shared by its name in the process), or None."""
        return None if self._budgeted is None else self._budgeted.budgets
