"""Host-wide budgets: real daemon, real client processes, a real local HTTP server.

The server (``limited_server.LimitedServer``) enforces 20 requests a second
per API key in a sliding one-second window, with real 429s and OpenAI's
``x-ratelimit-*`` headers, and records every arrival on the host's
monotonic clock. Four worker processes (``budget_worker.py``) call it as
fast as their threads can, through ``protect()`` and a daemon-mode breaker.
These are short versions (3 s) of the 10 s figures in
``bench/bench_budgets.py``, with the same assertions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import HERE, DaemonProcess, RawClient, poll_until
from limited_server import LimitedServer

from breakerd.actor._budget import RAMP_STEP
from breakerd.clients import CircuitBreaker
from breakerd.protocol import (
    BudgetExceededError,
    BudgetGrant,
    BudgetRequest,
    Register,
    ResponseReceived,
)

SECONDS = 3.0
WARM_UP = 0.5
HEADER_SECONDS = 4.0
LIMIT = 20


def start_workers(
    server: LimitedServer,
    socket_path: Path | None,
    breaker: dict[str, Any],
    *,
    processes: int = 4,
    threads: int = 4,
    seconds: float = SECONDS,
    keys: list[str] | None = None,
    **spec: Any,
) -> tuple[float, list[subprocess.Popen[str]]]:
    """Start the workers, wait until each is connected, start them together."""
    procs = []
    for i in range(processes):
        if keys is not None:
            spec["api_key"] = keys[i]
        body = {
            "socket": None if socket_path is None else str(socket_path),
            "base_url": server.base_url,
            "seconds": seconds,
            "threads": threads,
            "breaker": breaker,
            **spec,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "budget_worker.py"), json.dumps(body)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            raise AssertionError(f"worker did not start: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
    start = time.monotonic() + 0.2
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start}\n")
        proc.stdin.flush()
    return start, procs


def results(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    found = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        found.append(json.loads(out.strip().splitlines()[-1]))
    return found


def total(found: list[dict[str, Any]], key: str) -> int:
    return sum(result["counts"].get(key, 0) for result in found)


@pytest.fixture
def budget_daemon(tmp_short: Path) -> Any:
    process = DaemonProcess(tmp_short / "s.sock").wait_ready(started_log=True)
    poll_until(process.socket_path.exists, 10)
    yield process
    process.kill()


def test_max_rate_keeps_four_processes_under_the_limit(budget_daemon: DaemonProcess) -> None:
    # max_rate alone (no header feed): the header-fed budget has its own test.
    with LimitedServer(LIMIT) as server:
        start, procs = start_workers(
            server, budget_daemon.socket_path, {"max_rate": "20/s", "wait": 5.0}, limits=False
        )
        found = results(procs)
        seen = server.statuses(start, start + SECONDS)
        # Admitted in the steady state: past the first half second, in
        # which four processes connect and take their first slots (the
        # bench's 10 s run counts it in).
        steady = server.statuses(start + WARM_UP, start + SECONDS)
        context = server.around_429s()
    assert seen.get(429, 0) == 0, (seen, context)
    assert server.most_in_any_window() <= LIMIT
    allowed = LIMIT * (SECONDS - WARM_UP)
    assert steady.get(200, 0) >= 0.9 * allowed, steady
    assert all(result["counts"].get("ok", 0) > 0 for result in found)  # none starved
    calls = total(found, "ok")
    # Admission does not cost a round trip per call: slots come several a request.
    asked = sum(result["daemon_requests"] for result in found)
    assert asked < 0.75 * calls, (asked, calls)


def test_the_apis_headers_alone_keep_the_host_nearly_free_of_429s(
    budget_daemon: DaemonProcess,
) -> None:
    with LimitedServer(LIMIT) as server:
        start, procs = start_workers(
            server, budget_daemon.socket_path, {"wait": 5.0}, seconds=HEADER_SECONDS
        )
        results(procs)
        seen = server.statuses(start, start + HEADER_SECONDS)
        context = server.around_429s()
    # Counted from the start: the first calls of each process leave before
    # any response has said what is left (they fill most of the first
    # window), and the rest wait for that window to slide.
    assert seen.get(429, 0) <= 2, (seen, context)
    assert seen.get(200, 0) >= 0.8 * LIMIT * HEADER_SECONDS, seen


def test_without_budgets_the_host_earns_429s(budget_daemon: DaemonProcess) -> None:
    # The comparison: the same load without breakerd's budgets (no header feed).
    with LimitedServer(LIMIT) as server:
        start, procs = start_workers(
            server, budget_daemon.socket_path, {}, limits=False, seconds=1.0
        )
        results(procs)
        seen = server.statuses(start, start + 1.0)
    assert seen.get(429, 0) > 0, seen


def test_max_concurrent_holds_across_processes_and_a_killed_holder(
    budget_daemon: DaemonProcess,
) -> None:
    keys = ["sk-victim", "sk-a", "sk-b", "sk-c"]
    with LimitedServer(1000, latency=0.2) as server:
        _start, procs = start_workers(
            server,
            budget_daemon.socket_path,
            {"max_concurrent": 3, "wait": 10.0},
            threads=2,
            seconds=5.0,
            keys=keys,
        )
        # Kill a process while it holds a lease (its call is at the server:
        # each process calls with a key of its own), early enough that the
        # others still call for a few seconds after it.

        def holder() -> str | None:
            return next(
                (k for k in keys if server.in_flight_by_key.get(f"Bearer {k}", 0) > 0), None
            )

        held = poll_until(holder, 2.5)
        assert held is not None
        victim = procs[keys.index(held)]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(10)
        survivors = results([proc for proc in procs if proc is not victim])
        flight = list(server.flight_log)
        max_in_flight = server.max_in_flight
    assert max_in_flight <= 3, max_in_flight
    # The dead process's lease came back: three calls in flight again after it.
    assert any(at > killed_at and count == 3 for at, count in flight), flight[-20:]
    assert all(result["counts"].get("ok", 0) > 0 for result in survivors)


HOLD = 0.1
#: A call's own cost at the client beyond the server's hold: the SDK, HTTP
#: and the lease's round trips on a loaded 2-CPU machine (about 60 ms measured).
CALL_COST = 0.15


def test_leases_go_to_the_processes_waiting_in_turn(budget_daemon: DaemonProcess) -> None:
    # Four processes, one caller each, three leases, calls held HOLD at the
    # server. In turn (first come, first served), a process that finishes a
    # call queues behind at most one other: the three others hold leases
    # taken before its own call ended, so one of them is free within one
    # call (HOLD + CALL_COST). So between two arrivals of a process at the
    # server: its own call and at most one other; and the fourth process's
    # first call waits for one of the first three, then pays its own first
    # request's start-up (the SDK's, up to another call's worth measured
    # on a loaded machine): two calls after the first. Polling, a process
    # that had just given its lease back asked again at once and got it
    # back, while another slept between two looks (seen: one process with
    # no lease for 2.5 s).
    keys = ["sk-a", "sk-b", "sk-c", "sk-d"]
    seconds = 2.0
    call = HOLD + CALL_COST
    with LimitedServer(1000, latency=HOLD) as server:
        start, procs = start_workers(
            server,
            budget_daemon.socket_path,
            # A daemon slow to answer under load must not make a process
            # fall back on its own budgets: that is another test.
            {"max_concurrent": 3, "wait": 5.0, "daemon_timeout": 2.0},
            threads=1,
            seconds=seconds,
            keys=keys,
            limits=False,
        )
        found = results(procs)
        by_key = {key: sorted(server.arrivals_by_key.get(f"Bearer {key}", [])) for key in keys}
        max_in_flight = server.max_in_flight
    assert max_in_flight <= 3, max_in_flight
    shown = {key: [round(at - start, 3) for at in times] for key, times in by_key.items()}
    assert all(by_key.values()), shown
    # The first call's own start-up (the SDK's first request) is not the lease's.
    first = min(times[0] for times in by_key.values())
    for key, times in by_key.items():
        assert times[0] - first <= 2 * call, (key, shown)
        gaps = [b - a for a, b in itertools.pairwise([*times, start + seconds])]
        assert max(gaps) <= 2 * call, (key, shown)
    rejected = {k: n for r in found for k, n in r["counts"].items() if k != "ok"}
    assert not rejected, rejected


def test_a_dead_holders_lease_is_released_by_the_daemon(budget_daemon: DaemonProcess) -> None:
    holder = RawClient(budget_daemon.socket_path)
    holder.request(Register("bulkhead", {}))
    grant = holder.request(BudgetRequest("bulkhead", max_concurrent=1, lease=True))
    assert isinstance(grant, BudgetGrant)
    assert grant.lease
    other = RawClient(budget_daemon.socket_path)
    other.request(Register("bulkhead", {}))
    refused = other.request(BudgetRequest("bulkhead", max_concurrent=1, lease=True))
    assert refused.lease == 0
    assert refused.reason == "concurrency"
    holder.close()  # its process went away
    assert poll_until(
        lambda: other.request(BudgetRequest("bulkhead", max_concurrent=1, lease=True)).lease, 5
    )
    other.close()


def test_the_daemon_answers_a_lease_waiting_in_line_when_one_is_freed(
    budget_daemon: DaemonProcess,
) -> None:
    def client() -> RawClient:
        raw = RawClient(budget_daemon.socket_path)
        raw.request(Register("line", {}))
        return raw

    def ask(wait: float) -> BudgetRequest:
        return BudgetRequest("line", max_concurrent=1, lease=True, wait=wait)

    holder, gone, waiter, late = client(), client(), client(), client()
    granted = holder.request(ask(5.0))
    assert isinstance(granted, BudgetGrant)
    lease = granted.lease
    assert lease
    # Two wait in line without reading; the first's connection closes.
    gone.sock.sendall(gone.conn.send_request(1, ask(5.0)))
    waiter.msgid += 1
    waiter.sock.sendall(waiter.conn.send_request(waiter.msgid, ask(5.0)))
    gone.close()

    def disconnected() -> bool:
        return any(e.get("event") == "client_disconnected" for e in budget_daemon.log_events())

    assert poll_until(disconnected, 5)
    holder.request(BudgetRequest("line", release=(lease,)))
    # The freed lease went to the waiter still connected: its answer.
    event = waiter._next()
    assert isinstance(event, ResponseReceived), event
    assert isinstance(event.result, BudgetGrant), event
    assert event.result.lease, event.result
    # A waiter whose wait runs out is refused at its deadline, not before.
    began = time.monotonic()
    refused = late.request(ask(0.3))
    waited = time.monotonic() - began
    assert refused.reason == "concurrency", refused
    assert 0.3 <= waited < 1.5, waited
    for raw in (holder, waiter, late):
        raw.close()


def test_wait_rides_out_an_outage_and_recovery_ramps(budget_daemon: DaemonProcess) -> None:
    # Every thread calls until its first success: the server is down from
    # the start, the breaker opens on the first failures, and the threads
    # wait (wait=5) through the outage; what the server sees once it is
    # back is the waiting calls being released.
    # daemon_timeout: under load, a daemon slow to answer would have a
    # process admit calls on its own (local) breaker, not in the ramp.
    breaker = {
        "wait": 5.0,
        "min_calls": 4,
        "timeout": 0.5,
        "failure_threshold": 0.5,
        "daemon_timeout": 2.0,
    }
    with LimitedServer(1000, latency=0.02) as server:
        server.outage(60.0)
        start, procs = start_workers(
            server, budget_daemon.socket_path, breaker, seconds=8.0, limits=False, until_ok=True
        )
        assert poll_until(lambda: time.monotonic() > start + 1.0, 5)
        server.outage(0.0)
        found = results(procs)
        arrivals = sorted(server.arrivals)
    rejected = {key: n for r in found for key, n in r["counts"].items() if "rejected" in key}
    assert not rejected, rejected  # no call is rejected: they waited for the recovery
    # The recovered server sees one ramp for the whole host, not every
    # waiting call at once, nor one ramp per process.
    assert total(found, "ok") == 4 * 4
    failures = [at for at, status in arrivals if status == 503]
    assert failures
    after = [at for at, status in arrivals if status == 200 and at > failures[-1]]
    recovered = after[0]  # the trial that closed the breaker
    offsets = [round(at - recovered, 3) for at in after]
    # The ramp begins once the trial's answer closed the breaker (at least
    # its 20 ms at the server after it arrived): its first place leaves at
    # once, the next two RAMP_STEP later, the next four 2 * RAMP_STEP later.
    # So before recovered + RAMP_STEP the server sees the trial and one
    # waiter, and before recovered + 2 * RAMP_STEP at most three more. One
    # ramp per process let one waiter of each process go at once (the trial
    # and four), and three of each within the second step.
    first_step = [at for at in after if at < recovered + 0.9 * RAMP_STEP]
    two_steps = [at for at in after if at < recovered + 1.9 * RAMP_STEP]
    assert len(first_step) <= 2, offsets
    assert len(two_steps) <= 4, offsets
    assert after[-1] - recovered >= 3 * RAMP_STEP, offsets


@pytest.mark.anyio
async def test_async_callers_take_host_wide_slots_and_leases(
    budget_daemon: DaemonProcess,
) -> None:
    socket_path = str(budget_daemon.socket_path)
    paced = CircuitBreaker("async-paced", daemon=socket_path, max_rate="50/s", wait=5.0)
    _ = paced.config_conflicts  # connected and registered

    async def when() -> float:
        return time.monotonic()

    leaves = [await paced.call(when) for _ in range(8)]
    gaps = [b - a for a, b in itertools.pairwise(leaves)]
    spacing = 1 / (50 * 0.95)
    assert min(gaps) > spacing * 0.5, gaps  # paced by the daemon's schedule
    assert sum(gaps) >= spacing * 6, gaps
    bulkhead = CircuitBreaker("async-bulkhead", daemon=socket_path, max_concurrent=1)
    _ = bulkhead.config_conflicts
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def held() -> None:
        entered.set()
        await leave.wait()

    task = asyncio.ensure_future(bulkhead.call(held))
    await entered.wait()
    with pytest.raises(BudgetExceededError) as caught:
        await bulkhead.call(when)
    assert caught.value.reason == "concurrency"
    leave.set()
    await task
    assert await bulkhead.call(when) > 0  # its lease went back to the daemon


@pytest.mark.anyio
async def test_an_async_waiter_gets_the_lease_freed_and_a_cancelled_one_gives_it_back(
    budget_daemon: DaemonProcess,
) -> None:
    bulkhead = CircuitBreaker(
        "async-line", daemon=str(budget_daemon.socket_path), max_concurrent=1, wait=5.0
    )
    _ = bulkhead.config_conflicts
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def held() -> None:
        entered.set()
        await leave.wait()

    async def when() -> float:
        return time.monotonic()

    holder = asyncio.ensure_future(bulkhead.call(held))
    await entered.wait()
    gives_up = asyncio.ensure_future(bulkhead.call(when))
    await asyncio.sleep(0.2)  # it asked, and waits in line at the daemon
    waiter = asyncio.ensure_future(bulkhead.call(when))
    await asyncio.sleep(0.2)  # behind it
    gives_up.cancel()
    freed = time.monotonic()
    leave.set()
    await holder
    # The lease went to the cancelled call's request first, which gave it
    # straight back: the next in line has it at once, no poll between.
    got = await asyncio.wait_for(waiter, 2.0)
    assert got - freed < 0.5, got - freed
    assert gives_up.cancelled()
    assert await asyncio.wait_for(bulkhead.call(when), 2.0) > 0


def test_the_server_takes_a_burst_of_connections_at_once() -> None:
    # The worker processes open their connections all at once when they
    # start. A connection the server's listen queue has no room for is not
    # refused but retried by the kernel a second later, so a call admitted
    # before an outage would reach the server after it (inside the
    # recovery ramp's first step). None accepted yet: all must connect.
    burst = 64
    server = LimitedServer()
    sockets: list[socket.socket] = []
    try:
        for _ in range(burst):
            sock = socket.socket()
            sock.setblocking(False)
            sockets.append(sock)
            sock.connect_ex(server.httpd.server_address)
        pending = list(sockets)
        deadline = time.monotonic() + 2.0  # past the kernel's first retry
        while pending and time.monotonic() < deadline:
            wait = max(deadline - time.monotonic(), 0.0)
            _, writable, _ = select.select([], pending, [], wait)
            pending = [sock for sock in pending if sock not in writable]
        failed = [sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for sock in sockets]
        assert not pending, f"{len(pending)} of {burst} connections still waiting"
        assert not any(failed), failed
    finally:
        for sock in sockets:
            sock.close()
        server.httpd.server_close()
