"""The fleet's pure parts: share modes, deadlines, messages, config, the machine's moves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from breakerd.actor._machine import BreakerConfig, Machine
from breakerd.actor.daemon._config import ConfigError, load_config
from breakerd.actor.daemon._fleet_logic import (
    Share,
    bound_remaining,
    fleet_deadline,
    parse_message,
    parse_share,
)
from breakerd.protocol import CircuitState, Outcome


def test_share_modes_parse_and_print() -> None:
    assert parse_share("off") == Share("off")
    assert parse_share("open") == Share("open")
    assert parse_share("quorum:3") == Share("quorum", 3)
    assert str(parse_share("quorum:3")) == "quorum:3"
    for bad in ("quorum:0", "quorum:", "quorum:x", "on", 1, None):
        with pytest.raises(ValueError, match="share must be"):
            parse_share(bad)


def test_open_follows_the_latest_other_host() -> None:
    opens = {"me": 50.0, "a": 20.0, "b": 30.0, "old": 5.0}
    assert fleet_deadline(opens, 10.0, Share("open"), "me") == 30.0
    assert fleet_deadline({"me": 50.0}, 10.0, Share("open"), "me") is None  # only ours
    assert fleet_deadline(opens, 40.0, Share("open"), "me") is None  # the others are over
    assert fleet_deadline(opens, 10.0, Share("off"), "me") is None


def test_quorum_opens_only_while_n_hosts_are_open() -> None:
    quorum = Share("quorum", 2)
    assert fleet_deadline({"a": 30.0}, 10.0, quorum, "me") is None  # one sick host
    # Two open: open until the second latest deadline, when one remains.
    assert fleet_deadline({"a": 30.0, "b": 20.0}, 10.0, quorum, "me") == 20.0
    assert fleet_deadline({"a": 30.0, "b": 20.0, "c": 25.0}, 10.0, quorum, "me") == 25.0
    assert fleet_deadline({"a": 30.0, "b": 20.0}, 21.0, quorum, "me") is None
    # This host's own open counts.
    assert fleet_deadline({"a": 30.0, "me": 40.0}, 10.0, quorum, "me") == 30.0


def test_a_deadline_from_redis_is_bounded() -> None:
    assert bound_remaining(3.0, 10.0) == (3.0, None)
    assert bound_remaining(-1.0, 10.0) == (None, None)  # over already
    left, problem = bound_remaining(365 * 86400.0, 10.0)
    assert left == 10.0
    assert problem is not None
    assert "max_timeout" in problem
    assert bound_remaining(math.inf, 10.0)[0] is None
    assert bound_remaining(math.nan, 10.0)[0] is None
    assert bound_remaining(1e9, None)[0] == 600.0  # no bound configured: the default's


def test_messages_parse() -> None:
    data = json.dumps(
        {"op": "open", "name": "api", "host": "h", "now": 5, "opens": ["h", "10", "g", "7"]}
    )
    message = parse_message(data)
    assert message.opens == {"h": 10.0, "g": 7.0}
    assert message.now == 5.0
    close = parse_message(json.dumps({"op": "close", "name": "api", "host": "h", "now": 5}))
    assert close.op == "close"
    assert close.opens == {}
    empty = json.dumps({"op": "open", "name": "api", "host": "h", "now": 5, "opens": {}})
    assert parse_message(empty).opens == {}
    admin = json.dumps({"op": "admin", "name": "a", "host": "h", "now": 5, "admin": "reset"})
    assert parse_message(admin).admin == "reset"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",
        b"[]",
        b'{"op": "drop", "name": "a", "host": "h", "now": 1}',
        b'{"op": "open", "name": 1, "host": "h", "now": 1}',
        b'{"op": "open", "name": "a", "host": "h", "now": "x"}',
        b'{"op": "open", "name": "a", "host": "h", "now": 1, "opens": ["h"]}',
        b'{"op": "open", "name": "a", "host": "h", "now": 1, "opens": ["h", "inf"]}',
        b'{"op": "open", "name": "a", "host": "h", "now": 1, "opens": [1, "2"]}',
        b'{"op": "admin", "name": "a", "host": "h", "now": 1, "admin": "explode"}',
    ],
)
def test_bad_messages_are_refused_with_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_message(data)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_no_payload_raises_anything_but_value_error(data: bytes) -> None:
    try:
        parse_message(data)
    except ValueError:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.sampled_from(["op", "name", "host", "now", "opens"]), children)
        ),
        max_leaves=12,
    )
)
def test_no_json_value_raises_anything_but_value_error(value: object) -> None:
    try:
        parse_message(json.dumps(value))
    except ValueError:
        pass


# -- config --------------------------------------------------------------------------


def test_fleet_config(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text(
        '[fleet]\nredis = "unix:///run/redis.sock"\nshare = "quorum:2"\nhost = "h1"\n'
        '[breakers.a]\nshare = "off"\n[breakers.b]\ntimeout = 5.0\nshare = "open"\n'
    )
    settings = load_config(path, tmp_path / "s.sock")
    fleet = settings.fleet
    assert fleet is not None
    assert fleet.redis == "unix:///run/redis.sock"
    assert fleet.host == "h1"
    assert fleet.share_for("a") == Share("off")
    assert fleet.share_for("b") == Share("open")
    assert fleet.share_for("c") == Share("quorum", 2)
    # A section that only says what to share leaves the settings to clients.
    assert settings.configured("a") is None
    assert settings.configured("b") == BreakerConfig(timeout=5.0)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[fleet]\nredis = "http://x"\n', "redis must be"),
        ('[fleet]\nredis = "redis://x"\nshare = "some"\n', "share must be"),
        ('[fleet]\nredis = "redis://x"\nport = 1\n', "unknown \\[fleet\\] setting"),
        ('[breakers.a]\nshare = "quorum:0"\n', "share must be"),
    ],
)
def test_bad_fleet_config_is_refused(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_config(path, tmp_path / "s.sock")


def test_no_fleet_without_a_section(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text("[breakers.a]\ntimeout = 5.0\n")
    assert load_config(path, tmp_path / "s.sock").fleet is None


# -- the machine's fleet moves (a fake clock: plain numbers) ----------------------------


def _tripped(now: float) -> Machine:
    machine = Machine("m", BreakerConfig(min_calls=1, timeout=10.0))
    machine.record(machine.generation, Outcome.FAILURE, now)
    assert machine.state is CircuitState.OPEN
    return machine


def test_fleet_open_opens_a_closed_breaker_and_opens_only_grow() -> None:
    machine = Machine("m", BreakerConfig())
    (transition,) = machine.fleet_open(50.0, 0.0)
    assert transition.to_state is CircuitState.OPEN
    assert transition.reason == "fleet_open"
    assert machine.open_until == 50.0
    generation = machine.generation
    assert machine.fleet_open(40.0, 1.0) == ()  # earlier: nothing
    assert machine.open_until == 50.0
    assert machine.generation == generation
    assert machine.fleet_open(60.0, 1.0) == ()  # later: extended, a new generation
    assert machine.open_until == 60.0
    assert machine.generation == generation + 1
    assert not machine.acquire(55.0).admitted
    assert machine.fleet_open(0.5, 1.0) == ()  # in the past: nothing


def test_fleet_open_cuts_a_half_open_trial_short() -> None:
    machine = _tripped(0.0)
    decision = machine.acquire(10.0)
    assert decision.lease
    assert machine.state is CircuitState.HALF_OPEN
    (transition,) = machine.fleet_open(30.0, 10.5)
    assert transition.from_state is CircuitState.HALF_OPEN
    assert transition.to_state is CircuitState.OPEN
    assert machine.trials_in_flight == 0


def test_fleet_leaves_admin_states_alone() -> None:
    machine = Machine("m", BreakerConfig())
    machine.force_open(0.0)
    assert machine.fleet_open(50.0, 1.0) == ()
    assert machine.state is CircuitState.FORCED_OPEN
    assert machine.fleet_close(1.0) == ()
    assert machine.state is CircuitState.FORCED_OPEN


def test_fleet_close_goes_through_half_open() -> None:
    machine = _tripped(0.0)
    transitions = machine.fleet_close(1.0)
    assert [(t.from_state, t.to_state) for t in transitions] == [
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]
    assert machine.state is CircuitState.CLOSED
    assert Machine("m").fleet_close(0.0) == ()  # closed already


@given(
    st.dictionaries(
        st.sampled_from(["me", "a", "b", "c", "d"]),
        st.floats(min_value=-100, max_value=100, allow_nan=False),
        max_size=5,
    ),
    st.floats(min_value=-50, max_value=50, allow_nan=False),
    st.integers(min_value=1, max_value=6),
)
def test_fleet_deadline_properties(opens: dict[str, float], now: float, quorum: int) -> None:
    others = [until for host, until in opens.items() if host != "me" and until > now]
    shared = fleet_deadline(opens, now, Share("open"), "me")
    # Open: the latest other host still open, or nothing.
    assert shared == (max(others) if others else None)
    until = fleet_deadline(opens, now, Share("quorum", quorum), "me")
    live = [u for u in opens.values() if u > now]
    if until is None:
        assert len(live) < quorum
    else:
        # Until then at least N hosts are open; right after it, fewer than N.
        assert until > now
        assert sum(u >= until for u in live) >= quorum
        assert sum(u > until for u in live) < quorum
