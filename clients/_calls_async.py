"""``CircuitBreaker.call``: the async call path, and the source of the sync one.

``scripts/unasync.py`` writes ``_calls_sync.py`` (``call_sync``) from this
file, and ``--check`` (run by ``.ci/run`` and the tests) fails when the two
differ: edit this file, then run ``python scripts/unasync.py``. The decisions
live in ``_plan``; this file only orders them and waits. What differs between
the colours is in ``CircuitBreaker``: ``_request_async`` / ``_request_sync``
(how a caller waits for the actor) and ``_reject_async`` / ``_reject_sync``
(how a fallback is run).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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

__all__ = ["AsyncCalls"]

P = ParamSpec("P")
T = TypeVar("T")

_OPEN: Final = CircuitState.OPEN
_FORCED_OPEN: Final = CircuitState.FORCED_OPEN
_SUCCESS: Final = Outcome.SUCCESS


class AsyncCalls:
    """The async call path of ``CircuitBreaker``."""

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

        async def _reject_async(
            self, error: CircuitBreakerOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any: ...

        async def _request_async(self, message: object, *, force: bool = False) -> Any: ...

    async def call(self, func: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await func(*args, **kwargs)`` under the breaker.

        Raises ``CircuitBreakerOpenError`` when rejected and no fallback is set;
        with a fallback, returns ``fallback(*args, **kwargs)`` instead (awaited
        if it returns an awaitable).
        """
        actor = self._actor
        generation = actor.admit()
        if generation is not None and not self.strict:
            try:
                result = await func(*args, **kwargs)
            except BaseException as exc:
                await self._settle_async(exc, generation, 0, 0.0)
                raise
            if not actor.post_success(generation):
                await self._request_async(Report(self.name, generation, _SUCCESS), force=True)
            return result
        snapshot = actor.seen
        state = snapshot.state
        if (state is _OPEN or state is _FORCED_OPEN) and self.fallback is None:
            # Raised here, one frame deep: a rejection's cost is mostly its traceback.
            rejection = self._local_rejection(snapshot)
            if rejection is not None:
                raise rejection
        return await self._call_slow_path(snapshot, func, args, kwargs)

    async def _call_slow_path(
        self,
        snapshot: Snapshot,
        func: Callable[..., Awaitable[T]],
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
            return cast(T, await self._reject_async(rejection, args, kwargs))
        step = admit(snapshot, self.strict)
        if step == PASS:
            return await func(*args, **kwargs)
        generation, lease = snapshot.generation, 0
        if step != RUN:
            admission = cast(Admission, await self._request_async(Acquire(self.name)))
            snapshot = admission.snapshot
            if not admission.admitted:
                rejection = self._rejection(snapshot, admission.retry_after)
                return cast(T, await self._reject_async(rejection, args, kwargs))
            generation, lease = admission.generation, admission.lease
        clock = self._clock
        started = clock()
        try:
            result = await func(*args, **kwargs)
        except BaseException as exc:
            await self._settle_async(exc, generation, lease, clock() - started)
            raise
        duration = clock() - started
        if not (
            is_plain_success(lease, duration, snapshot.slow_call_duration)
            and self._actor.post_report((generation, _SUCCESS, duration))
        ):
            await self._request_async(
                Report(self.name, generation, _SUCCESS, duration, lease), force=True
            )
        return result

    async def _settle_async(
        self, exc: BaseException, generation: int, lease: int, duration: float
    ) -> None:
        report = report_for(self.name, self._classifier(exc), generation, lease, duration)
        if report is None:
            return
        if needs_ack(report):
            try:
                await self._request_async(report, force=True)
            except BreakerError:
                pass  # never mask the caller's own exception with ours
        else:
            self._report_nowait(report)
