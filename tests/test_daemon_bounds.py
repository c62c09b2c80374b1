"""The daemon's bounds, against a real daemon process on a real socket.

Counts on the wire, breakers per daemon and per client, idle breakers
reclaimed, trial leases that only their holder can settle, and generations
that do not repeat across restarts.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import msgpack
import pytest
from daemon_helpers import DaemonProcess, RawClient, wait_for

from breakerd.clients import CircuitBreaker
from breakerd.clients._link import RemoteBreaker
from breakerd.protocol import (
    Admission,
    CircuitState,
    Connection,
    Hello,
    LimitExceededError,
    Outcome,
    Register,
    Report,
    ReportBatch,
)
from breakerd.protocol._codec import MAX_COUNT


def closed_by_peer(sock: socket.socket) -> bool:
    """The daemon closed this connection (an EOF, or a reset when it aborted)."""
    try:
        while data := sock.recv(65536):
            del data  # replies to what came before the bad frame
        return True
    except ConnectionResetError:
        return True


def greeted_socket(path: Path, name: str) -> socket.socket:
    """A raw connection past hello that has registered ``name``."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(str(path))
    conn = Connection("client")
    sock.sendall(conn.send_request(1, Hello(1, 1, "hostile", 1)))
    sock.sendall(conn.send_request(2, Register(name, {"min_calls": 100})))
    return sock


def frame(message: object) -> bytes:
    body = msgpack.packb(message)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "message",
    [
        [2, "reports", {"items": [], "successes": [["svc", 0, 2**62]]}],
        [2, "reports", {"items": [], "rejections": [["svc", 2**62]]}],
        [0, 3, "acquire", {"name": "svc", "successes": 2**62, "successes_generation": 0}],
    ],
    ids=["reports.successes", "reports.rejections", "acquire.successes"],
)
def test_a_count_past_the_limit_closes_that_connection_only(
    daemon: DaemonProcess, message: list[object]
) -> None:
    good = RawClient(daemon.socket_path, timeout=5)
    generation = good.register("svc", min_calls=100).generation
    message = [*message]
    params = message[-1]
    assert isinstance(params, dict)
    # The right generation: a stale count is dropped before it costs anything.
    if isinstance(params.get("successes"), list):
        params["successes"][0][1] = generation
    if "successes_generation" in params:
        params["successes_generation"] = generation
    hostile = greeted_socket(daemon.socket_path, "svc")
    bad = frame(message)
    assert len(bad) <= 80  # a few dozen bytes used to hang the daemon for good
    hostile.sendall(bad)
    assert closed_by_peer(hostile)
    hostile.close()
    # Everyone else carries on, at once.
    assert good.acquire("svc").admitted
    status = good.status("svc").breakers[0]
    assert status.snapshot.state is CircuitState.CLOSED
    assert status.successes < MAX_COUNT
    errors = [e for e in daemon.log_events() if e["event"] == "protocol_error"]
    assert any(f"past the limit of {MAX_COUNT}" in e["error"] for e in errors)
    good.close()
    assert daemon.terminate() == 0


# -- trial leases belong to their holder ------------------------------------------------

TRIAL = {"min_calls": 1, "timeout": 0.0, "half_open_calls": 1}


def half_open_with_a_trial(client: RawClient) -> Admission:
    """Trip ``svc`` (open with a deadline already passed) and take its trial."""
    generation = client.register("svc", **TRIAL).generation
    assert client.report("svc", generation, Outcome.FAILURE).state is CircuitState.OPEN
    trial = client.acquire("svc")
    assert trial.admitted
    assert trial.lease
    return trial


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.CANCELLED])
@pytest.mark.parametrize("batched", [False, True], ids=["request", "batch"])
def test_only_the_holder_can_settle_a_trial_lease(
    daemon: DaemonProcess, outcome: Outcome, batched: bool
) -> None:
    holder = RawClient(daemon.socket_path)
    trial = half_open_with_a_trial(holder)
    other = RawClient(daemon.socket_path)
    other.register("svc", **TRIAL)
    stolen = Report("svc", trial.generation, outcome, lease=trial.lease)
    if batched:
        other.notify(ReportBatch((stolen,)))
    else:
        # Counted as stale: the breaker's state comes back, unchanged.
        answer = other.request(stolen)
        assert answer.state is CircuitState.HALF_OPEN
        assert answer.generation == trial.generation
    # Still half-open with its one trial in flight: no second trial.
    assert not other.acquire("svc").admitted
    status = other.status("svc").breakers[0].snapshot
    assert (status.state, status.trials_in_flight) == (CircuitState.HALF_OPEN, 1)
    # The holder settles it as usual.
    closed = holder.report("svc", trial.generation, Outcome.SUCCESS, lease=trial.lease)
    assert closed.state is CircuitState.CLOSED
    holder.close()
    other.close()


def test_a_lease_from_a_killed_daemon_is_stale_in_the_next_one(tmp_short: Path) -> None:
    path = tmp_short / "s.sock"
    # No state file: the random start alone keeps the numbers apart (with
    # one, the restored generation moves on past the old one too).
    no_state = ["--state-file", "none"]
    first = DaemonProcess(path, extra_args=no_state).wait_ready()
    old = RawClient(path)
    trial = half_open_with_a_trial(old)
    old.close()
    first.kill()  # kill -9
    second = DaemonProcess(path, extra_args=no_state).wait_ready(started_log=True)
    try:
        client = RawClient(path)
        new_trial = half_open_with_a_trial(client)
        # The old daemon's (generation, lease) names nothing here, even though
        # the new daemon went through the very same transitions.
        assert (new_trial.generation, new_trial.lease) != (trial.generation, trial.lease)
        stale = client.report("svc", trial.generation, Outcome.SUCCESS, lease=trial.lease)
        assert stale.state is CircuitState.HALF_OPEN
        status = client.status("svc").breakers[0].snapshot
        assert (status.state, status.trials_in_flight) == (CircuitState.HALF_OPEN, 1)
        client.close()
        assert second.terminate() == 0
    finally:
        second.kill()


# -- breakers are bounded ---------------------------------------------------------------


def configured_daemon(tmp_short: Path, daemon_section: str) -> DaemonProcess:
    config = tmp_short / "d.toml"
    config.write_text(f"[daemon]\n{daemon_section}\n")
    return DaemonProcess(tmp_short / "s.sock", config=config).wait_ready(started_log=True)


def test_breakers_per_daemon_and_per_client_are_capped(tmp_short: Path) -> None:
    process = configured_daemon(tmp_short, "max_breakers = 5\nmax_breakers_per_client = 3")
    try:
        first = RawClient(process.socket_path)
        for name in ("a", "b", "c"):
            first.register(name)
        with pytest.raises(LimitExceededError, match="max_breakers_per_client"):
            first.register("d")
        first.register("a")  # one it holds already: no new hold
        second = RawClient(process.socket_path)
        second.register("d")
        second.register("e")
        # Five breakers: a sixth is refused, whoever asks.
        with pytest.raises(LimitExceededError, match=r"max_breakers\b"):
            second.register("f")
        # Joining an existing breaker creates nothing: allowed up to the per-client cap.
        second.register("a")
        with pytest.raises(LimitExceededError, match="max_breakers_per_client"):
            second.register("b")
        names = {b.snapshot.name for b in second.status().breakers}
        assert names == {"a", "b", "c", "d", "e"}
        first.close()
        second.close()
        assert process.terminate() == 0
    finally:
        process.kill()


def test_a_full_state_table_is_an_explicit_error_never_a_shared_slot(tmp_short: Path) -> None:
    process = configured_daemon(tmp_short, "state_table_slots = 3")  # the header and two
    try:
        client = RawClient(process.socket_path)
        slots = [client.request(Register(name, {})).slot for name in ("a", "b")]
        assert sorted(slots) == [1, 2]
        with pytest.raises(LimitExceededError, match="state table is full"):
            client.request(Register("c", {}))
        client.close()
        assert process.terminate() == 0
    finally:
        process.kill()


def test_idle_closed_unheld_breakers_are_reclaimed_and_their_slots_reused(
    tmp_short: Path,
) -> None:
    process = configured_daemon(tmp_short, "breaker_idle_timeout = 0.2")
    try:
        keeper = RawClient(process.socket_path)
        keeper.register("held")
        leaver = RawClient(process.socket_path)
        idle_slot = leaver.request(Register("idle", {})).slot
        generation = leaver.register("tripped", min_calls=1, timeout=300.0).generation
        assert leaver.report("tripped", generation, Outcome.FAILURE).state is CircuitState.OPEN
        leaver.close()

        def names() -> set[str]:
            return {b.snapshot.name for b in keeper.status().breakers}

        wait_for(lambda: "idle" not in names(), what="the idle breaker to be reclaimed")
        # Held, or open: kept (an open breaker nobody holds keeps its deadline).
        assert names() == {"held", "tripped"}
        # The slot is free again, and shows the new breaker's state.
        fresh = keeper.request(Register("fresh", {}))
        assert fresh.slot == idle_slot
        # A reclaimed breaker comes back new when someone registers it again.
        again = keeper.register("idle")
        assert again.state is CircuitState.CLOSED
        events = [e for e in process.log_events() if e["event"] == "breakers_reclaimed"]
        assert events
        assert events[0]["count"] == 1
        keeper.close()
        assert process.terminate() == 0
    finally:
        process.kill()


def test_a_circuit_breaker_past_the_limit_raises_limit_exceeded(tmp_short: Path) -> None:
    process = configured_daemon(tmp_short, "max_breakers_per_client = 1")
    try:
        first = CircuitBreaker("first", daemon=process.socket_path, on_unavailable="deny")
        assert first.call_sync(lambda: 7) == 7
        # One connection per process and socket: its second breaker is one too many.
        second = CircuitBreaker("second", daemon=process.socket_path, on_unavailable="deny")
        # Registered on first use: the refusal comes with it, and with every later use.
        for _ in range(2):
            with pytest.raises(LimitExceededError, match="max_breakers_per_client"):
                second.call_sync(lambda: 7)
        link = first._actor
        assert isinstance(link, RemoteBreaker)
        link.client.close()
        assert process.terminate() == 0
    finally:
        process.kill()
