"""Budgets per scope (``scope_budgets=``): their settings, and admission scope first.

A scope's budgets (``max_rate``, ``burst``, ``max_concurrent``) belong to
its breaker ``NAME/KEY`` and so are shared by that name, in the process and
(daemon mode) host-wide, like the parent's. A scoped call is admitted by its
scope's budgets first and the parent's second, within one ``wait``: a model
at its rate then waits or is refused without spending the key's rate slots
or holding one of its concurrency leases, so other models go on. The other
order would let one model's backlog starve every other model of the key.

While a scoped call of a breaker with ``scope_budgets`` runs, ``current_scope``
names its scope: the API's headers seen then describe that model's limit,
and ``observe_limits`` hands them to the scope.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from breakerd.protocol import CircuitBreakerOpenError, CircuitState

from ._budgeted import current_scope
from ._budgets import Budgets

__all__ = [
    "Refused",
    "ScopeBudgetsSpec",
    "check_scope_budgets",
    "current_scope",
    "scope_budget_settings",
    "scope_stages",
    "shut_past",
]

#: ``{key: {"max_rate": ..., ...}}``, or ``key -> settings | None``.
ScopeBudgetsSpec = Mapping[str, Mapping[str, Any]] | Callable[[str], "Mapping[str, Any] | None"]

#: What a scope's budgets take: the breaker's own budgets, less ``wait``
#: (one wait covers the whole admission of a call, the parent's included).
FIELDS: Final = ("max_rate", "burst", "max_concurrent")


def check_scope_budgets(spec: object) -> None:
    """Raise ``ValueError`` naming the key and field if a mapping's settings are bad.

    A callable's answers are checked as each key first comes.
    """
    if callable(spec):
        return
    if not isinstance(spec, Mapping):
        raise ValueError(
            "scope_budgets must be a mapping {key: {'max_rate': ..., 'burst': ..., "
            f"'max_concurrent': ...}} or a callable key -> such a dict, got {spec!r}"
        )
    for key, settings in spec.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"scope_budgets keys must be non-empty strings, got {key!r}")
        _checked(f"scope_budgets[{key!r}]", settings)


def scope_budget_settings(spec: ScopeBudgetsSpec, key: str) -> dict[str, Any]:
    """The budget keywords of scope ``key`` (empty: none of its own)."""
    if callable(spec):
        return _checked(f"scope_budgets({key!r})", spec(key))
    return _checked(f"scope_budgets[{key!r}]", spec.get(key))


def _checked(where: str, settings: object) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ValueError(f"{where} must be a dict of {', '.join(FIELDS)} or None, got {settings!r}")
    for field in settings:
        if field not in FIELDS:
            raise ValueError(
                f"{where}: unknown field {field!r} (a scope's budgets take "
                f"{', '.join(FIELDS)}; wait is the breaker's)"
            )
    found = {field: settings[field] for field in FIELDS if settings.get(field) is not None}
    try:
        # The budgets' own checks, so the messages name the field as the breaker's do.
        Budgets(
            "check",
            max_rate=found.get("max_rate"),
            burst=found.get("burst"),
            max_concurrent=found.get("max_concurrent"),
            wait=0.0,
            clock=time.monotonic,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return found


_ADMITTING: Final = (CircuitState.CLOSED, CircuitState.DISABLED)

Stage = tuple[Budgets, Callable[[], Any]]  # budgets, and the snapshot of their breaker


class Refused:
    """A later stage refused the call: final, not a reason for the first to try again.

    A later stage refuses only once the call cannot be admitted within the
    wait (its budgets' turn, or its breaker's recovery, is past it), so the
    first stage must not wait on and ask its scope for another slot: the
    refusal comes back through it as a value, which ``scope_first_async``
    and ``scope_first_sync`` answer with the error it carries (``_scope_first_async``).
    """

    __slots__ = ("error",)

    def __init__(self, error: CircuitBreakerOpenError) -> None:
        self.error = error


def shut_past(seen: Any, deadline: float) -> bool:
    # The key is open past the call's wait: the breaker answers at once, with
    # its reason (a quota, say), before any budget is asked for a slot.
    until = seen.open_until
    return bool(seen.state is CircuitState.OPEN and until is not None and until > deadline)


def scope_stages(parent: Any, child: Any) -> list[Stage]:
    # The scope's budgets, then the parent's: those there are.
    stages: list[Stage] = []
    if child is not None and child.budgets is not None:

        def snapshot() -> Any:
            # The scope's stage waits for the parent's recovery too (or is
            # refused at once when it will not come within the wait), instead
            # of asking its budgets again and again while the key is shut.
            seen = parent.snapshot
            return child.snapshot if seen.state in _ADMITTING else seen

        stages.append((child.budgets, snapshot))
    if parent.budgets is not None:
        stages.append((parent.budgets, lambda: parent.snapshot))
    return stages
