"""The actor system's dispatcher: breakers are mailboxes, not tasks.

An actor system runs every breaker on one event loop through a run queue:
a fixed number of tasks however many breakers there are, each breaker's
messages one at a time and in order, a busy breaker unable to starve the
others, and a crash in one breaker's turn restarting that breaker only.
Fake clocks; the loop runs in a thread of its own or in the test itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import anyio
import pytest
import structlog
from daemon_helpers import poll_until
from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor import ActorSystem, BreakerActor, BreakerConfig
from breakerd.actor.testing import FakeClock
from breakerd.protocol import (
    Acquire,
    ActorStoppedError,
    Admission,
    BreakerError,
    BreakerStatus,
    CircuitState,
    Outcome,
    Report,
    StatusRequest,
)


def ask(actor: BreakerActor, message: object) -> Any:
    answer: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def reply(result: Any, error: BaseException | None) -> None:
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    actor.ask(message, reply)
    return answer.result(timeout=10)


def tasks_of(system: ActorSystem) -> int:
    loop = system._loop
    assert loop is not None

    async def count() -> int:
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), loop).result(10)


def test_a_thousand_breakers_add_no_task(system: ActorSystem) -> None:
    first, _ = system.actor("svc-0", BreakerConfig())
    ask(first, StatusRequest("svc-0"))
    before = tasks_of(system)
    actors = [system.actor(f"svc-{i}", BreakerConfig())[0] for i in range(1, 1001)]
    # Every one of them serves (so it is running, whatever runs it).
    for actor in actors:
        assert ask(actor, Acquire(actor.name)).admitted
    assert tasks_of(system) == before


def test_a_busy_breaker_cannot_starve_another(clock: FakeClock) -> None:
    system = ActorSystem(clock=clock, max_inbox=100_000)
    busy, _ = system.actor("busy", BreakerConfig(min_calls=100))
    quiet, _ = system.actor("quiet", BreakerConfig())
    # Queued before the system runs, so nothing is served early: the busy
    # breaker has 20,000 reports ahead of the quiet one's single request.
    for _ in range(20_000):
        assert busy.post_report((busy.machine.generation, Outcome.IGNORED, 0.0))
    seen_backlog: list[int] = []
    answered = threading.Event()

    def quiet_answered(result: Any, error: BaseException | None) -> None:
        assert error is None
        seen_backlog.append(busy.backlog)
        answered.set()

    quiet.ask(StatusRequest("quiet"), quiet_answered)
    with system.running_in_thread():
        assert answered.wait(10)
        # The quiet breaker was answered while most of the busy one's work waited.
        assert seen_backlog[0] > 10_000
        # And the busy one got through all of it, in the end.
        assert poll_until(lambda: busy.machine.ignored == 20_000, 10)
        status = ask(busy, StatusRequest("busy"))
        assert isinstance(status, BreakerStatus)
        assert status.ignored == 20_000


def test_two_busy_breakers_take_turns(clock: FakeClock) -> None:
    system = ActorSystem(clock=clock, max_inbox=100_000)
    names = ("a", "b")
    actors = {name: system.actor(name, BreakerConfig())[0] for name in names}
    order: list[str] = []
    done = threading.Event()

    def answer(name: str) -> Any:
        def reply(result: Any, error: BaseException | None) -> None:
            order.append(name)
            if len(order) == 2 * 5_000:
                done.set()

        return reply

    for name in names:
        for _ in range(5_000):
            actors[name].ask(StatusRequest(name), answer(name))
    with system.running_in_thread():
        assert done.wait(10)
    # Interleaved: b's first answer comes long before a's last one.
    assert order.index("b") < order.index("a") + 1_000
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")


def test_a_crash_in_a_breakers_turn_restarts_it_and_the_others_carry_on(
    clock: FakeClock,
) -> None:
    system = ActorSystem(clock=clock)
    broken, _ = system.actor("broken", BreakerConfig())
    healthy, _ = system.actor("healthy", BreakerConfig())
    calls = 0

    def next_deadline() -> float | None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug in the turn, outside any message")

    # Not a message's handling (that answers the message with an error): the
    # turn itself raises, so only supervision can save the breaker.
    broken.machine.next_deadline = next_deadline  # type: ignore[method-assign]
    broken.ask(StatusRequest("broken"), None)
    with structlog.testing.capture_logs() as logs, system.running_in_thread():
        assert ask(healthy, Acquire("healthy")).admitted
        assert poll_until(lambda: broken.restarts == 1, 10)
        # Restarted from its machine's successor: the bug went with the old one.
        assert ask(broken, Acquire("broken")).admitted
        assert ask(broken, StatusRequest("broken")).snapshot.state is CircuitState.CLOSED
        assert ask(healthy, Acquire("healthy")).admitted
    assert broken.restarts == 1
    assert healthy.restarts == 0
    assert calls == 1
    crashed = [entry for entry in logs if entry["event"] == "actor_crashed"]
    assert [entry["breaker"] for entry in crashed] == ["broken"]


def test_a_crash_in_one_breakers_handler_answers_it_and_spares_the_rest(
    clock: FakeClock,
) -> None:
    system = ActorSystem(clock=clock)
    broken, _ = system.actor("broken", BreakerConfig())
    healthy, _ = system.actor("healthy", BreakerConfig())

    def acquire(now: float) -> Any:
        raise RuntimeError("bug")

    broken.machine.acquire = acquire  # type: ignore[method-assign]
    answers: dict[str, list[tuple[Any, BaseException | None]]] = {"broken": [], "healthy": []}

    def record(name: str) -> Any:
        return lambda result, error: answers[name].append((result, error))

    # One turn each, in one loop callback: the broken breaker's first.
    broken.ask(Acquire("broken"), record("broken"))
    healthy.ask(Acquire("healthy"), record("healthy"))
    broken.ask(Acquire("broken"), record("broken"))
    with system.running_in_thread():
        assert poll_until(lambda: len(answers["broken"]) == 2, 10)
        assert poll_until(lambda: len(answers["healthy"]) == 1, 10)
    (_, crashed), (again, no_error) = answers["broken"]
    assert isinstance(crashed, BreakerError)
    assert "crashed" in str(crashed)
    assert no_error is None
    assert isinstance(again, Admission)
    assert again.admitted
    assert answers["healthy"][0][1] is None
    assert broken.restarts == 1
    assert healthy.restarts == 0


def test_stopping_a_running_system_fails_what_is_queued(clock: FakeClock) -> None:
    system = ActorSystem(clock=clock).start()
    actor, _ = system.actor("svc", BreakerConfig())
    assert ask(actor, Acquire("svc")).admitted
    system.stop()
    with pytest.raises(ActorStoppedError):
        actor.ask(StatusRequest("svc"), None)


# -- every breaker's messages once each, in order, however they interleave ----------

PLAN = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from(["ask", "report", "success"])),
    max_size=400,
)


@settings(max_examples=30, deadline=None)
@given(before=PLAN, after=PLAN)
def test_each_breaker_handles_its_messages_once_in_order(
    before: list[tuple[int, str]], after: list[tuple[int, str]]
) -> None:
    """Messages queued before the system runs and while it runs, on its own loop."""

    async def main() -> None:
        system = ActorSystem(clock=FakeClock())
        # min_calls above anything sent: nothing opens, every message counts.
        config = BreakerConfig(min_calls=1000, window_size=1000)
        actors = [system.actor(f"svc-{i}", config)[0] for i in range(4)]
        sent: list[list[int]] = [[] for _ in actors]
        answered: list[list[int]] = [[] for _ in actors]
        expected = {"report": [0] * 4, "success": [0] * 4}
        remaining = sum(1 for _, kind in before + after if kind == "ask")
        all_answered = asyncio.Event()
        if not remaining:
            all_answered.set()

        def post(index: int, kind: str) -> None:
            nonlocal remaining
            actor = actors[index]
            if kind == "ask":
                number = len(sent[index])
                sent[index].append(number)

                def reply(result: Any, error: BaseException | None) -> None:
                    nonlocal remaining
                    assert error is None
                    answered[index].append(number)
                    remaining -= 1
                    if not remaining:
                        all_answered.set()

                actor.ask(StatusRequest(actor.name), reply)
            elif kind == "report":
                expected["report"][index] += 1
                assert actor.post_report((actor.machine.generation, Outcome.IGNORED, 0.0))
            else:
                expected["success"][index] += 1
                assert actor.post_success(actor.machine.generation)

        for index, kind in before:
            post(index, kind)
        async with anyio.create_task_group() as group:
            await group.start(system.serve)
            for index, kind in after:
                post(index, kind)
            await all_answered.wait()
            for actor in actors:
                actor.settle()
            system.stop()
        assert answered == sent
        for index, actor in enumerate(actors):
            assert actor.machine.ignored == expected["report"][index]
            assert actor.machine.successes == expected["success"][index]

    asyncio.run(main())


def test_a_report_for_a_breaker_in_the_middle_of_a_turn_waits_for_its_next_turn(
    clock: FakeClock,
) -> None:
    # A breaker's own reply callback posts to it: handled after, never inside.
    system = ActorSystem(clock=clock)
    actor, _ = system.actor("svc", BreakerConfig(min_calls=1000, window_size=1000))
    events: list[str] = []
    done = threading.Event()

    def first(result: Any, error: BaseException | None) -> None:
        events.append("first answered")
        actor.ask(StatusRequest("svc"), second)
        events.append("second asked")

    def second(result: Any, error: BaseException | None) -> None:
        events.append("second answered")
        done.set()

    actor.ask(Report("svc", actor.machine.generation, Outcome.IGNORED), first)
    with system.running_in_thread():
        assert done.wait(10)
    assert events == ["first answered", "second asked", "second answered"]
