"""Budgets per scope, host-wide: a real daemon, two real client processes, a real HTTP server.

The scope's budget is named ``NAME/KEY`` like its breaker, so the daemon's
budget table shares it between processes by that name, as it does a
breaker's own budgets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProcess, poll_until
from limited_server import LimitedServer
from test_budgets_daemon import WARM_UP, results, start_workers

SECONDS = 3.0
SCOPE_RATE = 10  # per second: half of what the server allows the key


@pytest.fixture
def scope_daemon(tmp_short: Path) -> Any:
    process = DaemonProcess(tmp_short / "s.sock").wait_ready(started_log=True)
    poll_until(process.socket_path.exists, 10)
    yield process
    process.kill()


def test_two_processes_share_a_scopes_rate_host_wide(scope_daemon: DaemonProcess) -> None:
    breaker = {
        "scope": "model",
        "scope_budgets": {"gpt-4o": {"max_rate": f"{SCOPE_RATE}/s"}},
        "wait": 5.0,
    }
    with LimitedServer(20) as server:
        start, procs = start_workers(
            server,
            scope_daemon.socket_path,
            breaker,
            processes=2,
            threads=4,
            seconds=SECONDS,
            limits=False,
        )
        found = results(procs)
        seen = server.statuses(start, start + SECONDS)
        steady = server.statuses(start + WARM_UP, start + SECONDS)
        busiest = server.most_in_any_window()
    # Each process on its own would send the model's rate: twice it together.
    assert busiest <= SCOPE_RATE, (busiest, seen)
    assert seen.get(429, 0) == 0, seen
    assert steady.get(200, 0) >= 0.85 * SCOPE_RATE * (SECONDS - WARM_UP), steady
    assert all(result["counts"].get("ok", 0) > 0 for result in found)  # none starved
