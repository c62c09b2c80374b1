"""Daemon mode end to end: a real daemon, and real client processes using ``CircuitBreaker``.

Every client here is a separate Python process running ``daemon_worker.py``,
which builds ``CircuitBreaker(name, daemon=socket, ...)`` with the public API
and runs a plan of steps, printing one JSON line per step. Tests order what
happens across processes with the workers' ``barrier`` steps (a line on
stdin) and wait for real events (a line from a worker, a log line, a file)
with timeouts; nothing sleeps to let time pass. The only real time that
passes on purpose is a breaker's open timeout (a fraction of a second): the
daemon is a separate process on the real monotonic clock.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProcess, wait_for

HERE = Path(__file__).resolve().parent
WORKER = HERE / "daemon_worker.py"
#: Bound on any one wait for a worker; a healthy run needs milliseconds.
STEP_TIMEOUT = 15.0
#: No call may take longer than this, daemon or no daemon.
PROMPT = 1.0


class Worker:
    """One client process running a plan; its stdout lines arrive on a queue."""

    def __init__(self, tmp: Path, plan: dict[str, Any], label: str) -> None:
        self.label = label
        self.stderr_path = tmp / f"{label}.err"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(plan)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """The next line this worker (or a child it forked) printed."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.label}: nothing within {timeout}s; stderr:\n{self.stderr()}"
            ) from None
        if line is None:
            self.lines.put(None)
            raise AssertionError(
                f"{self.label} exited ({self.proc.wait(5)}) early; stderr:\n{self.stderr()}"
            )
        return line

    def step(self, op: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        line = self.next(timeout)
        assert line.get("op") == op, (self.label, op, line)
        return line

    def ready(self) -> dict[str, Any]:
        line = self.next()
        assert line.get("event") == "ready", (self.label, line)
        return line

    def send(self, text: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def exit_code(self, timeout: float = STEP_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def daemon(tmp_short: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_short / "s.sock").wait_ready()
    yield process
    process.kill()


#: ``spawn(socket, name, breaker_kwargs, steps, **plan)``: a new worker process.
Spawn = Callable[..., Worker]


@pytest.fixture
def spawn(tmp_short: Path) -> Iterator[Spawn]:
    """``spawn(socket, name, breaker_kwargs, steps, **plan)`` starts a ready worker."""
    workers: list[Worker] = []

    def start(
        socket_path: Path,
        name: str,
        breaker: dict[str, Any],
        steps: list[dict[str, Any]],
        **plan: Any,
    ) -> Worker:
        label = f"w{len(workers) + 1}"
        full = {"socket": str(socket_path), "name": name, "breaker": breaker, "steps": steps}
        worker = Worker(tmp_short, {**full, **plan}, label)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


def started(*workers: Worker) -> None:
    """Wait until every worker has built its breaker (in parallel, not one by one)."""
    for worker in workers:
        assert worker.ready()["state"] == "closed"


def breakerd_status(socket_path: Path) -> dict[str, dict[str, Any]]:
    """``breakerd status --json``, the real command line, by breaker name."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "breakerd.clients",
            "status",
            "--json",
            "--socket",
            str(socket_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return {record["name"]: record for record in json.loads(result.stdout)}


def wait_past(deadline: float) -> None:
    """Wait until the daemon's clock (CLOCK_MONOTONIC, host-wide) passes ``deadline``."""
    wait_for(lambda: time.monotonic() > deadline, what="the open deadline")


CALL = {"op": "call", "fn": "ok"}
FAIL = {"op": "call", "fn": "fail"}
BLOCK = {"op": "call", "fn": "block"}
BARRIER = {"op": "barrier"}


def wait_state(state: str) -> dict[str, Any]:
    return {"op": "wait_state", "state": state, "timeout": STEP_TIMEOUT}


# -- one breaker for the whole host -------------------------------------------------


def test_failures_from_several_processes_trip_one_breaker(
    daemon: DaemonProcess, spawn: Spawn
) -> None:
    # Six failures in the window trip it; each process makes two.
    config = {"failure_threshold": 0.5, "min_calls": 6, "timeout": 300.0}
    steps = [BARRIER, FAIL, FAIL, wait_state("open"), CALL]
    workers = [spawn(daemon.socket_path, "svc", config, steps) for _ in range(3)]
    started(*workers)
    first, second, third = workers

    for worker in (first, second):
        worker.send()
        worker.step("barrier")
        results = [worker.step("call"), worker.step("call")]
        # Alone, two failures are below min_calls: the breaker stays closed.
        assert [(r["result"], r["state"]) for r in results] == [("failed", "closed")] * 2
    assert breakerd_status(daemon.socket_path)["svc"]["state"] == "closed"

    third.send()
    third.step("barrier")
    assert third.step("call")["state"] == "closed"
    tripping = third.step("call")
    # The sixth failure host-wide opened it, and the caller reads its own write.
    assert (tripping["result"], tripping["state"]) == ("failed", "open")

    for worker in workers:
        # The daemon pushed the trip to the processes that did not cause it...
        seen = worker.step("wait_state")
        assert (seen["ok"], seen["state"]) == (True, "open"), worker.label
        # ...and every process now rejects without running the call.
        rejected = worker.step("call")
        assert (rejected["result"], rejected["ran"]) == ("rejected", False), worker.label
        assert 250 < rejected["retry_after"] <= 300
        assert worker.exit_code() == 0

    status = breakerd_status(daemon.socket_path)["svc"]
    assert (status["state"], status["failures"], status["successes"]) == ("open", 6, 0)
    assert status["calls"] == 6
    # Each process rejected its call itself, from the shared state, and told the daemon
    # in its exit flush: on connections of their own, which the daemon may read after
    # the status request's.
    wait_for(
        lambda: breakerd_status(daemon.socket_path)["svc"]["rejections"] == 3,
        what="the three exit flushes counting one rejection each",
    )
    assert breakerd_status(daemon.socket_path)["svc"]["rejections"] == 3


def test_exactly_half_open_calls_trials_run_host_wide(daemon: DaemonProcess, spawn: Spawn) -> None:
    config = {"min_calls": 2, "timeout": 0.2, "half_open_calls": 2}
    tripper = spawn(daemon.socket_path, "svc", config, [BARRIER, FAIL, FAIL, BARRIER, BLOCK])
    others = [
        spawn(daemon.socket_path, "svc", config, [wait_state("open"), BARRIER, BLOCK])
        for _ in range(4)
    ]
    workers = [tripper, *others]
    started(*workers)
    tripper.send()
    tripper.step("barrier")
    tripper.step("call")
    opened = tripper.step("call")
    assert opened["state"] == "open"
    for worker in others:
        assert worker.step("wait_state")["ok"]

    # Past the open deadline every process asks the daemon for a trial at once.
    wait_past(opened["open_until"])
    for worker in workers:
        worker.send()
    for worker in workers:
        worker.step("barrier")
    # A trial blocks until released, so no permit comes back while the others ask.
    firsts = {worker.label: worker.next() for worker in workers}
    holding = [w for w in workers if firsts[w.label].get("event") == "in_call"]
    refused = [w for w in workers if w not in holding]
    assert len(holding) == 2, firsts
    for worker in refused:
        line = firsts[worker.label]
        assert (line["result"], line["ran"], line["state"]) == ("rejected", False, "half_open")

    status = breakerd_status(daemon.socket_path)["svc"]
    assert (status["state"], status["trials_in_flight"]) == ("half_open", 2)
    assert status["rejections"] == 3

    for worker in holding:
        worker.send("ok")
    results = [worker.step("call") for worker in holding]
    assert [r["result"] for r in results] == ["ok", "ok"]
    # Two successful trials out of two close it.
    assert breakerd_status(daemon.socket_path)["svc"]["state"] == "closed"
    for worker in workers:
        assert worker.exit_code() == 0


def test_a_killed_trial_holder_does_not_wedge_the_breaker(
    daemon: DaemonProcess, spawn: Spawn
) -> None:
    # The lease deadline is far away: only the disconnect can free the permit.
    config = {"min_calls": 2, "timeout": 0.2, "half_open_max_wait": 300.0}
    holder = spawn(daemon.socket_path, "svc", config, [BARRIER, FAIL, FAIL, BARRIER, BLOCK])
    other = spawn(
        daemon.socket_path, "svc", config, [wait_state("open"), BARRIER, CALL, BARRIER, CALL]
    )
    started(holder, other)
    holder.send()
    holder.step("barrier")
    holder.step("call")
    opened = holder.step("call")
    assert opened["state"] == "open"
    assert other.step("wait_state")["ok"]
    wait_past(opened["open_until"])

    holder.send()
    holder.step("barrier")
    assert holder.next() == {"pid": holder.pid, "event": "in_call"}
    other.send()
    other.step("barrier")
    refused = other.step("call")
    assert (refused["result"], refused["ran"], refused["state"]) == ("rejected", False, "half_open")

    holder.proc.kill()  # SIGKILL while it holds the only trial permit
    assert holder.proc.wait(10) == -9

    def released() -> bool:
        return any(
            e["event"] == "client_disconnected" and e.get("peer_pid") == holder.pid
            for e in daemon.log_events()
        )

    wait_for(released, what="the daemon noticing the dead holder")
    (gone,) = [
        e
        for e in daemon.log_events()
        if e["event"] == "client_disconnected" and e.get("peer_pid") == holder.pid
    ]
    assert gone["leases_released"] == 1

    other.send()
    other.step("barrier")
    trial = other.step("call")
    assert (trial["result"], trial["ran"], trial["state"]) == ("ok", True, "closed")
    assert other.exit_code() == 0


# -- counting ------------------------------------------------------------------------


def test_every_outcome_from_busy_processes_is_counted(daemon: DaemonProcess, spawn: Spawn) -> None:
    config = {"failure_threshold": 0.5, "min_calls": 10, "timeout": 300.0}
    # Every 499th call fails (an acknowledged request); the other calls are
    # batched successes, and each process ends with ten of them.
    calls = {"op": "calls", "n": 5000, "fail_every": 499}
    busy = [spawn(daemon.socket_path, "svc", config, [BARRIER, calls]) for _ in range(4)]
    # Its successes wait up to a minute for a batch: only the exit hook can send them.
    lazy = spawn(
        daemon.socket_path, "svc", config, [BARRIER, {"op": "calls", "n": 3000}], flush_delay=60.0
    )
    started(*busy, lazy)
    for worker in [*busy, lazy]:
        worker.send()  # all at once
    for worker in [*busy, lazy]:
        worker.step("barrier")
    for worker in busy:
        counts = worker.step("calls", timeout=60)["counts"]
        assert counts == {"ok": 4990, "failed": 10, "rejected": 0, "unavailable": 0}
    assert lazy.step("calls", timeout=60)["counts"]["ok"] == 3000
    for worker in [*busy, lazy]:
        assert worker.exit_code() == 0  # no explicit flush: the atexit hook sends the rest

    expected = 4 * 4990 + 3000
    # The exit flushes travel on the workers' own connections, which the daemon
    # may read after the status request's: wait for them, then check everything.
    wait_for(
        lambda: breakerd_status(daemon.socket_path)["svc"]["successes"] >= expected,
        what="every exit flush",
    )
    status = breakerd_status(daemon.socket_path)["svc"]
    assert status["state"] == "closed"
    assert (status["successes"], status["failures"]) == (expected, 40)
    assert status["rejections"] == 0


def test_a_forked_child_gets_its_own_connection(daemon: DaemonProcess, spawn: Spawn) -> None:
    steps = [
        CALL,
        {"op": "calls", "n": 100},
        {"op": "fork", "steps": [{"op": "calls", "n": 200, "fail_every": 100}]},
        {"op": "calls", "n": 300},
    ]
    parent = spawn(daemon.socket_path, "svc", {"min_calls": 50, "timeout": 300.0}, steps)
    started(parent)
    assert parent.step("call")["result"] == "ok"
    assert parent.step("calls")["counts"]["ok"] == 100
    child_calls = parent.step("calls")
    child_pid = child_calls["pid"]
    assert child_pid != parent.pid
    assert child_calls["counts"] == {"ok": 198, "failed": 2, "rejected": 0, "unavailable": 0}
    assert parent.step("child_done")["pid"] == child_pid
    forked = parent.step("fork")
    assert (forked["pid"], forked["child_pid"], forked["child_status"]) == (
        parent.pid,
        child_pid,
        0,
    )
    assert parent.step("calls")["counts"]["ok"] == 300
    assert parent.exit_code() == 0

    connected = [e["peer_pid"] for e in daemon.log_events() if e["event"] == "client_connected"]
    # Two connections, one per process: the child never wrote on the parent's.
    assert sorted(connected) == sorted([parent.pid, child_pid])
    status = breakerd_status(daemon.socket_path)["svc"]
    assert (status["successes"], status["failures"]) == (1 + 100 + 198 + 300, 2)


# -- the daemon goes away and comes back ----------------------------------------------

#: What each policy does while the daemon is down, step by step: (fn, ending, ran).
OUTAGE: dict[str, list[tuple[str, str, bool]]] = {
    # An in-process breaker with the same settings takes over: it still protects.
    # (1 success and 2 failures: 67% of min_calls=3 opens it.)
    "local": [("ok", "ok", True), *[("fail", "failed", True)] * 2, ("ok", "rejected", False)],
    # Fail open: every call runs, however many fail, and nothing trips.
    "allow": [*[("fail", "failed", True)] * 5, ("ok", "ok", True)],
    # Fail closed: no call runs.
    "deny": [("ok", "unavailable", False), ("fail", "unavailable", False)],
}
#: The other process's one call during the outage: its fallback is its own.
OUTAGE_OTHER = {"local": "ok", "allow": "ok", "deny": "unavailable"}
#: How a process shows it has switched to its policy: "local" builds its
#: fallback breaker (and logs it), "deny" shows an open state; with "allow"
#: a call ends the same way before and after the switch, so the warning will do.
SWITCHED: dict[str, dict[str, Any]] = {
    "local": {"op": "wait_log", "event": "breaker_local_fallback"},
    "allow": {"op": "wait_log", "event": "daemon_unavailable"},
    "deny": {"op": "wait_state", "state": "open"},
}


@pytest.mark.parametrize("policy", ["local", "allow", "deny"])
def test_daemon_down_and_back_under_each_policy(
    policy: str, tmp_short: Path, daemon: DaemonProcess, spawn: Spawn
) -> None:
    config = {"min_calls": 3, "timeout": 300.0, "on_unavailable": policy}
    outage = [{"op": "call", "fn": fn} for fn, _, _ in OUTAGE[policy]]
    lost = {**SWITCHED[policy], "timeout": STEP_TIMEOUT}
    until = {"op": "call_until", "timeout": STEP_TIMEOUT}
    first = spawn(
        daemon.socket_path,
        "svc",
        config,
        [
            CALL,
            BARRIER,
            lost,
            *outage,
            BARRIER,
            # Succeeds only through the daemon for "local" (its own breaker is
            # open for 300 s) and "deny"; at once for "allow".
            {**until, "fn": "ok", "want": "ok"},
            # Counted only once this process is back on the daemon.
            {**until, "fn": "fail", "state": "open"},
        ],
    )
    second = spawn(
        daemon.socket_path,
        "svc",
        config,
        [
            CALL,
            BARRIER,
            lost,
            CALL,
            BARRIER,
            # Only the daemon's breaker, tripped by the first process, rejects.
            {**until, "fn": "ok", "want": "rejected"},
        ],
    )
    started(first, second)
    for worker in (first, second):
        assert worker.step("call")["result"] == "ok"

    daemon.kill()  # SIGKILL: no goodbye, a stale socket file left behind
    for worker in (first, second):
        worker.send()
        worker.step("barrier")
        assert worker.step(lost["op"])["ok"], worker.stderr()
    for fn, ending, ran in OUTAGE[policy]:
        result = first.step("call")
        assert (result["result"], result["ran"]) == (ending, ran), (fn, result)
        assert result["elapsed"] < PROMPT, result
    other = second.step("call")
    assert (other["result"], other["elapsed"] < PROMPT) == (OUTAGE_OTHER[policy], True), other

    restarted = DaemonProcess(daemon.socket_path, log_path=tmp_short / "2.log")
    try:
        restarted.wait_ready(started_log=True)
        first.send()
        first.step("barrier")
        back = first.step("call_until")
        assert (back["result"], back["state"]) == ("ok", "closed"), back
        tripped = first.step("call_until")
        assert (tripped["result"], tripped["state"]) == ("failed", "open"), tripped

        second.send()
        second.step("barrier")
        shared = second.step("call_until")
        assert (shared["result"], shared["ran"]) == ("rejected", False), shared
        for result in (back, tripped, shared):
            assert result["slowest"] < PROMPT, result  # no call waited for the dead daemon
        for worker in (first, second):
            assert worker.exit_code() == 0

        status = breakerd_status(daemon.socket_path)["svc"]
        assert (status["state"], status["clients"]) == ("open", 0)
        reconnected = {
            e["peer_pid"] for e in restarted.log_events() if e["event"] == "client_connected"
        }
        assert {first.pid, second.pid} <= reconnected  # (the status command is another)
    finally:
        restarted.kill()
