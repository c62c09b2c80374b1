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
from daemon_helpers import DaemonProcess, RawClient

from breakerd.protocol import (
    MAX_COUNT,
    CircuitState,
    Connection,
    Hello,
    Register,
)


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
