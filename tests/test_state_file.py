"""The state file's encoding, its atomic writes, and machines that carry on after a restart.

Every instant is explicit (a fake monotonic ``now`` and a fake wall clock):
nothing sleeps and no real clock decides anything.
"""

from __future__ import annotations

import grp
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from breakerd.actor._actor import BreakerActor
from breakerd.actor._machine import BreakerConfig, Machine
from breakerd.actor.daemon._config import ConfigError, load_config, with_state_file
from breakerd.actor.daemon._reload import reload_config
from breakerd.actor.daemon._server import Daemon
from breakerd.actor.daemon._state_file import (
    StateFile,
    StateFileError,
    decode_state,
    encode_state,
)
from breakerd.actor.daemon._systemd import watchdog
from breakerd.actor.testing import FakeClock
from breakerd.protocol import CircuitState, Outcome

CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN

NOW = 5_000.0  # the writing daemon's monotonic clock
WALL = 1_800_000_000.0  # and its wall clock, at the same instant


def round_trip(
    machine: Machine, *, now: float, wall: float, later: float, wall_later: float
) -> Machine:
    data = encode_state([machine.export_state(now)], now, wall)
    (restored,) = decode_state(data, later, wall_later)
    return restored


def tripped(**settings_: Any) -> Machine:
    machine = Machine("svc", BreakerConfig(min_calls=2, timeout=30.0, **settings_))
    for at in (NOW - 2, NOW - 1):
        decision = machine.acquire(at)
        machine.record(decision.generation, Outcome.FAILURE, at)
    assert machine.state is OPEN
    return machine


# -- what comes back -------------------------------------------------------------


def test_an_open_breaker_stays_open_for_the_rest_of_its_time_across_a_reboot() -> None:
    machine = tripped()
    assert machine.open_until == NOW - 1 + 30
    # A reboot: the monotonic clock starts again near 0, the wall clock moved on 10 s.
    restored = round_trip(machine, now=NOW, wall=WALL, later=7.0, wall_later=WALL + 10)
    assert restored.state is OPEN
    assert restored.open_until == 7.0 + (29.0 - 10.0)
    assert not restored.acquire(7.0 + 18.5).admitted
    assert restored.acquire(7.0 + 19.0).admitted  # the trial, on schedule


def test_a_wall_clock_set_back_does_not_lengthen_the_open_time() -> None:
    machine = tripped()
    restored = round_trip(machine, now=NOW, wall=WALL, later=NOW + 5, wall_later=WALL - 3600)
    # At most what it had left when written.
    assert restored.open_until == NOW + 5 + 29.0


def test_generation_moves_on_so_a_report_from_before_the_restart_is_stale() -> None:
    machine = tripped()
    before = machine.generation
    restored = round_trip(machine, now=NOW, wall=WALL, later=NOW + 40, wall_later=WALL + 40)
    assert restored.generation == before + 1
    trial = restored.acquire(NOW + 40)
    assert trial.admitted
    assert trial.lease
    # A report for the old generation counts for nothing...
    assert not restored.record(before, Outcome.SUCCESS, NOW + 40).counted
    # ...the trial's does.
    result = restored.record(trial.generation, Outcome.SUCCESS, NOW + 40, lease=trial.lease)
    assert [t.to_state for t in result.transitions] == [CLOSED]


def test_backoff_level_survives() -> None:
    machine = tripped(backoff=2.0, max_timeout=1000.0)
    restored = round_trip(machine, now=NOW, wall=WALL, later=NOW + 30, wall_later=WALL + 30)
    trial = restored.acquire(NOW + 30)
    result = restored.record(trial.generation, Outcome.FAILURE, NOW + 30, lease=trial.lease)
    (reopen,) = result.transitions
    # The second opening in a row: twice the timeout, as without the restart.
    assert reopen.open_until == NOW + 30 + 60.0


@pytest.mark.parametrize("op", ["force_open", "disable"])
def test_administrative_states_survive(op: str) -> None:
    machine = Machine("svc")
    getattr(machine, op)(NOW)
    restored = round_trip(machine, now=NOW, wall=WALL, later=NOW + 1, wall_later=WALL + 1)
    assert restored.state is machine.state
    assert restored.open_until is None


def test_window_totals_and_lease_ids_come_back_exactly() -> None:
    machine = Machine("svc", BreakerConfig(min_calls=5, window_size=10, slow_call_duration=1.0))
    outcomes = [Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED, Outcome.SUCCESS]
    for at, outcome in enumerate(outcomes):
        decision = machine.acquire(NOW + at)
        machine.record(decision.generation, outcome, NOW + at, duration=2.0 * (at % 2))
    machine.count_rejections(7)
    restored = round_trip(machine, now=NOW + 9, wall=WALL, later=NOW + 20, wall_later=WALL + 11)
    expected = machine.export_state(NOW + 9)
    expected["generation"] += 1
    assert restored.export_state(NOW + 20) == expected
    assert (restored.failure_rate(), restored.slow_call_rate()) == (1 / 3, 2 / 3)


def test_a_time_window_keeps_its_buckets_on_the_new_clock() -> None:
    machine = Machine("svc", BreakerConfig(min_calls=3, window_seconds=10))
    for at in (NOW + 0.5, NOW + 3.5, NOW + 3.75):
        decision = machine.acquire(at)
        machine.record(decision.generation, Outcome.FAILURE, at)
    assert machine.window_calls == 3
    assert machine.state is OPEN
    machine.reset(NOW + 4)
    for at in (NOW + 4.5, NOW + 6.5):
        decision = machine.acquire(at)
        machine.record(decision.generation, Outcome.FAILURE, at)
    # A reboot 2 s later: the buckets move to the new clock, one failure more trips it.
    restored = round_trip(machine, now=NOW + 7, wall=WALL, later=100.0, wall_later=WALL + 2)
    assert restored.window_calls == 2
    decision = restored.acquire(100.0)
    result = restored.record(decision.generation, Outcome.FAILURE, 100.0)
    assert [t.to_state for t in result.transitions] == [OPEN]
    # And the oldest bucket leaves the window when it would have without the restart.
    other = round_trip(machine, now=NOW + 7, wall=WALL, later=100.0, wall_later=WALL + 2)
    other.age(100.0 + 7)
    assert other.window_calls == 1


def test_a_half_open_breaker_gives_back_its_leases_and_keeps_its_trials() -> None:
    machine = Machine("svc", BreakerConfig(min_calls=2, timeout=1.0, half_open_calls=2))
    for at in (NOW, NOW):
        decision = machine.acquire(at)
        machine.record(decision.generation, Outcome.FAILURE, at)
    first = machine.acquire(NOW + 1)
    machine.acquire(NOW + 1)  # a second lease, whose holder dies with the daemon
    machine.record(first.generation, Outcome.SUCCESS, NOW + 1, lease=first.lease)
    assert machine.state is HALF_OPEN
    assert machine.trials_in_flight == 1
    restored = round_trip(machine, now=NOW + 1, wall=WALL, later=NOW + 2, wall_later=WALL + 1)
    assert restored.state is HALF_OPEN
    assert restored.trials_in_flight == 0
    again = restored.acquire(NOW + 2)
    assert again.lease > first.lease + 1  # lease ids never repeat
    result = restored.record(again.generation, Outcome.SUCCESS, NOW + 2, lease=again.lease)
    assert [t.to_state for t in result.transitions] == [CLOSED]


# -- a round trip of any machine -------------------------------------------------

_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["success", "failure", "ignored", "slow", "wait", "force", "reset"]),
        st.integers(0, 4),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    steps=_STEPS,
    time_window=st.booleans(),
    backoff=st.sampled_from([1.0, 2.0]),
    elapsed=st.integers(0, 100),
    new_base=st.integers(0, 10**6),
)
def test_any_machine_comes_back_as_it_was_one_generation_on(
    steps: list[tuple[str, int]], time_window: bool, backoff: float, elapsed: int, new_base: int
) -> None:
    config = BreakerConfig(
        min_calls=3,
        window_size=8,
        window_seconds=5 if time_window else None,
        timeout=3.0,
        backoff=backoff,
        slow_call_duration=1.0,
        half_open_calls=2,
    )
    machine = Machine("svc", config)
    now = NOW
    for kind, amount in steps:
        if kind == "wait":
            now += amount + 0.5
        elif kind == "force":
            machine.force_open(now)
        elif kind == "reset":
            machine.reset(now)
        else:
            decision = machine.acquire(now)
            if decision.admitted:
                outcome = {"failure": Outcome.FAILURE, "ignored": Outcome.IGNORED}.get(
                    kind, Outcome.SUCCESS
                )
                duration = 2.0 if kind == "slow" else 0.0
                machine.record(
                    decision.generation, outcome, now, duration=duration, lease=decision.lease
                )
    later = float(new_base) + 0.5
    restored = round_trip(machine, now=now, wall=WALL, later=later, wall_later=WALL + elapsed)
    expected = machine.export_state(now)
    got = restored.export_state(later)
    assert got["generation"] == expected["generation"] + 1
    if expected["open_until"] is not None:
        assert got["open_until"] == expected["open_until"] - now - elapsed + later
    if time_window:
        shift = later - elapsed - now
        expected["window"]["buckets"] = [
            [math.floor(second + shift), *rest] for second, *rest in expected["window"]["buckets"]
        ]
        # Buckets the restore already considers too old are gone.
        got_buckets = got["window"]["buckets"]
        assert got_buckets == expected["window"]["buckets"][-len(got_buckets) :] or not got_buckets
    if expected["state"] != "half_open":
        assert got["trials"] == expected["trials"]
    for key in ("state", "open_streak", "totals", "config", "name", "next_lease"):
        assert got[key] == expected[key], key
    if not time_window:
        assert got["window"] == expected["window"]


# -- bad files -------------------------------------------------------------------


def valid_document() -> dict[str, Any]:
    data = encode_state([tripped().export_state(NOW)], NOW, WALL)
    document: dict[str, Any] = json.loads(data)
    return document


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=2), "version 2 is not supported"),
        (lambda d: d.update(format="other"), "not a breakerd state file"),
        (lambda d: d["breakers"][0].update(state="sideways"), "'svc'"),
        (lambda d: d["breakers"][0].update(open_until=None), "open_until"),
        (lambda d: d["breakers"][0].update(generation=-1), "count"),
        (lambda d: d["breakers"][0]["config"].update(timeout=-1), "timeout"),
        (lambda d: d["breakers"][0]["window"].update(items="0x"), "digits"),
        (lambda d: d["breakers"][0].pop("totals"), "totals"),
        (lambda d: d["breakers"].append(d["breakers"][0]), "appears twice"),
    ],
)
def test_an_inconsistent_file_is_refused_with_a_reason(mutate: Any, message: str) -> None:
    document = valid_document()
    mutate(document)
    with pytest.raises(StateFileError, match=message):
        decode_state(json.dumps(document).encode(), NOW, WALL)


def test_a_truncated_file_is_refused() -> None:
    data = encode_state([tripped().export_state(NOW)], NOW, WALL)
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(StateFileError):
            decode_state(data[:cut], NOW, WALL)


# -- the file on disk ------------------------------------------------------------


class _Wall:
    def __init__(self) -> None:
        self.now = WALL

    def __call__(self) -> float:
        return self.now


def make_actor(clock: FakeClock, name: str = "svc") -> BreakerActor:
    return BreakerActor(name, BreakerConfig(min_calls=2, timeout=30.0), clock=clock)


def test_writes_are_atomic_private_and_only_when_something_changed(tmp_path: Path) -> None:
    clock, wall = FakeClock(NOW), _Wall()
    actor = make_actor(clock)
    path = tmp_path / "b.state"
    state_file = StateFile(path, lambda: [actor], clock=clock, wall_clock=wall)
    actor.listeners.append(state_file.on_transition)
    assert state_file.write()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not state_file.write()  # nothing changed: nothing written
    actor.post_success(actor.machine.generation, 3)
    assert state_file.write(settle=True)  # the tally was applied and written
    assert json.loads(path.read_bytes())["breakers"][0]["totals"]["successes"] == 3
    assert state_file.writes == 2
    # A transition is written from the listener, before its cause is answered.
    generation = actor.machine.generation
    for _ in range(4):  # 4 failures of 7 calls: above one half
        actor.post_report((generation, Outcome.FAILURE, 0.0))
    actor.settle()
    assert state_file.writes == 3
    assert json.loads(path.read_bytes())["breakers"][0]["state"] == "open"
    assert sorted(os.listdir(tmp_path)) == ["b.state"]  # no temporary file left


def test_a_bad_file_is_set_aside_and_the_daemon_starts_empty(tmp_path: Path) -> None:
    clock, wall = FakeClock(NOW), _Wall()
    path = tmp_path / "b.state"
    path.write_bytes(b'{"format": "breakerd-state", "version": 1, "breakers": [')
    state_file = StateFile(path, list, clock=clock, wall_clock=wall)
    assert state_file.load() == []
    assert not path.exists()
    aside = tmp_path / f"b.state.bad-{int(WALL)}"
    assert aside.read_bytes().startswith(b'{"format"')


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    clock, wall = FakeClock(NOW), _Wall()
    target = tmp_path / "elsewhere"
    target.write_bytes(encode_state([tripped().export_state(NOW)], NOW, WALL))
    path = tmp_path / "b.state"
    path.symlink_to(target)
    actor = make_actor(clock)
    state_file = StateFile(path, lambda: [actor], clock=clock, wall_clock=wall)
    assert state_file.load() == []
    assert (tmp_path / f"b.state.bad-{int(WALL)}").is_symlink()
    assert state_file.write()
    assert not path.is_symlink()
    assert target.read_bytes().count(b'"open"') == 1


def test_a_failed_write_is_retried_and_never_raises(tmp_path: Path) -> None:
    clock, wall = FakeClock(NOW), _Wall()
    actor = make_actor(clock)
    path = tmp_path / "missing" / "b.state"
    state_file = StateFile(path, lambda: [actor], clock=clock, wall_clock=wall)
    assert not state_file.write()
    path.parent.mkdir()
    assert state_file.write()


def test_reload_keeps_state_and_a_compatible_window() -> None:
    machine = Machine("svc", BreakerConfig(min_calls=5, window_size=10))
    for _ in range(3):
        decision = machine.acquire(NOW)
        machine.record(decision.generation, Outcome.FAILURE, NOW)
    generation = machine.generation
    assert machine.reconfigure(BreakerConfig(min_calls=3, window_size=10), NOW) == ()
    assert (machine.window_calls, machine.generation) == (3, generation)
    decision = machine.acquire(NOW)
    result = machine.record(decision.generation, Outcome.FAILURE, NOW)
    assert [t.to_state for t in result.transitions] == [OPEN]
    machine.reset(NOW)
    decision = machine.acquire(NOW)
    machine.record(decision.generation, Outcome.FAILURE, NOW)
    # Another window size: outcomes judged under the old one start over.
    machine.reconfigure(BreakerConfig(min_calls=3, window_size=20), NOW)
    assert machine.window_calls == 0


def test_reload_judges_a_half_open_breaker_that_has_all_its_trials() -> None:
    machine = Machine("svc", BreakerConfig(min_calls=1, timeout=1.0, half_open_calls=2))
    decision = machine.acquire(NOW)
    machine.record(decision.generation, Outcome.FAILURE, NOW)
    trial = machine.acquire(NOW + 1)
    machine.record(trial.generation, Outcome.SUCCESS, NOW + 1, lease=trial.lease)
    assert machine.state is HALF_OPEN
    transitions = machine.reconfigure(BreakerConfig(min_calls=1, timeout=1.0), NOW + 1)
    assert [t.to_state for t in transitions] == [CLOSED]


# -- the watchdog ----------------------------------------------------------------


@pytest.mark.anyio
async def test_the_watchdog_is_fed_only_once_every_actor_has_drained() -> None:
    clock = FakeClock(NOW)
    actors = [make_actor(clock, "a"), make_actor(clock, "b")]
    sent: list[str] = []
    async with anyio.create_task_group() as group:
        group.start_soon(watchdog, 3600.0, lambda: actors, sent.append)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        # Neither actor's task runs: their pings wait in the inboxes.
        assert sent == []
        actors[0].settle()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert sent == []
        actors[1].settle()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert sent == ["WATCHDOG=1"]
        group.cancel_scope.cancel()


# -- where the file goes -----------------------------------------------------------


def test_the_state_file_goes_beside_the_socket_unless_told(tmp_path: Path) -> None:
    assert load_config(None, Path("/run/b/breakerd.sock")).state_file_path() == Path(
        "/run/b/breakerd.state"
    )
    # A socket named like a state file is never replaced by one.
    assert load_config(None, Path("/run/b/x.state")).state_file_path() == Path(
        "/run/b/x.state.state"
    )
    config = tmp_path / "b.toml"
    config.write_text('[daemon]\nstate_file = "/var/lib/breakerd/state.json"\n')
    settings = load_config(config, Path("/run/b/breakerd.sock"))
    assert settings.state_file_path() == Path("/var/lib/breakerd/state.json")
    # The command line wins over the file.
    assert with_state_file(settings, "none").state_file_path() is None
    assert with_state_file(settings, "/x/s.json").state_file_path() == Path("/x/s.json")
    config.write_text("[daemon]\nstate_file = 1\n")
    with pytest.raises(ConfigError, match='state_file must be a path or "none"'):
        load_config(config, Path("/run/b/breakerd.sock"))


# -- SIGHUP's reload, on a daemon that is not running -----------------------------------


def test_reload_applies_sections_keeps_what_needs_a_restart_and_survives_a_bad_file(
    tmp_path: Path,
) -> None:
    config = tmp_path / "b.toml"
    config.write_text("[breakers.svc]\nmin_calls = 5\n")
    daemon = Daemon(load_config(config, tmp_path / "s.sock"), handle_signals=False)
    actor, _ = daemon.system.actor("svc", daemon.settings.configured("svc"))
    other, _ = daemon.system.actor("other", BreakerConfig(min_calls=3))
    group = grp.getgrgid(os.getgid()).gr_name
    config.write_text(
        f'[daemon]\nsocket_group = "{group}"\nmax_connections = 7\n'
        "[defaults]\nmin_calls = 9\n[breakers.svc]\nmin_calls = 2\n"
    )
    with capture_logs() as logs:
        assert reload_config(daemon)
    assert actor.config.min_calls == 2
    assert other.config.min_calls == 3  # no section: [defaults] is for new breakers
    assert daemon.settings.max_connections == 7
    assert daemon.settings.socket_gid is None  # the socket is made already
    events = {log["event"]: log for log in logs}
    assert events["config_reload_needs_restart"]["settings"] == ["socket_mode", "socket_gid"]
    assert events["breaker_reconfigured"]["settings"] == ["min_calls"]

    config.write_text("[breakers.svc]\nmin_calls = 0\n")
    with capture_logs() as logs:
        assert not reload_config(daemon)
    assert actor.config.min_calls == 2
    assert [log["event"] for log in logs] == ["config_reload_failed"]
    assert "min_calls must be an integer >= 1" in logs[0]["error"]


def test_reload_without_a_config_file_changes_nothing(tmp_path: Path) -> None:
    daemon = Daemon(load_config(None, tmp_path / "s.sock"), handle_signals=False)
    with capture_logs() as logs:
        assert not reload_config(daemon)
    assert [log["event"] for log in logs] == ["config_reload_skipped"]


def test_a_file_written_in_pieces_holds_every_breaker_as_encode_state_would(
    tmp_path: Path,
) -> None:
    # More breakers than one piece holds, two sets of settings among them.
    clock, wall = FakeClock(NOW), _Wall()
    slow = BreakerConfig(min_calls=2, timeout=30.0, slow_call_duration=2.0)
    actors = [
        BreakerActor(f"svc-{i:04}", slow if i % 3 else BreakerConfig(), clock=clock)
        for i in range(2_500)
    ]
    for actor in actors[::7]:
        actor.post_success(actor.machine.generation, 2)
        actor.settle()
    path = tmp_path / "b.state"
    state_file = StateFile(path, lambda: actors, clock=clock, wall_clock=wall)
    assert state_file.write()
    expected = encode_state([actor.export_state() for actor in actors], NOW, WALL)
    assert json.loads(path.read_bytes()) == json.loads(expected)


def test_new_settings_alone_are_written(tmp_path: Path) -> None:
    clock, wall = FakeClock(NOW), _Wall()
    actor = make_actor(clock)
    path = tmp_path / "b.state"
    state_file = StateFile(path, lambda: [actor], clock=clock, wall_clock=wall)
    assert state_file.write()
    actor.reconfigure(BreakerConfig(min_calls=9, timeout=30.0))
    assert state_file.write()  # no outcome, no transition: the settings changed
    (record,) = json.loads(path.read_bytes())["breakers"]
    assert record["config"]["min_calls"] == 9
    assert not state_file.write()
