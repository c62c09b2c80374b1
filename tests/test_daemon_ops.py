"""Operating the daemon, with real daemon processes: restarts, systemd, reloads.

Each test starts ``breakerd serve`` as a process (or has ``systemd-socket-activate``
start it) and talks to it over its real socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProcess, RawClient, wait_for
from test_daemon_clients import CALL, Worker, breakerd_status

from breakerd.protocol import Admin, CircuitState, Outcome, Register

OPEN = CircuitState.OPEN
#: Slack between two readings of one deadline (rounding and a float's digits).
TOLERANCE = 0.01


def trip(client: RawClient, name: str, **config: Any) -> None:
    """Register ``name`` with ``min_calls=2`` and fail twice: open."""
    snapshot = client.register(name, **{"min_calls": 2, **config})
    for _ in range(2):
        snapshot = client.report(name, snapshot.generation, Outcome.FAILURE)
    assert snapshot.state is OPEN


def events(process: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in process.log_events() if e["event"] == name]


# -- state survives a restart ----------------------------------------------------


def test_after_sigterm_a_restarted_daemon_has_every_breaker_as_it_was(tmp_short: Path) -> None:
    first = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "1.log").wait_ready()
    client = RawClient(first.socket_path)
    trip(client, "svc", timeout=60.0, window_size=10)
    snapshot = client.register("other", min_calls=5)
    for outcome in (Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED):
        client.report("other", snapshot.generation, outcome)
    client.register("forced")
    client.request(Admin("forced", "force_open"))
    before = {s.snapshot.name: s for s in client.status().breakers}
    client.close()
    assert first.terminate() == 0
    assert (tmp_short / "s.state").exists()

    second = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "2.log")
    second.wait_ready(started_log=True)
    try:
        (started,) = events(second, "daemon_started")
        assert started["breakers_restored"] == 3
        client = RawClient(second.socket_path)
        after = {s.snapshot.name: s for s in client.status().breakers}
        assert sorted(after) == ["forced", "other", "svc"]
        for name, old in before.items():
            new = after[name]
            assert new.snapshot.state is old.snapshot.state, name
            # A report from before the restart is stale.
            assert new.snapshot.generation > old.snapshot.generation, name
            assert (new.successes, new.failures, new.ignored, new.rejections) == (
                old.successes,
                old.failures,
                old.ignored,
                old.rejections,
            ), name
            assert new.snapshot.calls == old.snapshot.calls, name
            assert new.snapshot.failure_rate == old.snapshot.failure_rate, name
        old_until, new_until = before["svc"].snapshot.open_until, after["svc"].snapshot.open_until
        assert old_until is not None
        assert new_until is not None
        assert abs(new_until - old_until) < TOLERANCE
        # The restored breaker still rejects, and a client can carry on with it.
        assert not client.acquire("svc").admitted
        assert client.register("svc", min_calls=2, timeout=60.0, window_size=10).state is OPEN
        client.close()
    finally:
        second.kill()


def test_after_sigkill_every_client_rejects_without_an_upstream_call_until_the_deadline(
    tmp_short: Path,
) -> None:
    timeout = 3.0
    config = {"min_calls": 2, "timeout": timeout}
    first = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "1.log").wait_ready()
    client = RawClient(first.socket_path)
    trip(client, "svc", **config)
    (status,) = client.status("svc").breakers
    open_until = status.snapshot.open_until
    assert open_until is not None
    # No SIGTERM, no final write: what the file has is what the transition wrote.
    first.proc.kill()
    first.proc.wait(10)
    client.close()

    second = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "2.log")
    second.wait_ready(started_log=True)
    workers: list[Worker] = []
    try:
        plan = {"socket": str(second.socket_path), "name": "svc", "breaker": config}
        steps = [CALL, {"op": "barrier"}, CALL]
        workers = [Worker(tmp_short, {**plan, "steps": steps}, f"w{i}") for i in (1, 2)]
        first_calls = []
        for worker in workers:
            assert worker.ready()["state"] == "open"
            first_calls.append(worker.step("call"))
        assert time.monotonic() < open_until, "the restart took longer than the open timeout"
        for result in first_calls:
            assert (result["result"], result["ran"]) == ("rejected", False)
            assert abs(result["open_until"] - open_until) < TOLERANCE
            assert 0 < result["retry_after"] <= timeout
        # The upstream saw nothing: not one of the workers' calls ran.
        assert sum(result["ran"] for result in first_calls) == 0

        # Half-open on schedule: the first call after the deadline is the trial.
        wait_for(lambda: time.monotonic() > open_until, timeout=2 * timeout, what="the deadline")
        workers[0].send()
        workers[0].step("barrier")
        trial = workers[0].step("call")
        assert (trial["result"], trial["ran"], trial["state"]) == ("ok", True, "closed")
        transitions = [
            (e["from_state"], e["to_state"]) for e in second.log_events() if "to_state" in e
        ]
        assert transitions == [("open", "half_open"), ("half_open", "closed")]
    finally:
        for worker in workers:
            worker.close()
        second.kill()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_bad_state_file_is_logged_and_set_aside_and_the_daemon_serves(
    tmp_short: Path, damage: str
) -> None:
    first = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "1.log").wait_ready()
    client = RawClient(first.socket_path)
    trip(client, "svc", timeout=60.0)
    client.close()
    assert first.terminate() == 0
    path = tmp_short / "s.state"
    good = path.read_bytes()
    bad = {"garbage": b"\x00not json\xff", "truncated": good[: len(good) // 2], "empty": b""}
    path.write_bytes(bad[damage])

    second = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "2.log").wait_ready()
    try:
        (invalid,) = events(second, "state_file_invalid")
        aside = Path(invalid["moved_to"])
        assert aside.name.startswith("s.state.bad-")
        assert aside.read_bytes() == bad[damage]
        client = RawClient(second.socket_path)
        assert client.register("svc").state is CircuitState.CLOSED  # a fresh breaker
        client.close()
        # The next write makes a good file again.
        wait_for(path.exists, what="a new state file")
    finally:
        second.kill()


def test_state_file_none_and_a_path_of_ones_own(tmp_short: Path) -> None:
    off = DaemonProcess(
        tmp_short / "s.sock", log_path=tmp_short / "1.log", extra_args=["--state-file", "none"]
    ).wait_ready()
    client = RawClient(off.socket_path)
    trip(client, "svc", timeout=60.0)
    client.close()
    assert off.terminate() == 0
    assert sorted(p.name for p in tmp_short.iterdir()) == ["1.log"]

    elsewhere = tmp_short / "state.json"
    own = DaemonProcess(
        tmp_short / "s.sock",
        log_path=tmp_short / "2.log",
        extra_args=["--state-file", str(elsewhere)],
    ).wait_ready()
    client = RawClient(own.socket_path)
    trip(client, "svc", timeout=60.0)
    client.close()
    document = json.loads(elsewhere.read_bytes())
    assert (document["format"], document["version"]) == ("breakerd-state", 1)
    assert oct(elsewhere.stat().st_mode & 0o777) == oct(0o600)
    assert own.terminate() == 0


# -- systemd -----------------------------------------------------------------------


def socket_activate() -> str:
    found = shutil.which("systemd-socket-activate")
    if found is None:
        message = "systemd-socket-activate is not installed (Debian package: systemd)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: .ci/run installs it")
        pytest.skip(message)
    return found


def accepts(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    finally:
        probe.close()
    return True


def test_socket_activation_serves_the_inherited_socket_and_never_unlinks_it(
    tmp_short: Path,
) -> None:
    path = tmp_short / "run" / "s.sock"
    path.parent.mkdir(mode=0o700)
    log_path = tmp_short / "d.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [socket_activate(), "-l", str(path), sys.executable, "-m", "breakerd.actor.daemon"],
            stderr=log,
            stdout=subprocess.DEVNULL,
        )
    daemon = DaemonProcess.__new__(DaemonProcess)  # only for its log helpers
    daemon.stderr_path = log_path
    try:
        # systemd-socket-activate binds before it listens: wait until it accepts.
        wait_for(lambda: accepts(path), what="systemd-socket-activate's socket")
        # The first connection starts the daemon on the socket systemd made.
        client = RawClient(path)
        assert client.register("svc").state is CircuitState.CLOSED
        (started,) = events(daemon, "daemon_started")
        assert started["socket_activated"] is True
        assert started["socket"] == str(path)
        assert started["pid"] == proc.pid  # it execs the daemon
        assert started["state_file"] == str(path.with_suffix(".state"))
        # It holds the lock: a daemon started by hand on that path is refused
        # rather than taking systemd's socket away.
        second = subprocess.run(
            [sys.executable, "-m", "breakerd.actor.daemon", "--socket", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"another breakerd daemon (pid {proc.pid})" in second.stderr
        assert client.register("svc").state is CircuitState.CLOSED
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        # The socket is systemd's: it stays for the next activation.
        assert path.exists()
        assert not path.with_name("s.sock.lock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    tmp_short: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[str, socket.socket]]:
    """A fake systemd: a datagram socket the daemon's sd_notify messages arrive on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_short / "notify")
        sock.bind(address)
    else:
        name = f"breakerd-test-{os.getpid()}-{tmp_short.name}"
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(10)
    yield address, sock
    sock.close()


def messages(sock: socket.socket, until: str) -> list[str]:
    """Datagrams received up to and including one that contains ``until``."""
    seen: list[str] = []
    while True:
        message = sock.recv(4096).decode()
        seen.append(message)
        if until in message.splitlines():
            return seen


def test_readiness_watchdog_reload_and_stopping_reach_notify_socket(
    tmp_short: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    address, sock = notify_socket
    config = tmp_short / "b.toml"
    config.write_text("[breakers.svc]\nmin_calls = 5\n")
    daemon = DaemonProcess(
        tmp_short / "s.sock",
        config,
        env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"},
    )
    try:
        assert messages(sock, "READY=1")[-1] == "READY=1"
        # The socket accepted before READY=1 was sent.
        client = RawClient(daemon.socket_path)
        client.register("svc")
        # Half of WATCHDOG_USEC apart, once every actor has answered a ping.
        assert "WATCHDOG=1" in messages(sock, "WATCHDOG=1")
        assert "WATCHDOG=1" in messages(sock, "WATCHDOG=1")
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = [m for m in messages(sock, "READY=1") if m.startswith("RELOADING=1")]
        assert len(reloading) == 1
        assert "MONOTONIC_USEC=" in reloading[0]
        client.close()
        assert daemon.terminate() == 0
        assert "STOPPING=1" in messages(sock, "STOPPING=1")
    finally:
        daemon.kill()


def test_no_watchdog_pings_for_another_process(
    tmp_short: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    address, sock = notify_socket
    daemon = DaemonProcess(
        tmp_short / "s.sock",
        env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "20000", "WATCHDOG_PID": "1"},
    )
    try:
        assert messages(sock, "READY=1") == ["READY=1"]
        assert daemon.terminate() == 0
        # Nothing but STOPPING=1 came after READY=1, though 10 ms intervals passed.
        assert messages(sock, "STOPPING=1") == ["STOPPING=1"]
    finally:
        daemon.kill()


# -- SIGHUP ------------------------------------------------------------------------


def test_sighup_applies_new_settings_keeping_connections_and_state(tmp_short: Path) -> None:
    config = tmp_short / "b.toml"
    config.write_text("[breakers.svc]\nmin_calls = 5\nwindow_size = 10\ntimeout = 60.0\n")
    daemon = DaemonProcess(tmp_short / "s.sock", config).wait_ready()
    try:
        client = RawClient(daemon.socket_path)
        generation = client.register("svc").generation
        for _ in range(2):
            assert client.report("svc", generation, Outcome.FAILURE).state is CircuitState.CLOSED

        def reloaded(event: str, count: int) -> bool:
            return len(events(daemon, event)) == count

        # A bad file: logged, and the old settings stay.
        config.write_text("[breakers.svc]\nmin_calls = 'five'\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloaded("config_reload_failed", 1), what="the failed reload")
        assert client.report("svc", generation, Outcome.FAILURE).state is CircuitState.CLOSED

        config.write_text("[breakers.svc]\nmin_calls = 2\nwindow_size = 10\ntimeout = 60.0\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloaded("config_reloaded", 1), what="the reload")
        (changed,) = events(daemon, "breaker_reconfigured")
        assert changed["settings"] == ["min_calls"]
        # Same connection, same window (3 failures), same generation: one more
        # failure is judged under min_calls = 2 and trips it.
        tripped = client.report("svc", generation, Outcome.FAILURE)
        assert tripped.state is OPEN
        status = breakerd_status(daemon.socket_path)["svc"]
        assert (status["state"], status["failures"], status["clients"]) == ("open", 4, 1)
        # The status command came and went; our connection never did.
        ours = events(daemon, "client_connected")[0]["conn"]
        assert ours not in [e["conn"] for e in events(daemon, "client_disconnected")]
        client.close()
    finally:
        daemon.kill()


def test_the_reloaded_settings_survive_a_restart(tmp_short: Path) -> None:
    config = tmp_short / "b.toml"
    config.write_text("[breakers.svc]\ntimeout = 60.0\n")
    daemon = DaemonProcess(tmp_short / "s.sock", config, log_path=tmp_short / "1.log")
    daemon.wait_ready()
    client = RawClient(daemon.socket_path)
    client.register("svc")
    client.close()
    config.write_text("[breakers.svc]\ntimeout = 90.0\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: events(daemon, "config_reloaded"), what="the reload")
    assert daemon.terminate() == 0
    stored = json.loads((tmp_short / "s.state").read_bytes())["breakers"][0]["config"]
    assert stored["timeout"] == 90.0
    # Without the file's section, the restored breaker keeps what it was saved with.
    restarted = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "2.log").wait_ready()
    try:
        client = RawClient(restarted.socket_path)
        registered = client.request(Register("svc", {}))
        assert registered.conflicts == ("timeout",)
        client.close()
    finally:
        restarted.kill()
