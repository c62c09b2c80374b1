"""Real daemon processes and a raw protocol client for the integration tests.

Also runnable as a worker: ``python tests/daemon_helpers.py SOCKET SCRIPT_JSON``
executes a list of steps against the daemon and prints JSON results, so tests
can drive several real client processes at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from breakerd.protocol import (
    NEED_DATA,
    Acquire,
    Admission,
    BreakerError,
    Connection,
    Hello,
    NotificationReceived,
    Outcome,
    Register,
    Report,
    ReportBatch,
    ResponseReceived,
    Snapshot,
    StatePush,
    Status,
    StatusRequest,
)

HERE = Path(__file__).resolve().parent
T = TypeVar("T")


def short_tmpdir() -> Path:
    # Unix socket paths are limited to 108 bytes: stay short, under /tmp.
    return Path(tempfile.mkdtemp(prefix="bd", dir="/tmp"))


def poll_until(predicate: Callable[[], T], timeout: float) -> T | None:
    """The predicate's first truthy value, or None after ``timeout`` seconds.

    For events another thread or process brings about (a file, a connection,
    a push), never for time to pass: logic tests move a fake clock instead.
    The short naps only keep the poll from hogging one of two CPUs.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait for a real-world event (a file, a process), not for time to pass."""
    if poll_until(predicate, timeout) is None:
        raise TimeoutError(f"timed out waiting for {what}")


class DaemonProcess:
    def __init__(
        self,
        socket_path: Path,
        config: Path | None = None,
        log_path: Path | None = None,
        *,
        loop: str = "auto",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.loop = loop
        args = [sys.executable, "-m", "breakerd.actor.daemon", "--socket", str(socket_path)]
        args += ["--loop", loop, *extra_args]
        if config is not None:
            args += ["--config", str(config)]
        self.stderr_path = log_path or socket_path.parent / "daemon.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stderr=self._stderr,
            stdout=subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env},
        )

    def wait_ready(self, *, started_log: bool = False) -> DaemonProcess:
        """Wait for the socket file (the readiness contract), or for the
        ``daemon_started`` line when a stale file may already be there."""

        def ready() -> bool:
            # The daemon logs daemon_started once the socket is in place.
            if started_log:
                return "daemon_started" in self.log()
            return self.socket_path.exists()

        wait_for(
            lambda: ready() or self.proc.poll() is not None,
            what=f"daemon socket {self.socket_path}",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited early: {self.log()}")
        return self

    def log(self) -> str:
        return self.stderr_path.read_text()

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._stderr.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


class RawClient:
    """A blocking client over the sans-IO connection, one request at a time."""

    def __init__(self, socket_path: Path, *, hello: bool = True, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(socket_path))
        self.conn = Connection("client")
        self.msgid = 0
        self.pushes: list[Snapshot] = []
        if hello:
            self.request(Hello(1, 1, "raw-test", os.getpid()))

    def close(self) -> None:
        self.sock.close()

    def _next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            data = self.sock.recv(65536)
            self.conn.receive_data(data)

    def request(self, message: Any) -> Any:
        self.msgid += 1
        msgid = self.msgid
        self.sock.sendall(self.conn.send_request(msgid, message))
        while True:
            event = self._next()
            if isinstance(event, NotificationReceived):
                assert isinstance(event.message, StatePush), event
                self.pushes.append(event.message.snapshot)
                continue
            assert isinstance(event, ResponseReceived), event
            assert event.msgid == msgid
            if event.error is not None:
                raise event.error
            return event.result

    def notify(self, message: Any) -> None:
        self.sock.sendall(self.conn.send_notification(message))

    def register(self, name: str, **config: Any) -> Snapshot:
        registered = self.request(Register(name, config))
        snapshot: Snapshot = registered.snapshot
        return snapshot

    def acquire(self, name: str) -> Admission:
        admission: Admission = self.request(Acquire(name))
        return admission

    def report(self, name: str, generation: int, outcome: Outcome, lease: int = 0) -> Snapshot:
        snapshot: Snapshot = self.request(Report(name, generation, outcome, lease=lease))
        return snapshot

    def status(self, name: str | None = None) -> Status:
        status: Status = self.request(StatusRequest(name))
        return status


def run_worker(socket_path: Path, steps: list[list[Any]]) -> list[Any]:
    """Steps: ["register", name, config], ["fail", name, n], ["succeed", name, n],
    ["acquire", name], ["hold", name] (acquire and never report), ["status", name]."""
    client = RawClient(socket_path)
    results: list[Any] = []
    generation = 0
    for step in steps:
        kind, name = step[0], step[1]
        if kind == "register":
            snapshot = client.register(name, **step[2])
            generation = snapshot.generation
            results.append(snapshot.state.value)
        elif kind == "fail":
            for _ in range(step[2]):
                snapshot = client.report(name, generation, Outcome.FAILURE)
            results.append(snapshot.state.value)
        elif kind == "succeed":
            batch = ReportBatch(
                tuple(Report(name, generation, Outcome.SUCCESS) for _ in range(100))
            )
            for _ in range(step[2] // 100):
                client.notify(batch)
            # An acknowledged request after the batch: FIFO makes it a barrier.
            results.append(client.acquire(name).admitted)
        elif kind in ("acquire", "hold"):
            try:
                admission = client.acquire(name)
            except BreakerError as exc:
                results.append(f"error:{exc.code}")
                continue
            results.append(admission.admitted)
            if kind == "hold" and admission.admitted:
                print(json.dumps(results), flush=True)
                signal.pause()  # holds the lease until the test kills it
        elif kind == "acquire_and_wait":
            results.append(client.acquire(name).admitted)
            print(json.dumps(results), flush=True)
            sys.stdin.read()  # keep the connection (and any lease) until told
        elif kind == "status":
            status = client.status(name)
            results.append(status.breakers[0].snapshot.state.value)
    client.close()
    return results


def spawn_worker(socket_path: Path, steps: list[list[Any]]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "daemon_helpers.py"), str(socket_path), json.dumps(steps)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_result(proc: subprocess.Popen[str], timeout: float = 30.0) -> list[Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}): {err}")
    result: list[Any] = json.loads(out.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    print(json.dumps(run_worker(Path(sys.argv[1]), json.loads(sys.argv[2]))), flush=True)
