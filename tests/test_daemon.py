"""The daemon as a real process on a real Unix socket, with real client processes."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon_helpers import (
    DaemonProcess,
    RawClient,
    spawn_worker,
    wait_for,
    worker_result,
)

from breakerd.protocol import (
    CircuitState,
    Connection,
    Hello,
    InvalidRequestError,
    Outcome,
    StatusRequest,
    UnknownBreakerError,
)


def closed_by_peer(sock: socket.socket) -> bool:
    """The daemon closed this connection (an EOF, or a reset when it aborted)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_the_daemon_says_which_loop_it_runs_on(daemon: DaemonProcess) -> None:
    # The socket file (what wait_ready waits for) appears just before the line.
    wait_for(lambda: "daemon_started" in daemon.log(), what="daemon_started")
    (started,) = [e for e in daemon.log_events() if e["event"] == "daemon_started"]
    assert started["loop"] == daemon.loop
    assert started["state_table_slots"] == 65_536


def test_sigterm_exits_zero_and_removes_the_socket(daemon: DaemonProcess) -> None:
    client = RawClient(daemon.socket_path)
    client.register("svc")
    client.close()
    assert daemon.terminate() == 0
    assert not daemon.socket_path.exists()
    assert not daemon.socket_path.with_name("s.sock.lock").exists()
    events = [e["event"] for e in daemon.log_events()]
    assert events[0] == "daemon_started"
    assert events[-1] == "daemon_stopped"


def test_a_second_daemon_is_refused_and_the_first_untouched(daemon: DaemonProcess) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "breakerd.actor.daemon", "--socket", str(daemon.socket_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "another breakerd daemon" in second.stderr
    assert str(daemon.proc.pid) in second.stderr
    # The first one still serves.
    client = RawClient(daemon.socket_path)
    assert client.register("svc").state is CircuitState.CLOSED
    client.close()


def test_a_stale_socket_from_a_killed_daemon_is_cleaned_up(tmp_short: Path) -> None:
    first = DaemonProcess(tmp_short / "s.sock").wait_ready()
    first.kill()  # SIGKILL: no cleanup, the socket file stays behind
    assert first.socket_path.exists()
    second = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "2.log")
    second.wait_ready(started_log=True)
    try:
        client = RawClient(second.socket_path)
        assert client.register("svc").state is CircuitState.CLOSED
        client.close()
        assert "stale_socket_removed" in [e["event"] for e in second.log_events()]
    finally:
        assert second.terminate() == 0


def test_socket_is_private(tmp_short: Path) -> None:
    process = DaemonProcess(tmp_short / "sub" / "s.sock", log_path=tmp_short / "d.log")
    process.wait_ready()
    try:
        assert stat.S_IMODE(process.socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(process.socket_path.parent.stat().st_mode) == 0o700
    finally:
        process.kill()


_OTHER_UID = 65534  # nobody

# Runs as nobody, who cannot read this Python's stdlib under /root: only
# builtin modules here, and the hello frame comes ready-made from the parent.
_CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("connect-denied"); sys.exit(0)
s.settimeout(10)
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    data = s.recv(65536)
except (BrokenPipeError, ConnectionResetError):
    data = b""  # the daemon hung up first
print("closed" if data == b"" else "answered")
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_another_uid_cannot_reach_a_breaker(daemon: DaemonProcess) -> None:
    os.chmod(daemon.socket_path.parent, 0o755)  # let nobody find the socket at all
    hello = Connection("client").send_request(1, Hello(1, 1, "intruder", 1)).hex()
    result = subprocess.run(
        [sys.executable, "-c", _CONNECT_AS_NOBODY, str(daemon.socket_path), hello],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.strip() == "connect-denied", result.stderr
    # Even with the socket opened to everyone, SO_PEERCRED turns the peer away.
    os.chmod(daemon.socket_path, 0o666)
    hello = Connection("client").send_request(1, Hello(1, 1, "intruder", 1)).hex()
    result = subprocess.run(
        [sys.executable, "-c", _CONNECT_AS_NOBODY, str(daemon.socket_path), hello],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.strip() == "closed", result.stderr
    refused = [e for e in daemon.log_events() if e["event"] == "peer_refused"]
    assert refused
    assert refused[0]["peer_uid"] == _OTHER_UID


def test_failures_from_several_processes_trip_one_breaker(daemon: DaemonProcess) -> None:
    config = {"min_calls": 6, "failure_threshold": 0.5, "timeout": 600.0}
    workers = [
        spawn_worker(daemon.socket_path, [["register", "LLM", config], ["fail", "LLM", 2]])
        for _ in range(3)
    ]
    states = [worker_result(w)[-1] for w in workers]
    # No process alone reached min_calls; together they tripped the breaker.
    assert sorted(states) == ["closed", "closed", "open"]
    client = RawClient(daemon.socket_path)
    client.register("LLM", **config)
    admission = client.acquire("LLM")
    assert not admission.admitted
    assert admission.retry_after is not None
    assert admission.retry_after > 500
    status = client.status("LLM").breakers[0]
    assert (status.failures, status.snapshot.state) == (6, CircuitState.OPEN)
    client.close()


def test_state_changes_are_pushed_to_every_registered_connection(daemon: DaemonProcess) -> None:
    watcher = RawClient(daemon.socket_path)
    watcher.register("svc", min_calls=1)
    actor = RawClient(daemon.socket_path)
    generation = actor.register("svc", min_calls=1).generation
    actor.report("svc", generation, Outcome.FAILURE)
    # The watcher made no request; its next reply carries the push before it.
    watcher.status("svc")
    assert [p.state for p in watcher.pushes] == [CircuitState.OPEN]
    assert actor.pushes[0].state is CircuitState.OPEN
    watcher.close()
    actor.close()


def test_exactly_half_open_calls_trials_run_host_wide(daemon: DaemonProcess) -> None:
    config = {"min_calls": 1, "timeout": 0.0, "half_open_calls": 2}
    setup = RawClient(daemon.socket_path)
    generation = setup.register("svc", **config).generation
    setup.report("svc", generation, Outcome.FAILURE)  # open, with a deadline already passed
    steps: list[list[Any]] = [["register", "svc", config], ["acquire_and_wait", "svc"]]
    workers = [spawn_worker(daemon.socket_path, steps) for _ in range(6)]
    admitted = []
    for worker in workers:  # every worker holds its connection until stdin closes
        assert worker.stdout is not None
        admitted.append(json.loads(worker.stdout.readline())[-1])
    assert admitted.count(True) == 2
    assert admitted.count(False) == 4
    for worker in workers:
        worker_result(worker)
    setup.close()


def test_a_killed_process_holding_the_trial_does_not_wedge_the_breaker(
    daemon: DaemonProcess,
) -> None:
    config = {"min_calls": 1, "timeout": 0.0, "half_open_calls": 1}
    client = RawClient(daemon.socket_path)
    generation = client.register("svc", **config).generation
    client.report("svc", generation, Outcome.FAILURE)
    holder = spawn_worker(daemon.socket_path, [["register", "svc", config], ["hold", "svc"]])
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == '["open", true]'
    assert client.acquire("svc").admitted is False  # the trial is taken
    holder.kill()
    holder.wait(10)
    # The daemon sees the connection close and releases the lease.

    def trial_available() -> bool:
        admission = client.acquire("svc")
        if admission.admitted:
            client.report("svc", admission.generation, Outcome.SUCCESS, lease=admission.lease)
        return admission.admitted

    wait_for(trial_available, what="the dead process's lease to be released")
    assert client.status("svc").breakers[0].snapshot.state is CircuitState.CLOSED
    released = [e for e in daemon.log_events() if e["event"] == "client_disconnected"]
    assert any(e["leases_released"] == 1 for e in released)
    client.close()


def test_every_outcome_from_busy_processes_is_counted(daemon: DaemonProcess) -> None:
    config = {"min_calls": 100, "window_size": 100}
    steps: list[list[Any]] = [
        ["register", "svc", config],
        ["succeed", "svc", 20_000],
        ["fail", "svc", 10],
    ]
    workers = [spawn_worker(daemon.socket_path, steps) for _ in range(4)]
    for worker in workers:
        worker_result(worker, timeout=60)
    client = RawClient(daemon.socket_path)
    status = client.status("svc").breakers[0]
    assert status.successes == 80_000
    assert status.failures == 40
    client.close()


def test_bad_clients_do_not_hurt_the_others(daemon: DaemonProcess) -> None:
    good = RawClient(daemon.socket_path)
    good.register("svc")

    def raw() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(daemon.socket_path))
        return sock

    garbage = raw()
    garbage.sendall(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    absurd = raw()
    absurd.sendall(struct.pack(">I", 0xFFFF_FFFF) + b"x" * 100)
    half = raw()
    half.sendall(struct.pack(">I", 1000) + b"\x93")  # then silence
    no_hello = raw()
    # Well-formed, but not the hello that must come first.
    body = msgpack.packb([0, 1, "register", {"name": "svc", "config": {}}])
    no_hello.sendall(struct.pack(">I", len(body)) + body)
    idle = [raw() for _ in range(300)]

    for bad in (garbage, absurd, no_hello):
        assert closed_by_peer(bad)

    # The well-behaved client is still served, promptly and correctly.
    assert good.acquire("svc").admitted
    with pytest.raises(UnknownBreakerError):
        good.acquire("nope")
    assert good.status("svc").breakers[0].snapshot.state is CircuitState.CLOSED
    errors = [e for e in daemon.log_events() if e["event"] == "protocol_error"]
    assert len(errors) >= 3
    for sock in [half, *idle]:
        sock.close()
    no_hello.close()
    good.close()
    assert daemon.terminate() == 0


def test_connection_limit_and_a_client_that_stops_reading(tmp_short: Path) -> None:
    config = tmp_short / "d.toml"
    config.write_text("[daemon]\nmax_connections = 2\nmax_outbox = 65536\n")
    process = DaemonProcess(tmp_short / "s.sock", config=config).wait_ready()
    try:
        good = RawClient(process.socket_path)
        good.register("svc")
        # A client that floods requests and never reads its replies.
        greedy = RawClient(process.socket_path)
        flood = b"".join(
            greedy.conn.send_request(msgid, StatusRequest("svc")) for msgid in range(10, 30_010)
        )
        greedy.sock.settimeout(30)

        def flood_until_dropped() -> None:
            for _ in range(20):
                greedy.sock.sendall(flood)

        # The daemon drops it: the next write fails with EPIPE or ECONNRESET.
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            flood_until_dropped()
        wait_for(lambda: "client_too_slow" in process.log(), what="the daemon to drop the reader")
        third = RawClient(process.socket_path)  # the dropped one freed its slot
        # The slot kept for the admin CLI, taken by a connection yet to say hello.
        reserved = socket.socket(socket.AF_UNIX)
        reserved.connect(str(process.socket_path))
        wait_for(lambda: 'admin_slot": true' in process.log(), what="the reserved slot taken")
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(10)
        extra.connect(str(process.socket_path))
        try:
            extra.sendall(b"\x00")
        except (BrokenPipeError, ConnectionResetError):
            pass  # aborted before the byte went out: closed at once indeed
        assert closed_by_peer(extra)  # over max_connections: closed at once
        assert good.status("svc").breakers[0].snapshot.state is CircuitState.CLOSED
        refused = [e for e in process.log_events() if e["event"] == "peer_refused"]
        assert [e["reason"] for e in refused] == ["too many connections"]
        for sock in (good, third):
            sock.close()
        extra.close()
        reserved.close()
    finally:
        assert process.terminate() == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_socket_group_opens_the_daemon_to_that_group(tmp_short: Path) -> None:
    import grp

    group = grp.getgrgid(_OTHER_UID)  # nobody's own group
    config = tmp_short / "d.toml"
    config.write_text(f'[daemon]\nsocket_group = "{group.gr_name}"\n')
    process = DaemonProcess(tmp_short / "s.sock", config=config).wait_ready()
    try:
        info = process.socket_path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == group.gr_gid
        os.chmod(process.socket_path.parent, 0o755)
        hello = Connection("client").send_request(1, Hello(1, 1, "member", 1)).hex()
        result = subprocess.run(
            [sys.executable, "-c", _CONNECT_AS_NOBODY, str(process.socket_path), hello],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.stdout.strip() == "answered", result.stderr
    finally:
        assert process.terminate() == 0


def test_status_comes_in_pages_and_names_are_bounded(daemon: DaemonProcess) -> None:
    client = RawClient(daemon.socket_path)
    helper = RawClient(daemon.socket_path)  # one connection holds at most 1,000
    names = [f"svc-{i:04d}" for i in range(1, 1101)]
    for i, name in enumerate(names):
        (client if i % 2 else helper).register(name)
    first = client.request(StatusRequest(None))
    assert len(first.breakers) == 1000
    assert first.next_offset == 1000
    second = client.request(StatusRequest(None, first.next_offset))
    assert second.next_offset is None
    got = [b.snapshot.name for b in (*first.breakers, *second.breakers)]
    assert got == names
    small = client.request(StatusRequest(None, 10, 5))
    assert [b.snapshot.name for b in small.breakers] == names[10:15]
    with pytest.raises(InvalidRequestError, match="at most 200"):
        client.register("x" * 201)
    assert client.status("svc-0001").breakers[0].snapshot.name == "svc-0001"
    client.close()
    helper.close()
