"""The fleet: daemons on separate sockets (separate hosts) sharing one real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from daemon_helpers import DaemonProcess, RawClient, poll_until, wait_for
from redis_helpers import RedisServer

from breakerd.protocol import CircuitState, Outcome

#: Every breaker in these tests: two failures open it.
TRIPPY: dict[str, Any] = {"min_calls": 2, "failure_threshold": 0.5, "timeout": 30.0}


@pytest.fixture
def redis_server(tmp_short: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_short)
    yield server
    server.kill()


class Fleet:
    """Daemons ("hosts") started against one Redis; all killed at the end."""

    def __init__(self, directory: Path, server: RedisServer) -> None:
        self.directory = directory
        self.server = server
        self.daemons: dict[str, DaemonProcess] = {}

    def start(self, host: str, config: str = "", *, share: str = "open") -> DaemonProcess:
        path = self.directory / f"{host}.toml"
        path.write_text(
            f'[fleet]\nredis = "{self.server.url}"\nhost = "{host}"\nshare = "{share}"\n{config}'
        )
        process = DaemonProcess(
            self.directory / f"{host}.sock",
            path,
            self.directory / f"{host}.log",
            loop="asyncio",
            extra_args=["--state-file", "none"],
        ).wait_ready(started_log=True)
        self.daemons[host] = process
        # The socket gets its name a moment after daemon_started is logged.
        wait_for(process.socket_path.exists, what=f"{host}'s socket")
        wait_for(lambda: "fleet_joined" in process.log(), what=f"{host} joining the fleet")
        return process

    def client(self, host: str) -> RawClient:
        return RawClient(self.daemons[host].socket_path)

    def kill(self) -> None:
        for process in self.daemons.values():
            process.kill()


@pytest.fixture
def fleet(tmp_short: Path, redis_server: RedisServer) -> Iterator[Fleet]:
    group = Fleet(tmp_short, redis_server)
    yield group
    group.kill()


def trip(client: RawClient, name: str) -> None:
    generation = client.register(name, **TRIPPY).generation
    for _ in range(2):
        snapshot = client.report(name, generation, Outcome.FAILURE)
    assert snapshot.state is CircuitState.OPEN


def state(client: RawClient, name: str) -> CircuitState:
    return client.status(name).breakers[0].snapshot.state


def in_state(client: RawClient, name: str, expected: CircuitState) -> bool:
    return state(client, name) is expected


def events(process: DaemonProcess, event: str) -> list[dict[str, Any]]:
    return [line for line in process.log_events() if line.get("event") == event]


def test_an_open_on_one_host_opens_the_others_and_late_joiners(fleet: Fleet) -> None:
    fleet.start("a")
    fleet.start("b")
    a, b = fleet.client("a"), fleet.client("b")
    b.register("api", **TRIPPY)
    trip(a, "api")
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 5.0)
    admission = b.acquire("api")
    assert not admission.admitted
    (received,) = events(fleet.daemons["b"], "fleet_open_received")
    assert received["reason"] == "a: failure_rate_exceeded"
    # B's deadline is A's (30 s), within the time the message took.
    (a_status,) = a.status("api").breakers
    (b_status,) = b.status("api").breakers
    assert a_status.snapshot.open_until is not None
    assert b_status.snapshot.open_until is not None
    assert abs(a_status.snapshot.open_until - b_status.snapshot.open_until) < 1.0
    # A host that joins later finds the open in Redis when it registers the breaker.
    fleet.start("c")
    c = fleet.client("c")
    c.register("api", **TRIPPY)
    assert poll_until(lambda: state(c, "api") is CircuitState.OPEN, 5.0)
    # A breaker nobody tripped stays closed everywhere.
    b.register("other", **TRIPPY)
    assert state(b, "other") is CircuitState.CLOSED


def test_share_off_keeps_a_breaker_to_itself(fleet: Fleet) -> None:
    config = '[breakers.private]\nshare = "off"\n'
    fleet.start("a", config)
    fleet.start("b", config)
    a, b = fleet.client("a"), fleet.client("b")
    b.register("private", **TRIPPY)
    b.register("public", **TRIPPY)
    trip(a, "private")
    trip(a, "public")
    # Messages travel in order on one channel: once "public" is open on B,
    # "private" would have been too.
    assert poll_until(lambda: state(b, "public") is CircuitState.OPEN, 5.0)
    assert state(b, "private") is CircuitState.CLOSED


def test_opens_only_grow_in_redis(redis_server: RedisServer) -> None:
    from breakerd.actor.daemon._fleet import OPEN_LUA

    r = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    script = r.register_script(OPEN_LUA)
    keys = ["t:open:x", "t:trial:x"]
    now, _ = script(keys=keys, args=["h1", 30_000, "x", "t:fleet", "0", "test"])
    _, opens = script(keys=keys, args=["h1", 1_000, "x", "t:fleet", "0", "test"])
    assert opens[0] == b"h1"
    assert float(opens[1]) >= now + 30_000  # the shorter open did not win
    # The key lives as long as the latest open, for hosts that join late.
    assert 29_000 < r.pttl("t:open:x") <= 30_000
    r.close()


def test_quorum_ignores_one_hosts_trip(fleet: Fleet) -> None:
    config = '[breakers.barrier]\nshare = "open"\n'
    for host in ("a", "b", "c"):
        fleet.start(host, config, share="quorum:2")
    a, b, c = fleet.client("a"), fleet.client("b"), fleet.client("c")
    b.register("api", **TRIPPY)
    b.register("barrier", **TRIPPY)
    trip(a, "api")
    trip(a, "barrier")
    assert poll_until(lambda: state(b, "barrier") is CircuitState.OPEN, 5.0)
    assert state(b, "api") is CircuitState.CLOSED  # one sick host does not cut B off
    trip(c, "api")  # a second host: the quorum
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 5.0)


def _open_until(client: RawClient, name: str) -> float:
    until = client.status(name).breakers[0].snapshot.open_until
    assert until is not None
    return until


def test_the_fleet_sends_half_open_calls_trials_in_all(fleet: Fleet) -> None:
    config = {**TRIPPY, "timeout": 0.5, "half_open_calls": 2, "half_open_max_wait": 30.0}
    hosts = ("a", "b", "c")
    for host in hosts:
        fleet.start(host)
    clients = {host: fleet.client(host) for host in hosts}
    for client in clients.values():
        client.register("api", **config)
    generation = clients["a"].register("api", **config).generation
    for _ in range(2):
        clients["a"].report("api", generation, Outcome.FAILURE)
    for client in clients.values():
        assert poll_until(partial(in_state, client, "api", CircuitState.OPEN), 5.0)
    latest = max(_open_until(client, "api") for client in clients.values())
    wait_for(lambda: time.monotonic() > latest + 0.05, what="the open time to pass")

    # Every host calls, from two threads each, for a while: the upstream
    # (counted) sees exactly half_open_calls trials.
    admitted: list[tuple[RawClient, int, int]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 1.5

    def caller(host: str) -> None:
        client = fleet.client(host)
        while time.monotonic() < stop_at:
            admission = client.acquire("api")
            if admission.admitted:
                with lock:
                    admitted.append((client, admission.generation, admission.lease))
            time.sleep(0.005)  # a client's pace, not a wait for time to pass

    threads = [threading.Thread(target=caller, args=(h,)) for h in hosts for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 2
    assert all(lease for _, _, lease in admitted)
    # Both trials succeed on their host: the breaker closes on every host.
    for client, generation, lease in admitted:
        client.report("api", generation, Outcome.SUCCESS, lease=lease)
    for client in clients.values():
        assert poll_until(partial(in_state, client, "api", CircuitState.CLOSED), 5.0)


def test_a_failed_trial_reopens_the_fleet(fleet: Fleet) -> None:
    config = {**TRIPPY, "timeout": 0.3, "backoff": 10.0, "max_timeout": 20.0}
    fleet.start("a")
    fleet.start("b")
    a, b = fleet.client("a"), fleet.client("b")
    b.register("api", **config)
    generation = a.register("api", **config).generation
    for _ in range(2):
        a.report("api", generation, Outcome.FAILURE)
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 5.0)
    wait_for(lambda: time.monotonic() > _open_until(a, "api") + 0.05, what="the open time")
    admission = poll_until(lambda: (adm := a.acquire("api")).admitted and adm, 5.0)
    assert admission
    a.report("api", admission.generation, Outcome.FAILURE, lease=admission.lease)
    # A's re-open is 10x longer (backoff), and B follows it: not B's own 0.3 s.
    assert poll_until(lambda: _open_until(b, "api") > time.monotonic() + 1.0, 5.0)


def test_a_host_killed_holding_the_trial_lease_delays_recovery_by_half_open_max_wait(
    fleet: Fleet,
) -> None:
    config = {**TRIPPY, "timeout": 0.3, "half_open_max_wait": 1.0}
    fleet.start("a")
    fleet.start("b")
    a, b = fleet.client("a"), fleet.client("b")
    b.register("api", **config)
    generation = a.register("api", **config).generation
    for _ in range(2):
        a.report("api", generation, Outcome.FAILURE)
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 5.0)
    wait_for(lambda: time.monotonic() > _open_until(a, "api") + 0.05, what="the open time")
    assert poll_until(lambda: a.acquire("api").admitted, 5.0)  # A holds the trial
    assert not b.acquire("api").admitted  # B waits: the lease is A's
    fleet.daemons["a"].kill()
    killed = time.monotonic()
    assert poll_until(lambda: b.acquire("api").admitted, 5.0)
    assert time.monotonic() - killed <= 1.0 + 0.5  # half_open_max_wait, plus a poll


def test_redis_killed_then_restarted_empty(fleet: Fleet, redis_server: RedisServer) -> None:
    fleet.start("a")
    fleet.start("b")
    a, b = fleet.client("a"), fleet.client("b")
    b.register("api", **TRIPPY)
    redis_server.kill()
    started = time.monotonic()
    trip(a, "api")  # A protects itself at once, alone
    assert not a.acquire("api").admitted
    assert time.monotonic() - started < 1.0  # no call waited on the dead Redis
    wait_for(lambda: events(fleet.daemons["a"], "fleet_unavailable"), what="fleet_unavailable")
    assert state(b, "api") is CircuitState.CLOSED
    redis_server.start()  # empty: no opens, no leases
    # A republishes its own open; B re-reads and follows.
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 10.0)
    wait_for(lambda: events(fleet.daemons["a"], "fleet_rejoined"), what="fleet_rejoined")
    assert len(events(fleet.daemons["a"], "fleet_unavailable")) == 1  # logged once


def test_redis_paused_slows_no_call(fleet: Fleet, redis_server: RedisServer) -> None:
    fleet.start("a")
    fleet.start("b")
    a, b = fleet.client("a"), fleet.client("b")
    b.register("api", **TRIPPY)
    b.register("other", **TRIPPY)
    redis_server.pause()
    try:
        started = time.monotonic()
        trip(a, "api")
        for _ in range(20):
            b.acquire("other")
        assert time.monotonic() - started < 1.0
        for host in ("a", "b"):
            wait_for(
                partial(events, fleet.daemons[host], "fleet_unavailable"),
                what=f"{host}: fleet_unavailable",
            )
        # Redis is gone: B's trials need no lease, and B decides alone.
        assert state(b, "api") is CircuitState.CLOSED
    finally:
        redis_server.resume()
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 10.0)


def test_a_hostile_value_in_redis_is_bounded_and_logged(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    config = {**TRIPPY, "timeout": 1.0, "max_timeout": 5.0}
    fleet.start("b")
    b = fleet.client("b")
    b.register("api", **config)
    r = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    year_ms = now_ms + 365 * 86400 * 1000
    r.publish("breakerd:fleet", b"\xff not json")
    r.publish("breakerd:fleet", json.dumps({"op": "open", "name": "api", "host": "evil"}))
    r.publish(
        "breakerd:fleet",
        json.dumps(
            {"op": "open", "name": "api", "host": "evil", "now": now_ms, "opens": ["evil", "x"]}
        ),
    )
    r.publish(
        "breakerd:fleet",
        json.dumps(
            {
                "op": "open",
                "name": "api",
                "host": "evil",
                "now": now_ms,
                "opens": ["evil", str(year_ms)],
            }
        ),
    )
    r.close()
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 5.0)
    assert _open_until(b, "api") <= time.monotonic() + 5.0  # max_timeout, not a year
    log = fleet.daemons["b"]
    assert len(events(log, "fleet_message_invalid")) == 3
    (bounded,) = events(log, "fleet_value_bounded")
    assert bounded["breaker"] == "api"
    assert bounded["from_host"] == "evil"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "breakerd.clients", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_shows_the_link_and_each_breakers_share(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    fleet.start("a", '[breakers.private]\nshare = "off"\n')
    fleet.start("b")
    a, b = fleet.client("a"), fleet.client("b")
    b.register("api", **TRIPPY)
    a.register("private", **TRIPPY)
    trip(a, "api")
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 5.0)
    socket_b = str(fleet.daemons["b"].socket_path)
    result = cli("status", "--json", "--socket", socket_b)
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert record["fleet"] == {"share": "open", "hosts_open": ["a"]}
    result = cli("status", "--json", "--socket", str(fleet.daemons["a"].socket_path))
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["private"]["fleet"] == {"share": "off", "hosts_open": []}
    assert cli("status", "--socket", socket_b).stdout.startswith("fleet link: up\n")
    redis_server.kill()
    wait_for(lambda: events(fleet.daemons["b"], "fleet_unavailable"), what="fleet_unavailable")
    assert cli("status", "--socket", socket_b).stdout.startswith("fleet link: down\n")


def test_a_daemon_without_the_fleet_shows_none(tmp_short: Path) -> None:
    process = DaemonProcess(tmp_short / "s.sock", loop="asyncio").wait_ready(started_log=True)
    try:
        client = RawClient(process.socket_path)
        client.register("api")
        status = client.status()
        assert status.fleet is None
        assert status.breakers[0].share is None
        result = cli("status", "--json", "--socket", str(process.socket_path))
        assert "fleet" not in json.loads(result.stdout)[0]
    finally:
        process.kill()


def test_admin_with_fleet_acts_on_every_host(fleet: Fleet) -> None:
    fleet.start("a")
    fleet.start("b")
    a, b = fleet.client("a"), fleet.client("b")
    b.register("api", **TRIPPY)
    b.register("private", **TRIPPY)
    trip(a, "api")
    assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 5.0)
    socket_a = str(fleet.daemons["a"].socket_path)
    result = cli("reset", "api", "--fleet", "--socket", socket_a)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "api: closed (sent to the fleet)\n"
    assert poll_until(lambda: state(b, "api") is CircuitState.CLOSED, 5.0)
    # The fleet's record of the open is gone too: a late joiner stays closed.
    fleet.start("c")
    c = fleet.client("c")
    c.register("api", **TRIPPY)
    a.register("private", **TRIPPY)
    assert cli("open", "private", "--fleet", "--socket", socket_a).returncode == 0
    assert poll_until(lambda: state(b, "private") is CircuitState.FORCED_OPEN, 5.0)
    assert state(c, "api") is CircuitState.CLOSED
    assert cli("disable", "api", "--fleet", "--socket", socket_a).returncode == 0
    for client in (b, c):
        assert poll_until(partial(in_state, client, "api", CircuitState.DISABLED), 5.0)
    assert state(a, "api") is CircuitState.DISABLED


def test_admin_with_fleet_is_refused_without_a_link(
    fleet: Fleet, redis_server: RedisServer, tmp_short: Path
) -> None:
    fleet.start("a")
    a = fleet.client("a")
    a.register("api", **TRIPPY)
    socket_a = str(fleet.daemons["a"].socket_path)
    redis_server.kill()
    wait_for(lambda: events(fleet.daemons["a"], "fleet_unavailable"), what="fleet_unavailable")
    result = cli("open", "api", "--fleet", "--socket", socket_a)
    assert result.returncode != 0
    assert "the fleet link is down: nothing done" in result.stderr
    assert state(a, "api") is CircuitState.CLOSED
    plain = DaemonProcess(tmp_short / "p.sock", loop="asyncio").wait_ready(started_log=True)
    try:
        RawClient(plain.socket_path).register("api")
        result = cli("reset", "api", "--fleet", "--socket", str(plain.socket_path))
        assert result.returncode != 0
        assert "this daemon is in no fleet" in result.stderr
    finally:
        plain.kill()


def test_serve_redis_turns_the_fleet_on(tmp_short: Path, redis_server: RedisServer) -> None:
    processes = [
        DaemonProcess(
            tmp_short / f"{host}.sock",
            log_path=tmp_short / f"{host}.log",
            loop="asyncio",
            extra_args=["--redis", redis_server.url, "--state-file", "none"],
        ).wait_ready()
        for host in ("a", "b")
    ]
    try:
        for process in processes:
            wait_for(partial(events, process, "fleet_joined"), what="fleet_joined")
        a, b = (RawClient(process.socket_path) for process in processes)
        b.register("api", **TRIPPY)
        trip(a, "api")
        assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 5.0)
    finally:
        for process in processes:
            process.kill()


def test_the_fleet_without_redis_py_is_refused_clearly(tmp_short: Path) -> None:
    config = tmp_short / "f.toml"
    config.write_text('[fleet]\nredis = "redis://localhost:6379/0"\n')
    # redis-py hidden from the daemon, as on a host without the extra.
    code = (
        "import sys; sys.modules['redis'] = None; "
        "from breakerd.actor.daemon.__main__ import main; raise SystemExit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--socket", str(tmp_short / "s.sock"), "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "pip install 'breakerd[redis]'" in result.stderr
    result = cli("serve", "--socket", str(tmp_short / "s.sock"), "--redis", "http://x")
    assert result.returncode == 2
    assert '--redis must be a "redis://..." or "unix://..." URL' in result.stderr


def test_an_open_restored_from_the_state_file_is_published(
    fleet: Fleet, redis_server: RedisServer, tmp_short: Path
) -> None:
    config = tmp_short / "a.toml"
    config.write_text(f'[fleet]\nredis = "{redis_server.url}"\nhost = "a"\n')

    def start_a() -> DaemonProcess:
        process = DaemonProcess(
            tmp_short / "a.sock",
            config,
            tmp_short / "a.log",
            loop="asyncio",
            extra_args=["--state-file", str(tmp_short / "a.state")],
        ).wait_ready(started_log=True)
        wait_for(process.socket_path.exists, what="a's socket")
        return process

    a_process = start_a()
    try:
        # The fleet never hears of this open: A trips while Redis is down,
        # and stops before it is back.
        redis_server.kill()
        trip(RawClient(a_process.socket_path), "api")
        assert a_process.terminate() == 0
        redis_server.start()
        a_process = start_a()
        wait_for(partial(events, a_process, "fleet_joined"), what="a joining")
        fleet.start("b")
        b = fleet.client("b")
        b.register("api", **TRIPPY)
        assert poll_until(lambda: state(b, "api") is CircuitState.OPEN, 10.0)
    finally:
        a_process.kill()


def test_the_library_on_a_host_without_the_lease_rejects_without_calling(fleet: Fleet) -> None:
    from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError
    from breakerd.clients._globals import close_all_clients

    config = {**TRIPPY, "timeout": 0.3, "half_open_max_wait": 30.0}
    fleet.start("a")
    fleet.start("b")
    a = fleet.client("a")
    breaker = CircuitBreaker("api", daemon=str(fleet.daemons["b"].socket_path), **config)
    calls: list[int] = []

    def upstream() -> int:
        calls.append(1)
        return 1

    try:
        assert breaker.call_sync(upstream) == 1
        generation = a.register("api", **config).generation
        for _ in range(2):
            a.report("api", generation, Outcome.FAILURE)
        assert poll_until(lambda: breaker.state is CircuitState.OPEN, 5.0)
        wait_for(lambda: time.monotonic() > _open_until(a, "api") + 0.05, what="the open time")
        assert poll_until(lambda: a.acquire("api").admitted, 5.0)  # A holds the trial
        for _ in range(20):
            with pytest.raises(CircuitBreakerOpenError):
                breaker.call_sync(upstream)
        assert len(calls) == 1  # none of them reached the upstream
    finally:
        close_all_clients()


def test_a_key_of_the_wrong_type_costs_one_breaker_not_the_link(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    fleet.start("a")
    fleet.start("b")
    a, b = fleet.client("a"), fleet.client("b")
    b.register("api", **TRIPPY)
    b.register("other", **TRIPPY)
    r = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    r.set("breakerd:open:api", "not a sorted set")
    r.close()
    trip(a, "api")
    trip(a, "other")
    assert poll_until(lambda: state(b, "other") is CircuitState.OPEN, 5.0)
    failed = events(fleet.daemons["a"], "fleet_command_failed")
    # Reading it when A registered the breaker, and writing its open.
    assert [(f["op"], f["breaker"]) for f in failed] == [("read", "api"), ("open", "api")]
    assert not events(fleet.daemons["a"], "fleet_unavailable")
