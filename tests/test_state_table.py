"""The shared state table: its layout, the daemon's sealed memfd, and a real daemon's table."""

from __future__ import annotations

import importlib.util
import mmap
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from daemon_helpers import DaemonProcess, RawClient
from hypothesis import given
from hypothesis import strategies as st

from breakerd.actor.daemon._config import ConfigError, load_config
from breakerd.actor.daemon._serve import resolve_loop
from breakerd.actor.daemon._state_table import SharedStateTable
from breakerd.clients import CircuitBreaker, CircuitState
from breakerd.clients._link import RemoteBreaker
from breakerd.protocol import (
    NEED_DATA,
    Admin,
    Connection,
    Hello,
    Outcome,
    Register,
    Registered,
    ResponseReceived,
    Snapshot,
    Welcome,
    state_table,
)

STATES = list(CircuitState)


def new_table(slots: int = 8) -> memoryview:
    buffer = memoryview(bytearray(state_table.table_size(slots)))
    state_table.write_header(buffer, slots)
    return buffer


# -- the layout (pure) ----------------------------------------------------------------------


def test_a_written_header_checks_out() -> None:
    assert state_table.check_header(new_table(8)) == 8
    assert state_table.table_size(8) == 8 * state_table.SLOT_SIZE


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b.__setitem__(slice(0, 1), b"X"), "bad magic"),
        (lambda b: b.__setitem__(slice(8, 9), b"\x09"), "layout 9"),
        (lambda b: b.__setitem__(slice(16, 17), b"\x05"), "says 5 slots"),
    ],
)
def test_a_damaged_header_is_refused(damage: object, message: str) -> None:
    buffer = new_table(8)
    damage(buffer)  # type: ignore[operator]
    with pytest.raises(state_table.StateTableError, match=message):
        state_table.check_header(buffer)


@pytest.mark.parametrize("size", [0, 32, 65, 100])
def test_a_buffer_of_the_wrong_size_is_refused(size: int) -> None:
    with pytest.raises(state_table.StateTableError, match="cannot be"):
        state_table.check_header(memoryview(bytearray(size)))


def test_a_table_needs_a_slot_besides_the_header() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        state_table.table_size(1)
    with pytest.raises(ValueError, match="not 10"):
        state_table.write_header(memoryview(bytearray(10)), 2)


@pytest.mark.parametrize("slot", [0, 8, -1])
def test_there_is_no_slot_outside_the_table(slot: int) -> None:
    with pytest.raises(IndexError):
        state_table.slot_words(new_table(8), slot)


@given(
    writes=st.lists(
        st.tuples(
            st.integers(0, 2**63),
            st.sampled_from(STATES),
            st.none() | st.floats(0, 1e9, allow_nan=False),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_a_slot_reads_back_its_last_write(
    writes: list[tuple[int, CircuitState, float | None]],
) -> None:
    buffer = new_table(4)
    words = state_table.slot_words(buffer, 2)
    changes = 0
    for write in writes:
        changes += state_table.write_slot(words, *write)
    read = state_table.read_slot(words)
    assert read == (2 * changes, *writes[-1], True)
    # Only a write that changes the slot (zeroed at first) moves its seq on.
    before = [(0, STATES[0], 0.0), *writes]
    assert changes == sum(1 for old, new in zip(before, writes, strict=False) if old != new)
    # The whole table as one view, addressed by the slot's first word, reads the same.
    assert state_table.read_slot(buffer.cast("Q"), 2 * state_table.SLOT_WORDS) == read
    # Its neighbours are untouched.
    assert state_table.read_slot(state_table.slot_words(buffer, 1)) == (0, 0, STATES[0], 0.0, True)
    assert state_table.check_header(buffer) == 4


def test_a_slot_says_when_successes_must_be_acknowledged() -> None:
    words = state_table.slot_words(new_table(4), 1)
    assert state_table.write_slot(words, 3, CircuitState.CLOSED, None)
    # The same generation and state: only the flag moves, and the seq with it.
    assert state_table.write_slot(words, 3, CircuitState.CLOSED, None, successes_safe=False)
    assert state_table.read_slot(words) == (4, 3, CircuitState.CLOSED, None, False)
    assert not state_table.write_slot(words, 3, CircuitState.CLOSED, None, successes_safe=False)
    assert state_table.write_slot(words, 3, CircuitState.CLOSED, None)
    assert state_table.read_slot(words) == (6, 3, CircuitState.CLOSED, None, True)


def test_a_slot_left_mid_write_reads_as_nothing() -> None:
    words = state_table.slot_words(new_table(4), 1)
    state_table.write_slot(words, 3, CircuitState.OPEN, 10.0)
    words[0] = words[0] + 1  # a writer killed after marking the slot busy
    assert state_table.read_slot(words) is None


def test_a_state_code_this_code_does_not_know_reads_as_nothing() -> None:
    words = state_table.slot_words(new_table(4), 1)
    state_table.write_slot(words, 3, CircuitState.OPEN, 10.0)
    words[2] = len(STATES)
    assert state_table.read_slot(words) is None


class InterleavedWriter:
    """A slot whose writer runs a whole write just before the reader's ``at``-th load."""

    def __init__(self, words: memoryview, at: int, write: tuple[int, CircuitState, float | None]):
        self.words = words
        self.at = at
        self.write = write
        self.loads = 0

    def __getitem__(self, index: int) -> int:
        self.loads += 1
        if self.loads == self.at:
            state_table.write_slot(self.words, *self.write)
        return int(self.words[index])


@given(
    at=st.integers(1, 6),
    first=st.tuples(st.integers(0, 2**40), st.sampled_from(STATES), st.none() | st.floats(0, 1e6)),
    second=st.tuples(st.integers(0, 2**40), st.sampled_from(STATES), st.none() | st.floats(0, 1e6)),
)
def test_a_reader_never_keeps_a_torn_slot(
    at: int,
    first: tuple[int, CircuitState, float | None],
    second: tuple[int, CircuitState, float | None],
) -> None:
    # What a reader must see before and after the second write, from an
    # undisturbed slot (a write that changes nothing leaves seq alone).
    reference = state_table.slot_words(new_table(4), 1)
    state_table.write_slot(reference, *first)
    before = state_table.read_slot(reference)
    state_table.write_slot(reference, *second)
    after = state_table.read_slot(reference)
    words = state_table.slot_words(new_table(4), 1)
    state_table.write_slot(words, *first)
    racing = InterleavedWriter(words, at, second)
    read = state_table.read_slot(cast(memoryview, racing))
    assert read is not None
    # Wholly the first write or wholly the second, never a mix.
    assert read in (before, after)
    assert read[1:4] in (first, second)


# -- the daemon's memfd ------------------------------------------------------------------------


@pytest.fixture
def table() -> Iterator[SharedStateTable]:
    made = SharedStateTable(4)
    yield made
    made.close()


def test_slots_go_to_breakers_in_turn_until_the_table_is_full(table: SharedStateTable) -> None:
    assert not table.full
    assert [table.slot_for(n) for n in ("a", "b", "a", "c", "d", "e", "b")] == [
        1,
        2,
        1,
        3,
        0,
        0,
        2,
    ]
    # Full: the later ones got no slot, and none was shared.
    assert table.used == 3
    assert table.full
    # A released slot goes to the next breaker.
    table.release("b")
    table.release("never-had-one")
    assert not table.full
    assert table.slot_for("d") == 2
    assert table.full


def read_only_map(table: SharedStateTable) -> memoryview:
    size = os.fstat(table.reader_fd).st_size
    return memoryview(mmap.mmap(table.reader_fd, size, mmap.MAP_SHARED, mmap.PROT_READ))


def test_readers_see_each_publish_that_changes_admission(table: SharedStateTable) -> None:
    reader = read_only_map(table)
    assert state_table.check_header(reader) == 4
    slot = table.slot_for("svc")
    words = state_table.slot_words(reader, slot)
    table.publish(Snapshot("svc", CircuitState.OPEN, 7, open_until=123.5, failure_rate=0.9))
    assert state_table.read_slot(words) == (2, 7, CircuitState.OPEN, 123.5, True)
    # Rates and trial counts change nothing a client admits by: no write.
    table.publish(Snapshot("svc", CircuitState.OPEN, 7, open_until=123.5, trials_in_flight=1))
    assert state_table.read_slot(words) == (2, 7, CircuitState.OPEN, 123.5, True)
    table.publish(Snapshot("svc", CircuitState.HALF_OPEN, 8))
    assert state_table.read_slot(words) == (4, 8, CircuitState.HALF_OPEN, None, True)
    # A breaker without a slot is not written anywhere.
    table.publish(Snapshot("other", CircuitState.OPEN, 1))
    assert bytes(reader[2 * 32 :]) == bytes(2 * 32)


def test_no_client_can_write_the_table(table: SharedStateTable) -> None:
    fd = table.reader_fd
    with pytest.raises(PermissionError):
        mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # Not even through a descriptor of its own opened for writing: the seals hold.
    writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(writable, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.pwrite(writable, b"x", 40)
        with pytest.raises(PermissionError):
            os.ftruncate(writable, 0)  # a shrink would kill every reader with SIGBUS
    finally:
        os.close(writable)
    assert os.fstat(fd).st_size == 4 * 32


# -- a real daemon --------------------------------------------------------------------------


def hello_with_descriptors(path: Path) -> tuple[socket.socket, Connection, Welcome, list[int]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    conn = Connection("client")
    sock.sendall(conn.send_request(1, Hello(1, 1, "table-test", os.getpid())))
    fds: list[int] = []
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            break
        data, received, _, _ = socket.recv_fds(sock, 65536, 4)
        fds += received
        conn.receive_data(data)
    assert isinstance(event, ResponseReceived)
    assert isinstance(event.result, Welcome)
    return sock, conn, event.result, fds


def register(sock: socket.socket, conn: Connection, name: str) -> Registered:
    sock.sendall(conn.send_request(2, Register(name, {"min_calls": 1})))
    while (event := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(65536))
    assert isinstance(event, ResponseReceived)
    assert isinstance(event.result, Registered)
    return event.result


def test_the_welcome_brings_a_read_only_table_that_shows_trips_at_once(
    daemon: DaemonProcess,
) -> None:
    sock, conn, welcome, fds = hello_with_descriptors(daemon.socket_path)
    try:
        assert len(fds) == 1
        assert welcome.state_table == 65_536
        (fd,) = fds
        assert os.fstat(fd).st_size == welcome.state_table * state_table.SLOT_SIZE
        with pytest.raises(PermissionError):
            mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_WRITE)
        buffer = memoryview(mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ))
        os.close(fd)
        assert state_table.check_header(buffer) == welcome.state_table
        registered = register(sock, conn, "svc")
        assert registered.slot >= 1
        words = state_table.slot_words(buffer, registered.slot)
        generation = registered.snapshot.generation
        assert state_table.read_slot(words) == (2, generation, CircuitState.CLOSED, None, True)
        # Another client trips it; this one reads nothing more from its socket.
        tripper = RawClient(daemon.socket_path)
        try:
            tripper.register("svc", min_calls=1)
            opened = tripper.report("svc", generation, Outcome.FAILURE)
        finally:
            tripper.close()
        assert opened.state is CircuitState.OPEN
        assert state_table.read_slot(words) == (
            4,
            generation + 1,
            CircuitState.OPEN,
            opened.open_until,
            True,
        )
    finally:
        sock.close()


def test_a_breaker_reads_a_trip_before_the_trippers_reply_is_out(daemon: DaemonProcess) -> None:
    breaker = CircuitBreaker("svc", daemon=daemon.socket_path, min_calls=1, timeout=30)
    link = breaker._actor
    assert isinstance(link, RemoteBreaker)
    link.ensure_started()  # a daemon-mode breaker connects on its first use
    assert link.remote
    assert link.client.state_table is not None
    tripper = RawClient(daemon.socket_path)
    try:
        generation = tripper.register("svc", min_calls=1).generation
        for _ in range(20):
            # Holding the client's lock keeps its IO thread from applying any
            # push: what the breaker shows comes from the table alone.
            with link.client._lock:
                opened = tripper.report("svc", generation, Outcome.FAILURE)
                assert breaker.state is CircuitState.OPEN
                assert breaker.snapshot.generation == opened.generation
            generation = tripper.request(Admin("svc", "reset")).generation
            assert breaker.snapshot.state is CircuitState.CLOSED
    finally:
        tripper.close()
        link.client.close()


def test_a_daemon_configured_without_a_table_offers_none(tmp_short: Path) -> None:
    config = tmp_short / "d.toml"
    config.write_text("[daemon]\nstate_table_slots = 0\n")
    process = DaemonProcess(tmp_short / "s.sock", config).wait_ready()
    try:
        sock, _, welcome, fds = hello_with_descriptors(process.socket_path)
        sock.close()
        assert (welcome.state_table, fds) == (0, [])
    finally:
        process.kill()


def test_a_bad_table_size_in_the_config_stops_the_daemon_before_it_binds(
    tmp_short: Path,
) -> None:
    config = tmp_short / "d.toml"
    config.write_text("[daemon]\nstate_table_slots = 1\n")
    process = DaemonProcess(tmp_short / "s.sock", config)
    assert process.proc.wait(30) == 2
    process.kill()
    assert "state_table_slots must be 0" in process.log()
    assert not (tmp_short / "s.sock").exists()


@pytest.mark.parametrize(
    ("line", "slots"), [("", 65_536), ("state_table_slots = 0", 0), ("state_table_slots = 2", 2)]
)
def test_the_config_file_sizes_the_table(tmp_path: Path, line: str, slots: int) -> None:
    config = tmp_path / "d.toml"
    config.write_text(f"[daemon]\n{line}\n")
    assert load_config(config, tmp_path / "s.sock").state_table_slots == slots


@pytest.mark.parametrize("value", ["1", "-1", "true", '"many"', "2.5", str((1 << 24) + 1)])
def test_a_table_size_that_cannot_be_is_a_config_error(tmp_path: Path, value: str) -> None:
    config = tmp_path / "d.toml"
    config.write_text(f"[daemon]\nstate_table_slots = {value}\n")
    with pytest.raises(ConfigError, match=r"state_table_slots must be 0 .* or an integer from 2"):
        load_config(config, tmp_path / "s.sock")


def test_the_loop_option_resolves_to_an_installed_loop() -> None:
    installed = importlib.util.find_spec("uvloop") is not None
    assert resolve_loop("auto") == ("uvloop" if installed else "asyncio")
    assert resolve_loop("asyncio") == "asyncio"
    with pytest.raises(ValueError, match="must be one of auto, asyncio, uvloop"):
        resolve_loop("trio")
