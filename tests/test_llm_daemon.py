"""LLM scopes end to end: real daemon, real client processes, the real openai SDK and
the demo's stand-in OpenAI server answering scripted 429s, quota errors and 5xx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
from daemon_helpers import DaemonProcess, RawClient, short_tmpdir

from breakerd.clients.cli._demo import StandInServer, stand_in_server
from breakerd.protocol import Outcome, Report, Snapshot

HERE = Path(__file__).parent


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    tmp = short_tmpdir()
    process = DaemonProcess(tmp / "s.sock").wait_ready()
    yield process
    process.kill()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[StandInServer]:
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(stand_in_server(())) as served,
    ):
        yield served


def worker(daemon: DaemonProcess, server: StandInServer, *models: str) -> list[dict[str, Any]]:
    """One client process making one call per model, in order; its lines."""
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "llm_worker.py"),
            str(daemon.socket_path),
            server.base_url,
            *list(models),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def status_json(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "breakerd.clients",
            "status",
            "--json",
            "--socket",
            str(daemon.socket_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return {record["name"]: record for record in json.loads(done.stdout)}


def test_scopes_across_processes(daemon: DaemonProcess, server: StandInServer) -> None:
    server.errors["gpt-4o"] = [(429, {"retry-after": "30"}, "rate_limit_exceeded")]
    server.errors["o3"] = [(429, {}, "insufficient_quota")]

    # Process A: gpt-4o is rate limited, for 30 s.
    (a,) = worker(daemon, server, "gpt-4o")
    assert a["end"] == "status:429"

    # Process B: gpt-4o is rejected (and says why, until when, opened by
    # whom); gpt-4o-mini is not.
    b_open, b_other = worker(daemon, server, "gpt-4o", "gpt-4o-mini")
    assert b_open["end"] == "rejected"
    assert (b_open["name"], b_open["scope"], b_open["state"]) == ("LLM/gpt-4o", "gpt-4o", "open")
    assert (b_open["reason"], b_open["error_code"]) == ("rate_limited", "rate_limit_exceeded")
    assert b_open["opened_by_pid"] == a["pid"]
    assert 25 < b_open["retry_after"] <= 30
    assert b_open["open_until"] == pytest.approx(time.time() + b_open["retry_after"], abs=5)
    assert "rate_limited" in b_open["message"]
    assert b_other["end"] == "ok"

    records = status_json(daemon)
    scope = records["LLM/gpt-4o"]
    assert (scope["parent"], scope["scope"], scope["state"]) == ("LLM", "gpt-4o", "open")
    assert (scope["reason"], scope["error_code"]) == ("rate_limited", "rate_limit_exceeded")
    assert scope["opened_by_pid"] == a["pid"]
    assert 20 < scope["retry_after"] <= 30
    assert scope["open_until"] == pytest.approx(time.time() + scope["retry_after"], abs=5)
    assert (records["LLM"]["parent"], records["LLM"]["scope"]) == (None, None)
    assert records["LLM"]["state"] == "closed"

    # Late answers of calls admitted before the opening, from a third
    # process: a shorter Retry-After never shortens the open, a longer one
    # extends it (merged with max()), and every process sees the new deadline.
    watcher = RawClient(daemon.socket_path)
    watcher.register("LLM/gpt-4o")  # a process that only watches: it gets pushes
    raw = RawClient(daemon.socket_path)
    opened: Snapshot = raw.register("LLM/gpt-4o")
    assert opened.open_until is not None
    before = opened.generation - 1
    short: Snapshot = raw.request(
        Report("LLM/gpt-4o", before, Outcome.RATE_LIMITED, retry_after=2.0)
    )
    assert (short.open_until, short.generation) == (opened.open_until, opened.generation)
    longer: Snapshot = raw.request(
        Report("LLM/gpt-4o", before, Outcome.RATE_LIMITED, retry_after=120.0)
    )
    assert longer.open_until is not None
    assert longer.open_until > opened.open_until + 60
    assert longer.generation == opened.generation + 1
    raw.close()
    watcher.status("LLM/gpt-4o")  # a round trip: the push came before its reply
    assert watcher.pushes[-1].generation == longer.generation
    assert watcher.pushes[-1].open_until == longer.open_until
    watcher.close()
    (c,) = worker(daemon, server, "gpt-4o")
    assert c["end"] == "rejected"
    assert 100 < c["retry_after"] <= 120

    # Process D: a quota error on one model opens the parent: every model is
    # rejected, in every process, for quota_timeout.
    (d,) = worker(daemon, server, "o3")
    assert d["end"] == "status:429"
    for result in worker(daemon, server, "gpt-4o-mini", "o3", "gpt-4.1"):
        assert result["end"] == "rejected"
        assert (result["name"], result["scope"], result["reason"]) == ("LLM", None, "quota")
        assert result["error_code"] == "insufficient_quota"
        assert result["opened_by_pid"] == d["pid"]
        assert 800 < result["retry_after"] <= 900
    assert server.by_model == {"gpt-4o": 1, "gpt-4o-mini": 1, "o3": 1}


def test_5xx_counts_in_the_scope_alone(daemon: DaemonProcess, server: StandInServer) -> None:
    server.errors["gpt-4o"] = [(503, {}, None)] * 5
    results = worker(daemon, server, *["gpt-4o"] * 6, "gpt-4o-mini")
    assert [r["end"] for r in results] == ["status:503"] * 5 + ["rejected", "ok"]
    assert results[5]["reason"] == "failure_rate"
    records = status_json(daemon)
    assert records["LLM/gpt-4o"]["state"] == "open"
    assert records["LLM"]["state"] == "closed"
    assert records["LLM"]["failures"] == 0
