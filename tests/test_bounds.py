"""Bounds that keep one breaker, or one client, from costing the others.

The machine and the actor with a fake clock; no sleeps. The daemon's side of
these bounds runs a real daemon in ``test_daemon_bounds.py``.
"""

from __future__ import annotations

import concurrent.futures
import math
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import poll_until

from breakerd.actor import ActorSystem, BreakerActor, BreakerConfig
from breakerd.actor._machine import Machine
from breakerd.actor.daemon import Daemon, DaemonSettings
from breakerd.actor.daemon._config import ConfigError, load_config
from breakerd.actor.daemon._reclaim import IdleBreakers, sweep_period
from breakerd.actor.daemon._state_table import SharedStateTable
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker
from breakerd.protocol import (
    Acquire,
    Admin,
    Admission,
    CircuitState,
    LimitExceededError,
    Outcome,
    Report,
    Snapshot,
    StatusRequest,
)

CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN
F = Outcome.FAILURE
S = Outcome.SUCCESS


# -- a finite default max_timeout ----------------------------------------------------


#: Ten minutes: see ``BreakerConfig.max_timeout``.
DEFAULT_MAX_TIMEOUT = 600.0


def test_max_timeout_defaults_to_a_finite_bound() -> None:
    assert BreakerConfig().max_timeout == DEFAULT_MAX_TIMEOUT
    assert BreakerConfig.from_dict({}).max_timeout == DEFAULT_MAX_TIMEOUT


def test_a_huge_retry_after_opens_for_at_most_the_default_max_timeout() -> None:
    machine = Machine("svc", BreakerConfig())
    result = machine.record(0, Outcome.RATE_LIMITED, 100.0, retry_after=1e7)
    assert result.transitions[0].open_until == 100.0 + DEFAULT_MAX_TIMEOUT


def test_a_timeout_above_the_default_max_raises_the_default_max_to_it() -> None:
    config = BreakerConfig(timeout=3600.0)
    assert config.max_timeout == 3600.0
    # An explicit bound still has to be at least the timeout...
    with pytest.raises(ValueError, match=r"^max_timeout must be"):
        BreakerConfig(timeout=3600.0, max_timeout=900.0)
    # ...and None still means no bound at all, for those who ask for it.
    assert BreakerConfig(max_timeout=None).max_timeout is None


def test_circuit_breaker_uses_the_finite_default() -> None:
    with ActorSystem(clock=FakeClock()).running_in_thread() as system:
        assert CircuitBreaker("svc", system=system).config.max_timeout == DEFAULT_MAX_TIMEOUT
        long = CircuitBreaker("long", timeout=7200.0, system=system)
        assert long.config.max_timeout == 7200.0


# -- backoff cannot overflow ---------------------------------------------------------


def reopen(m: Machine, now: float) -> float:
    """Let the open deadline pass, fail the trial; the new open duration."""
    assert m.state is OPEN
    assert m.open_until is not None
    now = max(now, m.open_until)
    decision = m.acquire(now)
    assert decision.admitted
    assert decision.lease
    m.record(decision.generation, F, now, lease=decision.lease)
    assert m.state is OPEN
    assert m.open_until is not None
    return m.open_until - now


def test_backoff_stays_capped_after_hundreds_of_reopens() -> None:
    # 10 ** 309 overflows a float: today's 308th re-open raised OverflowError.
    m = Machine("svc", BreakerConfig(min_calls=1, timeout=1.0, backoff=10.0, max_timeout=60.0))
    m.record(0, F, 0.0)
    durations = [reopen(m, 0.0) for _ in range(400)]
    assert durations[:2] == [10.0, 60.0]
    assert set(durations[1:]) == {60.0}


def test_backoff_without_a_bound_grows_to_infinity_without_raising() -> None:
    m = Machine("svc", BreakerConfig(min_calls=1, timeout=1.0, backoff=10.0, max_timeout=None))
    m.record(0, F, 0.0)
    durations = [reopen(m, 0.0)]
    while not math.isinf(durations[-1]) and len(durations) < 400:
        durations.append(reopen(m, 0.0))
    assert math.isinf(durations[-1])
    assert durations == sorted(durations)


def test_zero_timeout_with_backoff_stays_zero() -> None:
    m = Machine("svc", BreakerConfig(min_calls=1, timeout=0.0, backoff=10.0, max_timeout=None))
    m.record(0, F, 0.0)
    assert {reopen(m, 0.0) for _ in range(400)} == {0.0}


# -- supervision keeps the state of a breaker whose machine raised ---------------------


def ask(actor: BreakerActor, message: object) -> Any:
    answer: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def reply(result: Any, error: BaseException | None) -> None:
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    actor.ask(message, reply)
    return answer.result(timeout=10)


def state_of(actor: BreakerActor) -> Snapshot:
    status = ask(actor, StatusRequest(actor.name))
    snapshot: Snapshot = status.snapshot
    return snapshot


def break_the_open(actor: BreakerActor) -> None:
    """Make the current machine raise on its next attempt to open (a bug in it)."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug while opening")

    actor.machine._open = broken  # type: ignore[method-assign]


def half_open_with_a_trial(actor: BreakerActor, clock: FakeClock) -> Admission:
    first = ask(actor, Acquire(actor.name))
    opened = ask(actor, Report(actor.name, first.generation, F))
    assert opened.state is OPEN
    clock.advance(actor.config.timeout)
    trial: Admission = ask(actor, Acquire(actor.name))
    assert trial.admitted
    assert trial.lease
    assert trial.snapshot.state is HALF_OPEN
    return trial


TRIAL_CONFIG = BreakerConfig(min_calls=1, timeout=10.0, half_open_max_wait=5.0)


def test_a_machine_that_raises_on_a_failed_trial_restarts_open(
    system: ActorSystem, clock: FakeClock
) -> None:
    actor, _ = system.actor("svc", TRIAL_CONFIG)
    trial = half_open_with_a_trial(actor, clock)
    break_the_open(actor)
    with pytest.raises(Exception, match="crashed"):
        ask(actor, Report("svc", trial.generation, F, lease=trial.lease))
    assert actor.restarts == 1
    after = state_of(actor)
    # Fail safe: the verdict of the trial is unknown, so the breaker is open
    # for a timeout, never closed; at a newer generation.
    assert after.state is OPEN
    assert after.generation > trial.generation
    assert after.open_until == clock() + TRIAL_CONFIG.timeout
    assert not ask(actor, Acquire("svc")).admitted
    # And it recovers as any open breaker does.
    clock.advance(TRIAL_CONFIG.timeout)
    again = ask(actor, Acquire("svc"))
    assert again.admitted
    assert again.lease
    assert ask(actor, Report("svc", again.generation, S, lease=again.lease)).state is CLOSED


def test_a_machine_that_raises_on_an_expired_lease_restarts_open_not_wedged(
    system: ActorSystem, clock: FakeClock
) -> None:
    actor, _ = system.actor("svc", TRIAL_CONFIG)
    trial = half_open_with_a_trial(actor, clock)
    break_the_open(actor)
    # Parked in its own loop until the lease's deadline (another thread's
    # doing: wait for it, so the wake-up below goes through that loop).
    assert poll_until(lambda: actor._asleep, 10.0)
    clock.advance(TRIAL_CONFIG.half_open_max_wait)
    # A fire-and-forget report wakes the actor's own loop, which expires the
    # overdue lease before anything else (the path of no request at all).
    assert actor.post_report((trial.generation, Outcome.IGNORED, 0.0))
    after = state_of(actor)
    assert actor.restarts == 1
    assert after.state is OPEN
    assert after.generation > trial.generation
    clock.advance(TRIAL_CONFIG.timeout)
    again = ask(actor, Acquire("svc"))
    assert again.admitted, "a breaker must never stay half-open"
    assert again.lease


def test_a_machine_that_raises_keeps_open_forced_open_and_disabled(
    system: ActorSystem, clock: FakeClock
) -> None:
    actor, _ = system.actor("svc", TRIAL_CONFIG)
    first = ask(actor, Acquire("svc"))
    opened = ask(actor, Report("svc", first.generation, F))
    assert opened.state is OPEN

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")

    actor.machine.acquire = broken  # type: ignore[method-assign]
    with pytest.raises(Exception, match="crashed"):
        ask(actor, Acquire("svc"))
    after = state_of(actor)
    assert (after.state, after.open_until) == (OPEN, opened.open_until)
    assert after.generation > opened.generation
    assert state_of(actor).state is OPEN
    for op, state in (("force_open", CircuitState.FORCED_OPEN), ("disable", CircuitState.DISABLED)):
        assert ask(actor, Admin("svc", op)).state is state  # type: ignore[arg-type]
        actor.machine.acquire = broken  # type: ignore[method-assign]
        with pytest.raises(Exception, match="crashed"):
            ask(actor, Acquire("svc"))
        assert state_of(actor).state is state


# -- idle breakers are reclaimed ---------------------------------------------------------


def test_idle_breakers_are_due_once_their_idle_time_is_up() -> None:
    idle = IdleBreakers(idle_after=60.0)
    idle.let_go("a", 100.0)
    idle.let_go("b", 130.0)
    assert idle.due(159.9) == []
    assert idle.due(160.0) == ["a"]
    assert idle.due(1000.0) == ["a", "b"]
    idle.held("a")  # a client registered it again
    assert idle.due(1000.0) == ["b"]
    idle.let_go("a", 500.0)  # and left again: the clock starts over
    assert idle.due(559.0) == ["b"]
    idle.forget("b")
    assert idle.due(560.0) == ["a"]
    assert sweep_period(600.0) == 60.0
    assert sweep_period(0.2) == 0.05


def test_the_daemon_reclaims_closed_unheld_breakers_and_frees_their_slots(
    tmp_path: Path, clock: FakeClock
) -> None:
    settings = DaemonSettings(socket_path=tmp_path / "s.sock", breaker_idle_timeout=60.0)
    daemon = Daemon(settings, clock=clock, handle_signals=False)
    daemon.state_table = table = SharedStateTable(4)  # three breakers
    try:
        peer: Any = object()  # a connection, as far as holding goes
        slots = {}
        for name in ("idle", "open", "forced"):
            daemon.register(name, {"min_calls": 1})
            daemon.hold(name, peer)
            slots[name] = table.slot_for(name)
        assert table.full
        with pytest.raises(LimitExceededError, match="state table is full"):
            daemon.register("more", {})
        system = daemon.system
        open_actor = system.get("open")
        forced = system.get("forced")
        assert open_actor is not None
        assert forced is not None
        open_actor.machine.record(open_actor.machine.generation, F, clock())
        open_actor.snapshot = open_actor.machine.snapshot()
        forced.machine.force_open(clock())
        forced.snapshot = forced.machine.snapshot()
        for name in ("idle", "open", "forced"):
            daemon.let_go(name, peer)
        clock.advance(59.0)
        assert daemon.reclaim_idle() == []
        clock.advance(1.0)
        assert daemon.reclaim_idle() == ["idle"]
        assert system.get("idle") is None
        assert sorted(a.name for a in system.actors()) == ["forced", "open"]
        # Its slot is free for the next breaker; open and forced-open stay.
        assert not table.full
        daemon.register("next", {})
        assert table.slot_for("next") == slots["idle"]
        assert daemon.reclaim_idle() == []
    finally:
        table.close()
        daemon.system.stop()


def test_a_breaker_held_again_is_not_reclaimed(tmp_path: Path, clock: FakeClock) -> None:
    settings = DaemonSettings(socket_path=tmp_path / "s.sock", breaker_idle_timeout=60.0)
    daemon = Daemon(settings, clock=clock, handle_signals=False)
    first: Any = object()
    second: Any = object()
    daemon.register("svc", {})
    daemon.hold("svc", first)
    daemon.hold("svc", second)
    daemon.let_go("svc", first)
    clock.advance(120.0)
    assert daemon.reclaim_idle() == []  # the second still holds it
    daemon.let_go("svc", second)
    clock.advance(30.0)
    daemon.hold("svc", first)  # back before its idle time was up
    clock.advance(60.0)
    assert daemon.reclaim_idle() == []
    assert daemon.system.get("svc") is not None
    daemon.system.stop()


def test_the_breaker_limits_are_read_from_the_config_file(tmp_path: Path) -> None:
    socket_path = tmp_path / "s.sock"
    defaults = load_config(None, socket_path)
    assert (
        defaults.max_breakers,
        defaults.max_breakers_per_client,
        defaults.breaker_idle_timeout,
    ) == (10_000, 1_000, 600.0)
    config = tmp_path / "d.toml"
    config.write_text(
        "[daemon]\nmax_breakers = 20\nmax_breakers_per_client = 5\nbreaker_idle_timeout = 2\n"
    )
    settings = load_config(config, socket_path)
    assert (
        settings.max_breakers,
        settings.max_breakers_per_client,
        settings.breaker_idle_timeout,
    ) == (20, 5, 2.0)
    for line in (
        "max_breakers = 0",
        "max_breakers_per_client = -1",
        "max_breakers = 1.5",
        "breaker_idle_timeout = 0",
        "breaker_idle_timeout = inf",
        "breaker_idle_timeout = true",
        'breaker_idle_timeout = "1"',
    ):
        config.write_text(f"[daemon]\n{line}\n")
        key = line.split()[0]
        with pytest.raises(ConfigError, match=rf"\[daemon\] {key} must be"):
            load_config(config, socket_path)
