# Generated from _scope_first_async.py by scripts/unasync.py: do not edit.
# Edit the async source and run `python scripts/unasync.py`.
"""``CircuitBreaker.call_sync`` with scopes: scope first, from any thread.

Generated from ``_scope_first_async.py`` (``CircuitBreaker.call`` with
scopes) by ``scripts/unasync.py``: edit that file, never this one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from breakerd.protocol import CircuitBreakerOpenError

from ._budgeted import BudgetedCalls, current_scope
from ._budgets import Budgets, estimate_cost
from ._calls_sync import SyncCalls
from ._scope_budgets import Refused, scope_stages, shut_past

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = ["SyncScopedCalls", "scope_first_sync"]

T = TypeVar("T")


class SyncScopedCalls:
    """The sync paths of a ``CircuitBreaker`` with scopes."""

    name: str
    fallback: Callable[..., Any] | None
    _key_guard: CircuitBreaker
    _wait: float

    if TYPE_CHECKING:

        def _scope_for(
            self, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> CircuitBreaker | None: ...

        def _reject_sync(
            self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any: ...

    def _call_sync_scoped(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        child = self._scope_for(args, kwargs)
        if child is None:
            return SyncCalls.call_sync(cast("CircuitBreaker", self), func, *args, **kwargs)
        return self._run_scoped_sync(child.call_sync, child, func, *args, **kwargs)

    def _run_scoped_sync(
        self,
        scoped: Callable[..., Any],
        child: CircuitBreaker,
        func: Callable[..., T],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        try:
            return cast(T, self._key_guard.call_sync(scoped, func, *args, **kwargs))
        except CircuitBreakerOpenError as exc:
            if self.fallback is None or exc.name not in (self.name, child.name):
                raise
            return cast(T, self._reject_sync(exc, args, kwargs))

    def _call_sync_scope_first(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        child = self._scope_for(args, kwargs)
        inner: Callable[..., Any] = functools.partial(
            SyncCalls.call_sync, cast("CircuitBreaker", self)
        )
        if child is not None:
            # The scope's own path, not its ``call_sync``: its budgets are asked first.
            inner = functools.partial(
                self._run_scoped_sync, functools.partial(SyncCalls.call_sync, child), child
            )
        first = scope_first_sync(
            self, child, inner, self._reject_sync, func, args, kwargs, self._wait
        )
        return cast(T, first)


def _refuse_sync(error: CircuitBreakerOpenError, args: Any, kwargs: Any) -> Refused:
    return Refused(error)


def scope_first_sync(
    parent: Any,
    child: Any,
    inner: Callable[..., Any],
    reject: Callable[..., Any],
    func: Callable[..., Any],
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
            return inner(func, *args, **kwargs)
        deadline = now + wait
        cost = estimate_cost(kwargs)
        chain = inner
        for i in range(len(stages) - 1, -1, -1):
            budgets, snapshot = stages[i]
            answer = reject if i == 0 else _refuse_sync
            chain = _stage_sync(budgets, snapshot, chain, answer, deadline, cost)
        result = chain(func, *args, **kwargs)
        if type(result) is Refused:
            return reject(result.error, args, kwargs)
        return result
    finally:
        current_scope.reset(token)


def _stage_sync(
    budgets: Budgets,
    snapshot: Callable[[], Any],
    inner: Callable[..., Any],
    reject: Callable[..., Any],
    deadline: float,
    cost: float,
) -> Callable[..., Any]:
    clock = budgets.clock

    def stage(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        budgeted = BudgetedCalls(budgets, max(deadline - clock(), 0.0), snapshot, clock)
        return budgeted.call_sync(inner, reject, func, args, kwargs, cost)

    return stage
