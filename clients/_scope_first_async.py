"""``CircuitBreaker.call`` with scopes: scope first, and the source of the sync path.

``scripts/unasync.py`` writes ``_scope_first_sync.py`` from this file, and
``--check`` (run by ``.ci/run`` and the tests) fails when the two differ:
edit this file, then run ``python scripts/unasync.py``. Which stages a call
goes through is ``_scope_budgets``'s; the waiting is ``BudgetedCalls``'s and
``CircuitBreaker``'s. What differs between the colours is only the names
the table renames (``call`` / ``call_sync``, ``_reject_async`` /
``_reject_sync``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from breakerd.protocol import CircuitBreakerOpenError

from ._budgeted import BudgetedCalls, current_scope
from ._budgets import Budgets, estimate_cost
from ._calls_async import AsyncCalls
from ._scope_budgets import Refused, scope_stages, shut_past

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = ["AsyncScopedCalls", "scope_first_async"]

T = TypeVar("T")


class AsyncScopedCalls:
    """The async paths of a ``CircuitBreaker`` with scopes."""

    name: str
    fallback: Callable[..., Any] | None
    _key_guard: CircuitBreaker
    _wait: float

    if TYPE_CHECKING:

        def _scope_for(
            self, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> CircuitBreaker | None: ...

        async def _reject_async(
            self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any: ...

    async def _call_scoped(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        child = self._scope_for(args, kwargs)
        if child is None:
            return await AsyncCalls.call(cast("CircuitBreaker", self), func, *args, **kwargs)
        return await self._run_scoped(child.call, child, func, *args, **kwargs)

    async def _run_scoped(
        self,
        scoped: Callable[..., Awaitable[Any]],
        child: CircuitBreaker,
        func: Callable[..., Awaitable[T]],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        try:
            return cast(T, await self._key_guard.call(scoped, func, *args, **kwargs))
        except CircuitBreakerOpenError as exc:
            if self.fallback is None or exc.name not in (self.name, child.name):
                raise
            return cast(T, await self._reject_async(exc, args, kwargs))

    async def _call_scope_first(
        self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        child = self._scope_for(args, kwargs)
        inner: Callable[..., Any] = functools.partial(AsyncCalls.call, cast("CircuitBreaker", self))
        if child is not None:
            # The scope's own path, not its ``call``: its budgets are asked first.
            inner = functools.partial(
                self._run_scoped, functools.partial(AsyncCalls.call, child), child
            )
        first = scope_first_async(
            self, child, inner, self._reject_async, func, args, kwargs, self._wait
        )
        return cast(T, await first)


async def _refuse_async(error: CircuitBreakerOpenError, args: Any, kwargs: Any) -> Refused:
    return Refused(error)


async def scope_first_async(
    parent: Any,
    child: Any,
    inner: Callable[..., Awaitable[Any]],
    reject: Callable[..., Awaitable[Any]],
    func: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    wait: float,
) -> Any:
    """Run ``inner(func, *args, **kwargs)`` once the budgets of ``child`` (the
    scope, or None) and then of ``parent`` admitted it.

    Each stage waits for its breaker's recovery and for its budgets as
    ``BudgetedCalls`` does, with what is left of the one ``wait``.
    """
    token = current_scope.set(None if child is None else (parent, child))
    try:
        stages = scope_stages(parent, child)
        now = stages[0][0].clock() if stages else 0.0
        if not stages or shut_past(parent.snapshot, now + wait):
            return await inner(func, *args, **kwargs)
        deadline = now + wait
        cost = estimate_cost(kwargs)
        chain = inner
        for i in range(len(stages) - 1, -1, -1):
            budgets, snapshot = stages[i]
            answer = reject if i == 0 else _refuse_async
            chain = _stage_async(budgets, snapshot, chain, answer, deadline, cost)
        result = await chain(func, *args, **kwargs)
        if type(result) is Refused:
            return await reject(result.error, args, kwargs)
        return result
    finally:
        current_scope.reset(token)


def _stage_async(
    budgets: Budgets,
    snapshot: Callable[[], Any],
    inner: Callable[..., Awaitable[Any]],
    reject: Callable[..., Awaitable[Any]],
    deadline: float,
    cost: float,
) -> Callable[..., Awaitable[Any]]:
    clock = budgets.clock

    async def stage(func: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        budgeted = BudgetedCalls(budgets, max(deadline - clock(), 0.0), snapshot, clock)
        return await budgeted.call_async(inner, reject, func, args, kwargs, cost)

    return stage
