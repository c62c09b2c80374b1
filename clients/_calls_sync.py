# Generated from _calls_async.py by scripts/unasync.py: do not edit.
# Edit the async source and run `python scripts/unasync.py`.
"""``CircuitBreaker.call_sync``: the sync call path.

Generated from ``_calls_async.py`` (``CircuitBreaker.call``) by
``scripts/unasync.py``: edit that file, never this one. The decisions live in
``_plan``; the waiting is ``CircuitBreaker._request_sync``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast

from breakerd.protocol import (
    Acquire,
    Admission,
    BreakerError,
    CircuitBreakerOpenError,
    CircuitState,
    Outcome,
    Report,
    Snapshot,
)

from ._classify import Verdict
from ._plan import PASS, RUN, admit, is_plain_success, needs_ack, report_for

if TYPE_CHECKING:
    from ._handle import BreakerHandle

__all__ = ["SyncCalls"]

P = ParamSpec("P")
T = TypeVar("T")

_OPEN: Final = CircuitState.OPEN
_FORCED_OPEN: Final = CircuitState.FORCED_OPEN
_SUCCESS: Final = Outcome.SUCCESS


class SyncCalls:
    """The sync call path of ``CircuitBreaker``."""

    name: str
    fallback: Callable[..., Any] | None
    strict: bool
    _actor: BreakerHandle
    _clock: Callable[[], float]
    _classifier: Callable[[BaseException], Verdict]
    _needs_rebind: bool

    if TYPE_CHECKING:

        def _rebind_after_fork(self) -> None: ...

        def _local_rejection(self, snapshot: Snapshot) -> CircuitBreakerOpenError | None: ...

        def _rejection(
            self, snapshot: Snapshot, retry_after: float | None
        ) -> CircuitBreakerOpenError: ...

        def _report_nowait(self, report: Report) -> None: ...

        def _reject_sync(
            self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any: ...

        def _request_sync(self, message: object, *, force: bool = False) -> Any: ...

    def call_sync(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``func(*args, **kwargs)`` under the breaker from any thread, no loop needed.

        Raises ``CircuitBreakerOpenError`` when rejected and no fallback is set;
        with a fallback, returns ``fallback(*args, **kwargs)`` instead (it must
        not return an awaitable here).
        """
        actor = self._actor
        generation = actor.admit()
        if generation is not None and not self.strict:
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                self._settle_sync(exc, generation, 0, 0.0)
                raise
            if not actor.post_success(generation):
                self._request_sync(Report(self.name, generation, _SUCCESS), force=True)
            return result
        snapshot = actor.seen
        state = snapshot.state
        if (state is _OPEN or state is _FORCED_OPEN) and self.fallback is None:
            # Raised here, one frame deep: a rejection's cost is mostly its traceback.
            rejection = self._local_rejection(snapshot)
            if rejection is not None:
                raise rejection
        return self._call_sync_slow_path(snapshot, func, args, kwargs)

    def _call_sync_slow_path(
        self,
        snapshot: Snapshot,
        func: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        # One snapshot decides the call: the one the fast path read, unless
        # this process was forked since and the handle is new.
        if self._needs_rebind:
            self._rebind_after_fork()
            snapshot = self._actor.snapshot
        rejection = self._local_rejection(snapshot)
        if rejection is not None:
            return cast(T, self._reject_sync(rejection, args, kwargs))
        step = admit(snapshot, self.strict)
        if step == PASS:
            return func(*args, **kwargs)
        generation, lease = snapshot.generation, 0
        if step != RUN:
            admission = cast(Admission, self._request_sync(Acquire(self.name)))
            snapshot = admission.snapshot
            if not admission.admitted:
                rejection = self._rejection(snapshot, admission.retry_after)
                return cast(T, self._reject_sync(rejection, args, kwargs))
            generation, lease = admission.generation, admission.lease
        clock = self._clock
        started = clock()
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self._settle_sync(exc, generation, lease, clock() - started)
            raise
        duration = clock() - started
        if not (
            is_plain_success(lease, duration, snapshot.slow_call_duration)
            and self._actor.post_report((generation, _SUCCESS, duration))
        ):
            self._request_sync(Report(self.name, generation, _SUCCESS, duration, lease), force=True)
        return result

    def _settle_sync(
        self, exc: BaseException, generation: int, lease: int, duration: float
    ) -> None:
        report = report_for(self.name, self._classifier(exc), generation, lease, duration)
        if report is None:
            return
        if needs_ack(report):
            try:
                self._request_sync(report, force=True)
            except BreakerError:
                pass  # never mask the caller's own exception with ours
        else:
            self._report_nowait(report)
