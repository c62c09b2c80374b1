# Tests read `breaker.state` before and after calls that change it on another
# thread; mypy narrows the property after one assert and flags the next.
# mypy: disable-error-code="comparison-overlap"
"""The daemon's state table as a client maps and reads it (``_table_reader``, and a link's slot)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog.testing
from fake_daemon import (  # noqa: F401 - fixtures, found by pytest under their own names
    WAIT,
    Boom,
    FakeDaemon,
    Peer,
    ask,
    close_clients_after,
    fail_sync,
    fake_daemon,
    make_client_fixture,
    ok_sync,
    record_transitions,
    snap,
    sock_dir_fixture,
    sock_path_fixture,
    system_fixture,
    wait_until,
)

from breakerd.actor import BreakerConfig
from breakerd.actor.daemon._state_table import SharedStateTable
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState
from breakerd.clients._daemon_client import DaemonClient
from breakerd.clients._link import RemoteBreaker
from breakerd.protocol import (
    Snapshot,
)

pytestmark = pytest.mark.anyio


def table_daemon(daemon: FakeDaemon, slots: int = 16) -> SharedStateTable:
    table = daemon.table = SharedStateTable(slots)
    return table


def test_a_trip_in_the_table_is_seen_without_any_push(daemon: FakeDaemon) -> None:
    table_daemon(daemon)
    breaker = CircuitBreaker("svc", daemon=daemon.path, min_calls=1)
    link = breaker._actor
    assert isinstance(link, RemoteBreaker)
    assert breaker.state is CircuitState.CLOSED  # the first use registers it
    # The breaker's own client: its welcome came before the registration.
    client = link.client
    assert client.state_table is not None
    assert client.state_table.slots == 16
    assert breaker.state is CircuitState.CLOSED
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    # The client's lock held: its IO thread could not apply a push even if one came.
    with client._lock:
        daemon.write_table(opened)
        assert breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitBreakerOpenError) as info:
            breaker.call_sync(ok_sync)
    assert info.value.retry_after is not None
    assert 29 < info.value.retry_after <= 30
    assert breaker.snapshot.generation == 1
    assert breaker.snapshot.open_until == opened.open_until


def test_a_push_older_than_the_table_is_ignored_and_a_current_one_fills_in(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    seen, got = record_transitions(link)
    reopened = Snapshot("svc", CircuitState.OPEN, 3, open_until=time.monotonic() + 30)
    daemon.write_table(reopened)
    assert link.snapshot.generation == 3
    # A push from before that state arrives late: the table's newer state stays.
    stale = Snapshot("svc", CircuitState.HALF_OPEN, 2)
    with daemon.cond:
        for peer in daemon.peers:
            peer.push(stale)
    daemon.push(dataclasses.replace(reopened, failure_rate=0.75, calls=4))
    assert got.wait(WAIT)
    wait_until(lambda: link.snapshot.failure_rate == 0.75)
    assert link.snapshot.state is CircuitState.OPEN
    assert link.snapshot.generation == 3
    assert [(t.from_state, t.to_state) for t in seen] == [(CircuitState.CLOSED, CircuitState.OPEN)]


def test_without_the_tables_descriptor_the_client_lives_on_pushes(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    daemon.table_fd_override = -1  # the welcome announces a table but brings no descriptor
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    assert link.remote
    assert client.state_table is None
    assert link._slot_words is None
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    daemon.push(opened)
    wait_until(lambda: link.snapshot == opened)


def sealed_memfd(data: bytes, seals: int) -> int:
    """A memfd holding ``data``, with ``seals`` added (what the daemon hands out, or not)."""
    fd = os.memfd_create("bogus", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


_TABLE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def refused_table(daemon: FakeDaemon, fd: int, make_client: Callable[..., DaemonClient]) -> str:
    """The warning a client logs when offered ``fd`` as the table; it lives on pushes."""
    daemon.table_fd_override = fd
    try:
        with structlog.testing.capture_logs() as logs:
            client = make_client()
            link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    finally:
        os.close(fd)
    assert link.remote
    assert client.state_table is None
    assert link._slot_words is None
    (warning,) = [e for e in logs if e["event"] == "state_table_unusable"]
    opened = Snapshot("svc", CircuitState.OPEN, 1, open_until=time.monotonic() + 30)
    daemon.push(opened)
    wait_until(lambda: link.snapshot == opened)
    error: str = warning["error"]
    return error


def test_a_descriptor_that_is_not_a_table_is_refused_with_a_warning(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    # Sealed like a table and of the announced size, but no header.
    fd = sealed_memfd(b"\0" * 16 * 32, _TABLE_SEALS)
    assert "magic" in refused_table(daemon, fd, make_client)


def test_a_table_that_could_change_size_or_be_written_is_refused(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient], tmp_path: Path
) -> None:
    table = table_daemon(daemon)
    # A copy of a real table (header and all), missing one seal at a time:
    # shrunk, it would kill the client with SIGBUS; written, it would lie.
    image = bytes(os.pread(table.reader_fd, 16 * 32, 0))
    for missing in (fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE):
        fd = sealed_memfd(image, _TABLE_SEALS & ~missing)
        assert "seal" in refused_table(daemon, fd, make_client)
    # A plain file cannot be sealed at all.
    plain = tmp_path / "plain"
    plain.write_bytes(image)
    assert "seal" in refused_table(daemon, os.open(plain, os.O_RDONLY), make_client)


def test_a_reconnected_client_reads_the_new_daemons_table(
    daemon: FakeDaemon, make_client: Callable[..., DaemonClient]
) -> None:
    table_daemon(daemon)
    client = make_client()
    link = RemoteBreaker.open(client.path, "svc", BreakerConfig(), client=client)
    first = client.state_table
    assert first is not None
    daemon.write_table(Snapshot("svc", CircuitState.OPEN, 5, open_until=time.monotonic() + 30))
    assert link.snapshot.generation == 5
    old_table = daemon.table
    assert old_table is not None
    table_daemon(daemon)  # the next welcome brings a new table...
    with daemon.cond:
        daemon.states.clear()  # ...from a daemon whose breakers start over
    daemon.kill_peers()
    wait_until(lambda: client.epoch == 2 and link.remote)
    assert client.state_table is not None
    assert client.state_table is not first
    # The new daemon's breaker starts over at generation 0; only its table counts now.
    assert link.snapshot.generation == 0
    daemon.write_table(Snapshot("svc", CircuitState.FORCED_OPEN, 1))
    assert link.snapshot.state is CircuitState.FORCED_OPEN
    old_table.close()
