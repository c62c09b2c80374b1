"""``breakerd demo --daemon``: the original run through a real daemon and real worker processes.

Integration tests: each run starts a daemon process (or uses one started
here), three worker processes with the real openai SDK and the stand-in
server, and really waits out a short open timeout, so each takes seconds.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from daemon_helpers import DaemonProcess, short_tmpdir

from breakerd.clients import CircuitState
from breakerd.clients.cli._admin import ask_daemon
from breakerd.clients.cli._demo_daemon import PLAN, run_daemon_demo
from breakerd.clients.cli._main import main
from breakerd.protocol import Status, StatusRequest

OPEN_TIMEOUT = 0.5
#: Above the demo's 0.3 s so that a loaded machine does not time out a good answer.
CLIENT_TIMEOUT = 0.5


@pytest.mark.anyio
async def test_a_trip_in_one_process_protects_them_all() -> None:
    out = io.StringIO()

    result = await run_daemon_demo(out, open_timeout=OPEN_TIMEOUT, client_timeout=CLIENT_TIMEOUT)

    assert result.problems() == [], out.getvalue()
    requests = result.requests
    pids = result.pids
    assert len(set(pids.values())) == 3
    assert os.getpid() not in pids.values()
    assert [(r.worker, r.pid) for r in requests] == [(n, pids[n]) for n in PLAN]
    assert result.kinds() == ["success"] * 2 + ["failure"] * 3 + ["fallback"] * 3 + ["success"] * 3

    # No worker saw more than two failures; the daemon saw 3 of 5 and opened.
    failures = requests[2:5]
    assert [r.worker for r in failures] == [2, 3, 2]
    assert [r.error for r in failures] == ["APITimeoutError"] * 3
    opened, probing, closed = result.transitions
    assert (opened.from_state, opened.to_state, opened.request) == (
        CircuitState.CLOSED,
        CircuitState.OPEN,
        4,
    )
    assert opened.failure_rate == pytest.approx(0.6)
    # Workers 1 and 3 did not cause the trip: the daemon pushed it to them.
    assert opened.seen_by == (1, 2, 3)

    fallbacks = requests[5:8]
    assert sorted(r.worker for r in fallbacks) == [1, 2, 3]
    for rejected in fallbacks:
        assert not rejected.reached_server
        assert rejected.server_requests == 5
        assert rejected.state is CircuitState.OPEN
        assert rejected.prompt in rejected.text  # the fallback got the call's prompt
        assert rejected.retry_after is not None
        assert 0 < rejected.retry_after <= OPEN_TIMEOUT

    trial = requests[8]
    assert (trial.worker, trial.kind, trial.reached_server) == (1, "success", True)
    assert [(t.from_state, t.to_state, t.request) for t in (probing, closed)] == [
        (CircuitState.OPEN, CircuitState.HALF_OPEN, 8),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED, 8),
    ]
    assert probing.seen_by == closed.seen_by == (1, 2, 3)
    assert [r.text for r in requests[9:]] == [
        "stand-in answer to 'test 9'",
        "stand-in answer to 'test 10'",
    ]
    assert dict(result.final_states) == dict.fromkeys((1, 2, 3), CircuitState.CLOSED)
    assert result.server_requests == 8

    # What the daemon counted, once the workers had exited (their exit hooks
    # send the batched successes and local rejections).
    status = result.daemon_status
    assert status is not None
    assert (status.successes, status.failures, status.rejections) == (5, 3, 3)
    assert dict(result.worker_exit_codes) == {1: 0, 2: 0, 3: 0}
    # A private daemon: stopped cleanly, its socket and directory gone.
    assert not result.reused_daemon
    assert result.daemon_exit_code == 0
    assert not Path(result.socket).parent.exists()

    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("request ")] == [
        f"request {i} (worker {n}, pid {pids[n]})" for i, n in enumerate(PLAN)
    ]
    assert sum("seen by workers 1, 2, 3" in line for line in lines) == 3
    assert "daemon stopped (exit 0, socket removed)" in lines

    # problems() is what turns a run gone wrong into a failing exit code.
    leaked = dataclasses.replace(requests[6], reached_server=True)
    unheard = dataclasses.replace(opened, seen_by=(2,))
    strayed = dataclasses.replace(
        result,
        requests=(*requests[:6], leaked, *requests[7:]),
        transitions=(unheard, probing, closed),
    )
    assert "a fallback call reached the server" in strayed.problems()
    assert "closed -> open reached only workers (2,)" in strayed.problems()


@pytest.fixture
def running_daemon() -> Iterator[DaemonProcess]:
    tmp = short_tmpdir()
    process = DaemonProcess(tmp / "s.sock").wait_ready()
    yield process
    process.kill()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.anyio
async def test_the_demo_uses_a_running_daemon_under_a_name_of_its_own(
    running_daemon: DaemonProcess,
) -> None:
    result = await run_daemon_demo(
        None,
        socket=running_daemon.socket_path,
        open_timeout=OPEN_TIMEOUT,
        client_timeout=CLIENT_TIMEOUT,
    )

    assert result.problems() == []
    assert result.reused_daemon
    assert result.breaker == f"LLM-demo-{os.getpid()}"
    # Left running, and it still knows the demo's breaker.
    assert running_daemon.proc.poll() is None
    (status,) = ask_daemon(running_daemon.socket_path, StatusRequest(None))
    assert isinstance(status, Status)
    assert [b.snapshot.name for b in status.breakers] == [result.breaker]


def test_cli_demo_daemon_exits_0_and_leaves_logging_as_it_was(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = structlog.get_config()

    assert main(["demo", "--daemon"]) == 0

    captured = capsys.readouterr()
    assert "request 5 (worker 1, pid " in captured.out
    assert "request 10 (worker 3, pid " in captured.out
    assert "breaker closed -> open: failure rate 60% > 50%" in captured.out
    assert captured.err == ""
    assert structlog.get_config() == before


def test_cli_demo_socket_needs_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--socket", "/tmp/nowhere.sock"]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "breakerd demo: --socket only applies with --daemon\n"
