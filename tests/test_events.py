"""Live events: `breakerd events` and `breakerd status --watch` as real processes.

Transitions are caused by other real processes (tests/daemon_helpers.py
workers) against a real daemon; the commands must see them pushed.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest
from daemon_helpers import DaemonProcess, RawClient, spawn_worker, wait_for, worker_result

from breakerd.protocol import (
    PROTOCOL_VERSION,
    CircuitState,
    Connection,
    Hello,
    NotificationReceived,
    RemoteProtocolError,
    RequestReceived,
    Status,
    StatusRequest,
    Subscribe,
    Subscribed,
    TransitionEvent,
    frame_notification,
)
from breakerd.protocol._errors import LocalProtocolError

TRIP: list[list[Any]] = [
    ["register", "LLM", {"min_calls": 2, "timeout": 300.0}],
    ["fail", "LLM", 2],
]


class Command:
    """A `breakerd` subprocess whose stdout lines arrive in a queue."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "breakerd.clients", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 10.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s; exit {self.proc.poll()}") from None

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def subscriptions(daemon: DaemonProcess) -> int:
    return sum(e["event"] == "events_subscribed" for e in daemon.log_events())


def test_events_json_sees_a_trip_caused_by_another_process(daemon: DaemonProcess) -> None:
    events = Command("events", "--json", "--socket", str(daemon.socket_path))
    try:
        wait_for(lambda: subscriptions(daemon) == 1, what="the subscription")
        before = time.time()
        assert worker_result(spawn_worker(daemon.socket_path, TRIP)) == ["closed", "open"]
        record = json.loads(events.line())
        assert set(record) == {
            "time",
            "name",
            "from_state",
            "to_state",
            "reason",
            "failure_rate",
            "slow_call_rate",
            "open_until",
        }
        assert record["name"] == "LLM"
        assert (record["from_state"], record["to_state"]) == ("closed", "open")
        assert record["reason"] == "failure_rate_exceeded"
        assert record["failure_rate"] == 1.0
        assert record["slow_call_rate"] == 0.0
        assert before - 1 <= record["time"] <= time.time() + 1
        assert record["open_until"] == pytest.approx(record["time"] + 300.0, abs=1.0)
        code, err = events.interrupt()
        assert (code, err) == (0, "")
    finally:
        events.kill()


def test_events_for_named_breakers_only_in_plain_text(daemon: DaemonProcess) -> None:
    events = Command("events", "db", "--socket", str(daemon.socket_path))
    try:
        wait_for(lambda: subscriptions(daemon) == 1, what="the subscription")
        worker_result(spawn_worker(daemon.socket_path, TRIP))
        worker_result(
            spawn_worker(
                daemon.socket_path,
                [["register", "db", {"min_calls": 1, "timeout": 60.0}], ["fail", "db", 1]],
            )
        )
        line = events.line()
        fields = line.split("  ")
        assert fields[1:4] == ["db", "closed -> open", "failure_rate_exceeded"], line
        assert "failure_rate=100.0%" in fields
        assert fields[-1].startswith("open_until=20")
        assert events.lines.empty()  # LLM's trip, earlier, was not printed
        assert events.interrupt() == (0, "")
    finally:
        events.kill()


def test_status_watch_redraws_on_every_pushed_change(daemon: DaemonProcess) -> None:
    client = RawClient(daemon.socket_path)
    client.register("LLM", min_calls=2, timeout=300.0)
    watch = Command("status", "--watch", "--json", "--socket", str(daemon.socket_path))
    try:
        first = json.loads(watch.line())  # drawn once subscribed
        assert [(r["name"], r["state"]) for r in first] == [("LLM", "closed")]
        worker_result(spawn_worker(daemon.socket_path, TRIP))
        after = json.loads(watch.line())
        assert [(r["name"], r["state"]) for r in after] == [("LLM", "open")]
        assert watch.interrupt() == (0, "")
    finally:
        watch.kill()
        client.close()


def test_events_carry_on_through_a_daemon_restart(tmp_short: Path) -> None:
    sock = tmp_short / "s.sock"
    first = DaemonProcess(sock, log_path=tmp_short / "first.log").wait_ready()
    events = Command("events", "--json", "--socket", str(sock))
    second: DaemonProcess | None = None
    try:
        wait_for(lambda: subscriptions(first) == 1, what="the subscription")
        assert first.terminate() == 0
        second = DaemonProcess(sock, log_path=tmp_short / "second.log").wait_ready()
        restarted = second
        wait_for(lambda: subscriptions(restarted) == 1, what="the new subscription")
        worker_result(spawn_worker(sock, TRIP))
        record = json.loads(events.line())
        assert (record["name"], record["to_state"]) == ("LLM", "open")
        code, err = events.interrupt()
        assert code == 0
        lost, back = err.splitlines()
        assert lost.startswith("breakerd: the daemon at ")
        assert lost.endswith("reconnecting (transitions until then are not shown)")
        assert back == f"breakerd: resubscribed at {sock}"
    finally:
        events.kill()
        first.kill()
        if second is not None:
            second.kill()


def test_events_without_a_daemon_is_one_line_and_exit_1(tmp_short: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "breakerd.clients", "events", "--socket", str(tmp_short / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("breakerd: no breakerd daemon at")
    assert len(result.stderr.splitlines()) == 1


def test_raw_subscriber_gets_transition_notifications(daemon: DaemonProcess) -> None:
    # The wire contract underneath the commands, and that state pushes to a
    # registered client still come as before.
    watcher = RawClient(daemon.socket_path, hello=False)
    watcher.request(Hello(1, 1, "raw-events", 0))
    assert watcher.request(Subscribe(("LLM",))) == Subscribed()
    worker_result(spawn_worker(daemon.socket_path, TRIP))
    event = watcher._next()
    assert isinstance(event, NotificationReceived)
    message = event.message
    assert isinstance(message, TransitionEvent)
    assert (message.name, message.from_state, message.to_state) == (
        "LLM",
        CircuitState.CLOSED,
        CircuitState.OPEN,
    )
    # Generations start at a random number per breaker; the trip is the first move.
    status = watcher.request(StatusRequest("LLM"))
    assert isinstance(status, Status)
    assert message.generation == status.breakers[0].snapshot.generation
    assert message.open_until is not None
    # ``at`` is read when the daemon sends the event, a moment after the trip.
    assert message.open_until - message.at == pytest.approx(300.0, abs=1.0)
    watcher.close()


EVENT = TransitionEvent(
    "LLM", CircuitState.CLOSED, CircuitState.OPEN, 1, "failure_rate_exceeded", 5.0
)


def test_only_a_server_sends_transition_events() -> None:
    hello = Hello(1, PROTOCOL_VERSION, "t", 1)
    client = Connection("client")
    greeting = client.send_request(0, hello)
    with pytest.raises(LocalProtocolError, match="a client sends no 'transition' notifications"):
        client.send_notification(EVENT)
    server = Connection("server")
    server.receive_data(greeting + frame_notification(EVENT))  # as a rogue client would
    assert server.next_event() == RequestReceived(0, hello)
    with pytest.raises(RemoteProtocolError, match="a client sent a 'transition' notification"):
        server.next_event()
