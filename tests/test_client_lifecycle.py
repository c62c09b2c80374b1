"""A daemon-mode client's life: it connects late, stays quiet, never waits on a hung
daemon, comes back at once to a new one, and loses nothing when its process ends.

Real daemon processes and real client processes throughout (``daemon_worker.py``,
``exit_worker.py``, ``python -c`` apps). The only real time that passes on purpose
is the client's reconnect backoff, which is what one test is about.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import test_daemon_clients
from daemon_helpers import DaemonProcess, wait_for
from test_daemon_clients import (
    BARRIER,
    CALL,
    FAIL,
    STEP_TIMEOUT,
    Spawn,
    breakerd_status,
    started,
)

# The same fixtures: one daemon per test, and worker processes running plans.
daemon = test_daemon_clients.daemon
spawn = test_daemon_clients.spawn

HERE = Path(__file__).resolve().parent
#: Generous bound on a call while the daemon is hung (the limit is daemon_timeout,
#: 0.25 s by default; before it, 5 s and more).
HUNG_CALL = 1.5
#: Generous bound on switching back to a restarted daemon (the aim is 100 ms; the
#: reconnect backoff alone was up to 2.4 s).
SWITCH_BACK = 0.5


# -- nothing is lost when a process exits --------------------------------------------------

#: Calls per breaker per child (the command line of exit_worker.py says so too).
EXIT_CALLS = 25


@pytest.mark.parametrize("mode", ["process", "pool", "fork"])
def test_children_that_end_in_os_exit_lose_no_outcome(mode: str, daemon: DaemonProcess) -> None:
    done = subprocess.run(
        [sys.executable, str(HERE / "exit_worker.py"), str(daemon.socket_path), mode, "25"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["codes"]) == {0}, done.stderr
    expected: int = result["children"] * EXIT_CALLS

    def counted() -> bool:
        status = breakerd_status(daemon.socket_path)
        return bool(
            status["ok"]["successes"] >= expected and status["shut"]["rejections"] >= expected
        )

    # The children's last writes travel on their own connections, which the
    # daemon may read after the status request's: wait for them (a lost flush
    # never comes), then check the totals are exact.
    wait_for(counted, timeout=10, what=f"{expected} outcomes per breaker")
    status = breakerd_status(daemon.socket_path)
    assert (status["ok"]["successes"], status["ok"]["failures"]) == (expected, 0)
    assert (status["shut"]["rejections"], status["shut"]["calls"]) == (expected, 0)


# -- a hung daemon holds no caller ---------------------------------------------------------


def test_a_stopped_daemon_holds_no_call_and_the_fallback_counts(
    daemon: DaemonProcess, spawn: Spawn
) -> None:
    config = {"failure_threshold": 0.5, "min_calls": 3, "timeout": 300.0}
    steps = [CALL, BARRIER, FAIL, FAIL, FAIL, CALL, BARRIER, {"op": "wait_remote"}, CALL]
    worker = spawn(daemon.socket_path, "svc", config, steps)
    started(worker)
    assert worker.step("call")["result"] == "ok"

    daemon.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
    try:
        worker.send()
        worker.step("barrier")
        failures = [worker.step("call") for _ in range(3)]
        after = worker.step("call")
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    print("calls with the daemon stopped (s):", [round(f["elapsed"], 3) for f in failures])
    for failure in failures:
        assert (failure["result"], failure["ran"]) == ("failed", True), failure
        assert failure["elapsed"] < HUNG_CALL, failure
    # The local fallback counted the three failures (3 of min_calls=3) and opened.
    assert (after["result"], after["ran"], after["state"]) == ("rejected", False, "open"), after
    assert after["elapsed"] < HUNG_CALL

    worker.send()
    worker.step("barrier")
    assert worker.step("wait_remote")["ok"]  # back on the daemon once it answers again
    last = worker.step("call")
    assert (last["result"], last["ran"], last["state"]) == ("ok", True, "closed"), last
    assert worker.exit_code() == 0
    # The first failure had gone to the daemon before the caller gave up on it:
    # the daemon counts it when it runs again. The next two never left the process.
    # (The last success comes with the worker's exit flush, on its connection.)
    wait_for(lambda: breakerd_status(daemon.socket_path)["svc"]["successes"] == 2)
    status = breakerd_status(daemon.socket_path)["svc"]
    assert (status["state"], status["failures"], status["successes"]) == ("closed", 1, 2)


def test_a_daemon_stopped_for_long_is_used_at_once_when_it_resumes(
    daemon: DaemonProcess, spawn: Spawn
) -> None:
    # Stopped past the client's request_timeout (0.5 s here): each connection
    # it tries waits that long unanswered in the listen backlog and is
    # dropped; the pause after the 7th, by backoff alone, would be 1.3-1.9 s.
    steps = [
        CALL,
        BARRIER,
        FAIL,
        {"op": "wait_attempts", "n": 7, "between": True, "timeout": STEP_TIMEOUT},
        BARRIER,
        {"op": "wait_remote", "timeout": STEP_TIMEOUT},
    ]
    worker = spawn(daemon.socket_path, "svc", {"timeout": 300.0}, steps, request_timeout=0.5)
    started(worker)
    assert worker.step("call")["result"] == "ok"
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        worker.send()
        worker.step("barrier")
        assert worker.step("call")["elapsed"] < HUNG_CALL
        assert worker.step("wait_attempts")["ok"]
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    worker.send()
    worker.step("barrier")
    back = worker.step("wait_remote")
    assert back["ok"]
    switched = back["at"] - resumed
    print(f"switched back {switched * 1000:.1f} ms after SIGCONT")
    assert switched < SWITCH_BACK
    assert worker.exit_code() == 0


def test_a_restarted_daemon_is_used_at_once(
    tmp_short: Path, daemon: DaemonProcess, spawn: Spawn
) -> None:
    # The 8th attempt comes ~3.2 s into the outage; the one after it would
    # wait 1.6-2.4 s by backoff alone.
    steps = [
        CALL,
        BARRIER,
        {"op": "wait_attempts", "n": 8, "timeout": STEP_TIMEOUT},
        {"op": "wait_remote", "timeout": STEP_TIMEOUT},
        FAIL,
    ]
    worker = spawn(daemon.socket_path, "svc", {"min_calls": 1, "timeout": 300.0}, steps)
    started(worker)
    assert worker.step("call")["result"] == "ok"
    daemon.kill()  # a stale socket file stays behind
    worker.send()
    worker.step("barrier")
    assert worker.step("wait_attempts")["ok"]

    restarted = DaemonProcess(daemon.socket_path, log_path=tmp_short / "2.log")
    try:
        restarted.wait_ready(started_log=True)
        accepting = time.monotonic()  # it logs daemon_started once it listens
        back = worker.step("wait_remote")
        assert back["ok"]
        switched = back["at"] - accepting
        print(f"switched back {switched * 1000:.1f} ms after the new daemon listened")
        assert switched < SWITCH_BACK
        failed = worker.step("call")
        assert (failed["result"], failed["state"]) == ("failed", "open"), failed
        assert worker.exit_code() == 0
        status = breakerd_status(daemon.socket_path)["svc"]
        assert (status["state"], status["failures"]) == ("open", 1)
    finally:
        restarted.kill()


# -- quiet and lazy ------------------------------------------------------------------------


def test_a_breaker_connects_on_its_first_use(daemon: DaemonProcess, spawn: Spawn) -> None:
    steps = [{"op": "threads"}, BARRIER, CALL, {"op": "threads"}, BARRIER]
    worker = spawn(daemon.socket_path, "svc", {}, steps, lazy=True)
    assert worker.next()["event"] == "ready"
    threads = worker.step("threads")["threads"]
    assert not [name for name in threads if name.startswith("breakerd")], threads
    # The daemon has not heard of it.
    assert "svc" not in breakerd_status(daemon.socket_path)
    assert worker.pid not in {e.get("peer_pid") for e in daemon.log_events()}

    worker.send()
    worker.step("barrier")
    assert worker.step("call")["result"] == "ok"
    threads = worker.step("threads")["threads"]
    assert [name for name in threads if name.startswith("breakerd-client")], threads
    assert breakerd_status(daemon.socket_path)["svc"]["clients"] == 1
    worker.send()
    worker.step("barrier")
    assert worker.exit_code() == 0


APP = """
import sys
from breakerd.clients import CircuitBreaker
{setup}
up = CircuitBreaker("up", daemon={socket!r})
up.call_sync(int)  # connects: a debug event
down = CircuitBreaker("down", daemon={missing!r})
down.call_sync(int)  # no daemon: a warning, then the local fallback (info)
"""


def run_app(socket_path: Path, setup: str) -> subprocess.CompletedProcess[str]:
    missing = str(socket_path.parent / "none.sock")
    code = APP.format(setup=textwrap.dedent(setup), socket=str(socket_path), missing=missing)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def test_an_app_that_configures_no_logging_sees_only_warnings_on_stderr(
    daemon: DaemonProcess,
) -> None:
    done = run_app(daemon.socket_path, "")
    assert done.stdout == ""
    assert "daemon_unavailable" in done.stderr  # the warning
    for quiet in ("daemon_connected", "breaker_local_fallback"):  # debug, info
        assert quiet not in done.stderr, done.stderr


def test_an_apps_structlog_configuration_is_followed(daemon: DaemonProcess) -> None:
    setup = """
        import structlog
        structlog.configure(
            processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
            logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        )
    """
    done = run_app(daemon.socket_path, setup)
    events = {e["event"]: e for e in map(json.loads, done.stdout.splitlines())}
    assert events["daemon_connected"]["level"] == "debug"
    assert events["daemon_unavailable"]["level"] == "warning"
    assert events["breaker_local_fallback"]["breaker"] == "down"
    assert done.stderr == ""


def test_an_apps_stdlib_logging_configuration_is_followed(daemon: DaemonProcess) -> None:
    setup = """
        import logging
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
    """  # noqa: E501
    done = run_app(daemon.socket_path, setup)
    lines = done.stdout.splitlines()
    assert any(line.startswith("WARNING breakerd daemon_unavailable ") for line in lines), lines
    assert any(line.startswith("INFO breakerd breaker_local_fallback ") for line in lines), lines
    assert not any("daemon_connected" in line for line in lines), lines  # debug, below INFO
    assert done.stderr == ""


def test_admin_commands_are_logged_at_debug_by_the_daemon(daemon: DaemonProcess) -> None:
    for _ in range(2):
        breakerd_status(daemon.socket_path)
    app = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from breakerd.clients import CircuitBreaker\n"
            f"CircuitBreaker('svc', daemon={str(daemon.socket_path)!r}).call_sync(int)\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert app.returncode == 0, app.stderr
    wait_for(
        lambda: any(e["event"] == "client_disconnected" for e in daemon.log_events()),
        what="the app's disconnection",
    )
    events = [e for e in daemon.log_events() if e["event"].startswith("client_")]
    # The app's connection at info; the two status commands' at debug (not logged).
    assert [e["event"] for e in events] == ["client_connected", "client_disconnected"], events
    assert {e["client"] for e in events} == {"breakerd.clients (-c)"}
