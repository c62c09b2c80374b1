"""``call`` and ``call_sync`` take the same decisions, step by step.

Both paths run against a scripted breaker handle that records everything the
facade asks of it; for the same snapshots, outcome and settings, the async
and the sync path must leave the same record and give the same answer.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor import ActorSystem
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState, RateLimited
from breakerd.protocol import Acquire, Admission, Outcome, Report, Snapshot

NAME = "svc"
NOW = 1000.0


class ScriptedHandle:
    """A breaker handle whose snapshots are a script, and which writes down every use."""

    def __init__(
        self,
        snapshots: list[Snapshot],
        *,
        admission: Admission | None = None,
        successes_accepted: bool = True,
    ) -> None:
        self._script = list(snapshots)
        self._reads = 0
        self.admission = admission
        self.successes_accepted = successes_accepted
        self.record: list[tuple[Any, ...]] = []
        self.listeners: list[Any] = []

    @property
    def snapshot(self) -> Snapshot:
        snapshot = self._script[min(self._reads, len(self._script) - 1)]
        self._reads += 1
        return snapshot

    @property
    def seen(self) -> Snapshot:
        return self.snapshot

    def admit(self) -> int | None:
        # Answers from the snapshot the next read will show, without reading it.
        snapshot = self._script[min(self._reads, len(self._script) - 1)]
        if snapshot.state is CircuitState.CLOSED and snapshot.slow_call_duration is None:
            return snapshot.generation
        return None

    def post_success(self, generation: int) -> bool:
        self.record.append(("post_success", generation))
        return self.successes_accepted

    def post_report(self, item: tuple[int, Outcome, float]) -> bool:
        self.record.append(("post_report", item))
        return self.successes_accepted or item[1] is not Outcome.SUCCESS

    def post_rejection(self, count: int = 1) -> None:
        self.record.append(("post_rejection", count))

    def _answer(self, message: object) -> Any:
        self.record.append(("ask", message))
        if isinstance(message, Acquire):
            assert self.admission is not None, "the script has no admission"
            return self.admission
        return self._script[-1]

    def ask(self, message: object, reply: Any, *, force: bool = False) -> None:
        result = self._answer(message)
        if reply is not None:
            reply(result, None)


def snap(
    state: CircuitState,
    *,
    generation: int = 7,
    open_until: float | None = None,
    slow: float | None = None,
) -> Snapshot:
    return Snapshot(NAME, state, generation, open_until, slow_call_duration=slow)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def system(clock: FakeClock) -> Iterator[ActorSystem]:
    with ActorSystem(clock=clock).running_in_thread() as running:
        yield running


def breaker_on(
    handle: ScriptedHandle,
    system: ActorSystem,
    *,
    fallback: Callable[..., Any] | None = None,
    strict: bool = False,
    classify: Any = None,
) -> CircuitBreaker:
    breaker = CircuitBreaker(
        NAME, fallback=fallback, strict=strict, system=system, classify=classify
    )
    breaker._actor = handle
    return breaker


def run_both(
    make: Callable[[], tuple[CircuitBreaker, ScriptedHandle]],
    body: Callable[[], Any],
) -> tuple[tuple[Any, list[tuple[Any, ...]]], tuple[Any, list[tuple[Any, ...]]]]:
    """Run ``body`` through ``call`` and through ``call_sync``, each on a fresh handle."""

    def answer(run: Callable[[], Any]) -> Any:
        try:
            return ("returned", run())
        except BaseException as exc:
            return ("raised", type(exc).__name__, str(exc))

    breaker, handle = make()

    async def async_body() -> Any:
        return body()

    async_answer = answer(lambda: asyncio.run(breaker.call(async_body)))
    async_record = handle.record
    breaker, handle = make()
    sync_answer = answer(lambda: breaker.call_sync(body))
    return (async_answer, async_record), (sync_answer, handle.record)


def test_one_snapshot_decides_the_slow_path(system: ActorSystem) -> None:
    # The handle shows an open breaker, then a closed one: each path decides
    # from the one snapshot it read first (a fallback sends both to the slow
    # path), so both reject here and neither runs the call.
    def make() -> tuple[CircuitBreaker, ScriptedHandle]:
        handle = ScriptedHandle(
            [snap(CircuitState.OPEN, open_until=NOW + 30), snap(CircuitState.CLOSED)]
        )
        return breaker_on(handle, system, fallback=lambda: "fallback"), handle

    (async_answer, async_record), (sync_answer, sync_record) = run_both(make, lambda: "ran")
    assert async_answer == ("returned", "fallback")
    assert sync_answer == async_answer
    assert sync_record == async_record == [("post_rejection", 1)]


STATES = st.sampled_from(list(CircuitState))


@st.composite
def scripts(draw: st.DrawFn) -> dict[str, Any]:
    def one() -> Snapshot:
        state = draw(STATES)
        open_until = None
        if state is CircuitState.OPEN:
            open_until = NOW + draw(st.sampled_from([-1.0, 0.0, 5.0]))
        slow = draw(st.sampled_from([None, 0.5]))
        return snap(state, generation=draw(st.integers(0, 3)), open_until=open_until, slow=slow)

    admitted = draw(st.booleans())
    lease = draw(st.sampled_from([0, 11]))
    admission_snapshot = one()
    return {
        "snapshots": [one() for _ in range(draw(st.integers(1, 3)))],
        "admission": Admission(
            admitted,
            generation=draw(st.integers(0, 3)),
            lease=lease if admitted else 0,
            snapshot=admission_snapshot,
            retry_after=None if admitted else draw(st.sampled_from([None, 2.0])),
        ),
        "successes_accepted": draw(st.booleans()),
        "fallback": draw(st.booleans()),
        "strict": draw(st.booleans()),
        "outcome": draw(
            st.sampled_from(
                ["return", "fail", "ignore", "rate_limited", "cancel", "keyboard_interrupt"]
            )
        ),
        "takes": draw(st.sampled_from([0.0, 0.2, 1.0])),
    }


class Ignored(Exception):
    pass


class Limited(Exception):
    pass


def classify(exc: BaseException) -> Outcome | RateLimited | None:
    if isinstance(exc, Ignored):
        return Outcome.IGNORED
    if isinstance(exc, Limited):
        return RateLimited(3.0)
    return None


@settings(max_examples=300, deadline=None)
@given(script=scripts())
def test_call_and_call_sync_take_the_same_steps(script: dict[str, Any]) -> None:
    clock = FakeClock(NOW)
    with ActorSystem(clock=clock).running_in_thread() as system:

        def make() -> tuple[CircuitBreaker, ScriptedHandle]:
            handle = ScriptedHandle(
                script["snapshots"],
                admission=script["admission"],
                successes_accepted=script["successes_accepted"],
            )
            breaker = breaker_on(
                handle,
                system,
                fallback=(lambda: "fallback") if script["fallback"] else None,
                strict=script["strict"],
                classify=classify,
            )
            return breaker, handle

        def body() -> str:
            clock.advance(script["takes"])
            outcome = script["outcome"]
            if outcome == "fail":
                raise ValueError("upstream failed")
            if outcome == "ignore":
                raise Ignored("not counted")
            if outcome == "rate_limited":
                raise Limited("slow down")
            if outcome == "cancel":
                raise asyncio.CancelledError()
            if outcome == "keyboard_interrupt":
                raise KeyboardInterrupt()
            return "ran"

        (async_answer, async_record), (sync_answer, sync_record) = run_both(make, body)
    assert sync_answer == async_answer
    assert sync_record == async_record


def test_a_rejection_names_the_breaker(system: ActorSystem) -> None:
    # Guards the scripted handle itself: an open breaker rejects on both paths.
    def make() -> tuple[CircuitBreaker, ScriptedHandle]:
        handle = ScriptedHandle([snap(CircuitState.OPEN, open_until=NOW + 30)])
        return breaker_on(handle, system), handle

    (async_answer, _), (sync_answer, _) = run_both(make, lambda: "ran")
    assert async_answer[:2] == sync_answer[:2] == ("raised", CircuitBreakerOpenError.__name__)


def test_report_messages_are_compared_whole() -> None:
    # The record holds the reports themselves: equal only if every field is.
    assert Report(NAME, 1, Outcome.FAILURE, 0.5) != Report(NAME, 1, Outcome.FAILURE, 0.25)


def test_the_sync_path_is_generated_from_the_async_one() -> None:
    # Editing one path and not the other fails here (and in .ci/run): the sync
    # module must be exactly what scripts/unasync.py writes from the async one.
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
