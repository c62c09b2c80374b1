"""Hostile local processes against a real daemon: squatters, impostors, floods and names.

The daemon serves every process on the host: one that misbehaves must never
cost the others their breakers, and one that pretends to be the daemon must
never steer a client. Real daemon processes, real sockets; the impostors are
real processes running as another uid (root is needed to become one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from daemon_helpers import DaemonProcess, RawClient, spawn_worker, wait_for, worker_result
from hypothesis import given
from hypothesis import strategies as st

from breakerd.actor import BreakerConfig
from breakerd.actor.daemon._config import ConfigError, load_config
from breakerd.clients import DaemonUnavailableError
from breakerd.clients._daemon_client import DaemonClient
from breakerd.clients._link import RemoteBreaker
from breakerd.clients.cli._admin import ask_daemon
from breakerd.clients.cli._daemon_commands import printable
from breakerd.protocol import (
    NEED_DATA,
    Acquire,
    Admission,
    CircuitState,
    Connection,
    Hello,
    Outcome,
    Register,
    Registered,
    Report,
    ReportBatch,
    RequestReceived,
    Snapshot,
    Status,
    StatusRequest,
    Welcome,
    negotiate_version,
)
from breakerd.protocol._codec import ResultMessage

NOBODY = 65534
# CI runs as root: there these tests must run, never skip.
as_root = pytest.mark.skipif(
    os.getuid() != 0 and not os.environ.get("CI"), reason="needs root to act as another uid"
)


def breakerd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "breakerd.clients", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_daemon(socket_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "breakerd.actor.daemon", "--socket", str(socket_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused(socket_path: Path) -> str:
    """The one line a daemon refusing to start on ``socket_path`` printed (it must exit 1)."""
    proc = start_daemon(socket_path)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the daemon started on {socket_path}") from None
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -- the socket directory ------------------------------------------------------------------


def test_a_planted_symlink_lock_file_is_refused_and_its_target_untouched(tmp_short: Path) -> None:
    target = tmp_short / "precious"
    target.write_text("keep me\n")
    (tmp_short / "s.sock.lock").symlink_to(target)
    line = refused(tmp_short / "s.sock")
    assert "s.sock.lock" in line
    assert "symlink" in line
    assert target.read_text() == "keep me\n"
    assert not (tmp_short / "s.sock").exists()


def test_a_hard_linked_lock_file_is_refused_and_its_target_untouched(tmp_short: Path) -> None:
    target = tmp_short / "precious"
    target.write_text("keep me\n")
    os.link(target, tmp_short / "s.sock.lock")
    line = refused(tmp_short / "s.sock")
    assert "s.sock.lock" in line
    assert target.read_text() == "keep me\n"


def test_a_directory_others_can_write_is_refused(tmp_short: Path) -> None:
    shared = tmp_short / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    line = refused(shared / "s.sock")
    assert str(shared) in line
    assert "writable" in line
    assert list(shared.iterdir()) == []


@as_root
def test_a_directory_of_another_uid_is_refused(tmp_short: Path) -> None:
    theirs = tmp_short / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    line = refused(theirs / "s.sock")
    assert str(theirs) in line
    assert f"uid {NOBODY}" in line
    assert list(theirs.iterdir()) == []


def test_a_directory_the_daemon_made_or_owns_privately_is_used(tmp_short: Path) -> None:
    made = DaemonProcess(tmp_short / "new" / "s.sock", log_path=tmp_short / "1.log")
    made.wait_ready()
    assert made.terminate() == 0
    # Readable by others is fine (a socket_group needs to reach the socket).
    tmp_short.chmod(0o755)
    owned = DaemonProcess(tmp_short / "s.sock", log_path=tmp_short / "2.log").wait_ready()
    assert owned.terminate() == 0


# -- an impostor daemon --------------------------------------------------------------------


def _serve_as(uid: int, path: Path, ready_w: int) -> None:
    """In a forked child: become ``uid`` and answer like a daemon whose breakers stay closed."""
    os.setgid(uid)
    os.setuid(uid)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    os.write(ready_w, b"!")
    while True:
        sock, _ = listener.accept()
        conn = Connection("server")
        while data := sock.recv(65536):
            conn.receive_data(data)
            while (event := conn.next_event()) is not NEED_DATA:
                if not isinstance(event, RequestReceived):
                    continue
                message = event.message
                result: ResultMessage
                if isinstance(message, Hello):
                    result = Welcome(negotiate_version(message), "impostor", os.getpid())
                elif isinstance(message, Register):
                    result = Registered(Snapshot(message.name, CircuitState.CLOSED, 0), (), 0)
                elif isinstance(message, Acquire):
                    snapshot = Snapshot(message.name, CircuitState.CLOSED, 0)
                    result = Admission(True, 0, 0, snapshot)
                else:
                    result = Status((), None)
                sock.sendall(conn.send_response(event.msgid, result))
        sock.close()


@pytest.fixture
def impostor(tmp_short: Path) -> Iterator[Path]:
    """A socket served by a process running as nobody, in a directory nobody owns."""
    tmp_short.chmod(0o711)
    theirs = tmp_short / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    path = theirs / "s.sock"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            _serve_as(NOBODY, path, ready_w)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"!"
        yield path
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@as_root
def test_a_daemon_of_an_untrusted_uid_is_treated_as_unavailable(
    impostor: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BREAKERD_TRUSTED_UIDS", raising=False)
    with structlog.testing.capture_logs() as logs:
        client = DaemonClient(impostor, connect_timeout=2.0).start()
    try:
        link = RemoteBreaker.open(impostor, "svc", BreakerConfig(), "deny", client=client)
        assert not link.remote
        assert not client.connected
        assert client.outage is not None
        assert f"uid {NOBODY}" in client.outage
        with pytest.raises(DaemonUnavailableError, match=f"uid {NOBODY}"):
            link.ask_sync(Acquire("svc"))
    finally:
        client.close()
    (warning,) = [e for e in logs if e["event"] == "daemon_unavailable"]
    assert f"uid {NOBODY}" in warning["reason"]
    assert "BREAKERD_TRUSTED_UIDS" in warning["reason"]


@as_root
def test_a_trusted_uid_may_serve(impostor: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = DaemonClient(impostor, connect_timeout=2.0, trusted_uids=[NOBODY]).start()
    try:
        link = RemoteBreaker.open(impostor, "svc", BreakerConfig(), "deny", client=client)
        assert link.remote
    finally:
        client.close()
    monkeypatch.setenv("BREAKERD_TRUSTED_UIDS", f"1001, {NOBODY}")
    client = DaemonClient(impostor, connect_timeout=2.0).start()
    try:
        link = RemoteBreaker.open(impostor, "svc", BreakerConfig(), "deny", client=client)
        assert link.remote
    finally:
        client.close()


@as_root
def test_the_cli_refuses_a_daemon_of_an_untrusted_uid(
    impostor: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BREAKERD_TRUSTED_UIDS", raising=False)
    result = breakerd("status", "--socket", str(impostor))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"uid {NOBODY}" in lines[0]


# -- floods ----------------------------------------------------------------------------------


def test_reports_for_unknown_breakers_cost_a_few_log_lines(daemon: DaemonProcess) -> None:
    client = RawClient(daemon.socket_path)
    client.register("svc")
    ghosts = ReportBatch(
        tuple(Report(f"ghost-{i}", 0, Outcome.FAILURE) for i in range(1000)),
        successes=(("ghost-a", 0, 5), ("ghost-b", 0, 7)),
    )
    for _ in range(50):
        client.notify(ghosts)
    # A request behind the batches: the daemon has handled them when it answers.
    assert client.status("svc").breakers[0].failures == 0
    client.close()
    wait_for(lambda: "client_disconnected" in daemon.log(), what="the disconnect")
    lines = daemon.log().splitlines()
    assert len(lines) < 20, len(lines)
    unknown = [e for e in daemon.log_events() if e["event"] == "report_for_unknown_breaker"]
    assert unknown[0]["breaker"] == "ghost-0"
    summarized = sum(e["count"] for e in unknown if e.get("summary"))
    assert summarized == 50 * 1002 - 1


# -- names on the admin's terminal --------------------------------------------------------


def test_status_table_escapes_control_characters_in_names(daemon: DaemonProcess) -> None:
    client = RawClient(daemon.socket_path)
    forged = "a\nLLM  open  100%"
    painted = "\x1b[31mred\x9b2J\x7f"
    for name in (forged, painted, "back\\slash"):
        client.register(name)
    result = breakerd("status", "--socket", str(daemon.socket_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # A header and one row per breaker: no forged row, no escape sequence.
    assert len(lines) == 4, lines
    assert not any(ch in result.stdout for ch in "\x1b\x9b\x7f")
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["\\x1b[31mred\\x9b2J\\x7f", "a\\nLLM", "back\\\\slash"]
    # JSON carries the names exactly as they are.
    records = json.loads(breakerd("status", "--json", "--socket", str(daemon.socket_path)).stdout)
    assert sorted(r["name"] for r in records) == sorted([forged, painted, "back\\slash"])
    client.close()


@given(st.text(), st.text())
def test_escaped_names_are_printable_and_never_collide(first: str, second: str) -> None:
    assert printable(first).isprintable()
    assert (printable(first) == printable(second)) == (first == second)


# -- connections -----------------------------------------------------------------------------


def closed_by_peer(sock: socket.socket) -> bool:
    """The daemon closed this connection (an EOF, or a reset when it aborted).

    What it sent before (a welcome) is read and dropped; a connection still
    open when the socket's timeout runs out fails the test.
    """
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def connect(path: Path, data: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(str(path))
    if data:
        sock.sendall(data)
    return sock


def hello_frame(client: str = "squatter") -> bytes:
    return Connection("client").send_request(1, Hello(1, 1, client, os.getpid()))


def limited_daemon(tmp: Path, settings: str) -> DaemonProcess:
    config = tmp / "d.toml"
    config.write_text(f"[daemon]\n{settings}\n")
    return DaemonProcess(tmp / "s.sock", config=config).wait_ready()


def test_one_process_cannot_hold_every_connection(tmp_short: Path) -> None:
    process = limited_daemon(
        tmp_short,
        # Long enough for the checks below to come first, even on a busy machine.
        "max_connections = 8\nmax_connections_per_pid = 4\nhello_timeout = 2.0\nidle_timeout = 2.0",
    )
    try:
        holder = RawClient(process.socket_path)  # holds a breaker: never idle
        holder.register("svc")
        silent = connect(process.socket_path)
        half = connect(process.socket_path, hello_frame()[:7])
        idle = connect(process.socket_path, hello_frame())
        # This process has its four: a fifth is closed at once...
        assert closed_by_peer(connect(process.socket_path, hello_frame()))
        # ...while other processes, and the admin, are served.
        worker = spawn_worker(process.socket_path, [["register", "svc", {}], ["status", "svc"]])
        assert worker_result(worker) == ["closed", "closed"]
        status = breakerd("status", "--socket", str(process.socket_path))
        assert status.returncode == 0, status.stderr
        assert status.stdout.splitlines()[1].split()[:2] == ["svc", "closed"]
        # No hello in time: dropped. Holding nothing and saying nothing: dropped.
        for sock in (silent, half, idle):
            assert closed_by_peer(sock)
        reasons = [e["reason"] for e in process.log_events() if e["event"] == "peer_dropped"]
        assert sorted(reasons) == ["idle", "no hello in time", "no hello in time"]
        # The silent holder of a breaker is still served on its connection.
        assert holder.status("svc").breakers[0].snapshot.state is CircuitState.CLOSED
        refused = [e for e in process.log_events() if e["event"] == "peer_refused"]
        assert [e["reason"] for e in refused] == ["too many connections from this process"]
        holder.close()
        for sock in (silent, half, idle):
            sock.close()
    finally:
        assert process.terminate() == 0


def test_a_full_daemon_keeps_a_slot_for_the_admin(tmp_short: Path) -> None:
    process = limited_daemon(tmp_short, "max_connections = 3")
    config: dict[str, Any] = {"min_calls": 1}
    steps: list[list[Any]] = [["register", "svc", config], ["acquire_and_wait", "svc"]]
    workers = [spawn_worker(process.socket_path, steps) for _ in range(3)]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert json.loads(worker.stdout.readline()) == ["closed", True]
        # The pool is full: a client that is not the admin is turned away...
        newcomer = connect(process.socket_path, hello_frame())
        assert closed_by_peer(newcomer)
        newcomer.close()
        # ...and the admin still gets in, as often as it likes.
        for _ in range(2):
            status = breakerd("status", "--socket", str(process.socket_path))
            assert status.returncode == 0, status.stderr
            assert status.stdout.splitlines()[1].split()[:2] == ["svc", "closed"]
        assert breakerd("open", "svc", "--socket", str(process.socket_path)).returncode == 0
        for worker in workers:
            worker_result(worker)
    finally:
        for worker in workers:
            worker.kill()
        assert process.terminate() == 0


_FLOODER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    hello, frame = f.read().split(b"--frame--", 1)
sock.sendall(hello)
sock.recv(65536)  # the welcome
print("flooding", flush=True)
while True:
    sock.sendall(frame)
"""


def test_a_status_request_is_answered_promptly_while_others_flood(
    daemon: DaemonProcess, tmp_short: Path
) -> None:
    client = RawClient(daemon.socket_path)
    client.register("svc", window_size=1000, min_calls=1000)
    # ~1 MiB frames (the daemon's limit) of reports, for a breaker and for nobody.
    conn = Connection("client")
    hello = conn.send_request(1, Hello(1, 1, "flooder", 1))
    items = tuple(
        Report("svc" if i % 2 else f"ghost-{i}", 0, Outcome.SUCCESS, 0.001) for i in range(35_000)
    )
    frame = conn.send_notification(ReportBatch(items))
    assert 900_000 < len(frame) <= 1 << 20
    script = tmp_short / "frames"
    script.write_bytes(hello + b"--frame--" + frame)
    flooders = [
        subprocess.Popen(
            [sys.executable, "-c", _FLOODER, str(daemon.socket_path), str(script)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(20)
    ]
    try:
        for flooder in flooders:
            assert flooder.stdout is not None
            assert flooder.stdout.readline().strip() == "flooding"

        def handled() -> int:
            return client.status("svc").breakers[0].successes

        wait_for(lambda: handled() > len(items), timeout=60, what="the flood")
        latencies = []
        for _ in range(12):
            # Not waiting for anything: spreading the samples over the
            # daemon's cycle of work and rest, or they would all land in one.
            time.sleep(random.uniform(0.05, 0.25))
            started = time.monotonic()
            (status,) = ask_daemon(daemon.socket_path, StatusRequest(None), timeout=60)
            latencies.append(time.monotonic() - started)
            assert [b.snapshot.name for b in status.breakers] == ["svc"]
        # The flood is slowed, not stopped.
        before = handled()
        wait_for(lambda: handled() > before, what="more of the flood")
    finally:
        for flooder in flooders:
            flooder.kill()
            flooder.wait(10)
    latencies.sort()
    print(f"status latency under flood ({daemon.loop}): {[round(x, 3) for x in latencies]}")
    # Measured: medians of 0.005-0.12 s (0.22 s at worst) on 2 busy CPUs,
    # against 3-7 s before the read budget and the rate-limited log.
    assert statistics.median(latencies) < 0.5, latencies


# -- the settings --------------------------------------------------------------------------


def test_connection_limits_have_defaults_and_are_checked(tmp_path: Path) -> None:
    socket_path = tmp_path / "s.sock"
    defaults = load_config(None, socket_path)
    assert (
        defaults.max_connections_per_pid,
        defaults.hello_timeout,
        defaults.idle_timeout,
        defaults.read_budget,
    ) == (64, 5.0, 60.0, 65536)
    config = tmp_path / "d.toml"
    config.write_text(
        "[daemon]\nmax_connections_per_pid = 2\nhello_timeout = 1\nidle_timeout = 0.5\n"
        "read_budget = 4096\n"
    )
    settings = load_config(config, socket_path)
    assert (settings.max_connections_per_pid, settings.hello_timeout) == (2, 1.0)
    assert (settings.idle_timeout, settings.read_budget) == (0.5, 4096)
    for line, message in [
        ("hello_timeout = 0", "hello_timeout must be a number of seconds > 0"),
        ("idle_timeout = inf", "idle_timeout must be a number of seconds > 0"),
        ("idle_timeout = nan", "idle_timeout must be"),
        ("hello_timeout = true", "hello_timeout must be"),
        ("read_budget = 0", "read_budget must be an integer >= 1"),
        ("max_connections_per_pid = 1.5", "max_connections_per_pid must be an integer"),
    ]:
        config.write_text(f"[daemon]\n{line}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(config, socket_path)
