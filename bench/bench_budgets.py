"""Host-wide budgets: the figures, with real processes, a real daemon and a real HTTP server.

The stand-in OpenAI server (``tests/limited_server.py``) enforces 20
requests a second per API key in a sliding one-second window, with real
429s and OpenAI's ``x-ratelimit-*`` headers. Four worker processes
(``tests/budget_worker.py``) of four threads each call it as fast as they
can for ``--seconds`` (10 by default) through ``protect()`` and a
daemon-mode breaker:

  1. ``max_rate="20/s"`` (alone, and with the header feed on as well):
     429s (goal: 0), requests admitted against the ``20 * seconds`` the
     server allows (goal: >= 90 %), and the requests each process sent the
     daemon per call admitted (admission must not cost a round trip per
     call);
  2. the API's headers only (no ``max_rate``): 429s (goal: <= 2) and
     admitted (goal: >= 80 %);
  3. without breakerd's budgets (``protect(..., limits=False)``), and the
     bare SDK with no breaker: the 429s, for comparison;
  4. ``max_concurrent=3`` across the four processes, one killed with
     SIGKILL while its call is at the server: the most calls in flight at
     the server (goal: <= 3), and whether three were in flight again after
     the kill (its lease came back);
     And with one caller a process and calls held 100 ms: each process's
     calls, and the longest gap between two of them (leases go in turn);
  5. ``wait=5`` through a 1 s outage (503s), each thread calling until its
     first success: rejections (goal: 0) and the recovered server's
     arrivals per 100 ms after the first success (the ramp);
  6. the success path of an embedded breaker without budgets against one
     with budgets that never bind and the bare call, interleaved in one
     process (same-run ratios).

Run: ``python bench/bench_budgets.py [--seconds 10] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon_helpers import DaemonProcess, poll_until, short_tmpdir  # noqa: E402
from limited_server import LimitedServer  # noqa: E402

from breakerd.actor import ActorSystem  # noqa: E402
from breakerd.clients import CircuitBreaker  # noqa: E402

WORKER = HERE.parent / "tests" / "budget_worker.py"
LIMIT = 20


def run_workers(
    server: LimitedServer,
    socket_path: Path,
    breaker: dict[str, Any],
    seconds: float,
    *,
    processes: int = 4,
    threads: int = 4,
    keys: list[str] | None = None,
    kill_first_when_busy: bool = False,
    during: Any = None,
    **spec: Any,
) -> tuple[float, list[dict[str, Any]], float | None]:
    procs = []
    for i in range(processes):
        body = {
            "socket": str(socket_path),
            "base_url": server.base_url,
            "seconds": seconds,
            "threads": threads,
            "breaker": breaker,
            **spec,
        }
        if keys is not None:
            body["api_key"] = keys[i]
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(body)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(proc.stderr.read() if proc.stderr else "worker failed")
    start = time.monotonic() + 0.2
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start}\n")
        proc.stdin.flush()
    killed_at = None
    if during is not None:
        during(start)
    if kill_first_when_busy and keys is not None:
        poll_until(lambda: server.in_flight_by_key.get(f"Bearer {keys[0]}", 0) > 0, 30)
        os.kill(procs[0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        procs[0].wait(10)
        procs = procs[1:]
    found = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(err[-2000:])
        found.append(json.loads(out.strip().splitlines()[-1]))
    return start, found, killed_at


def summed(found: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in found:
        for key, n in result["counts"].items():
            counts[key] = counts.get(key, 0) + n
    return counts


def load_figure(
    socket_path: Path, name: str, breaker: dict[str, Any], seconds: float, **spec: Any
) -> dict[str, Any]:
    with LimitedServer(LIMIT) as server:
        # A breaker of its own per figure: the first to use a budget fixes it.
        label = "".join(c if c.isalnum() else "-" for c in name)
        start, found, _ = run_workers(
            server, socket_path, breaker, seconds, name=f"API-{label}", **spec
        )
        seen = server.statuses(start, start + seconds)
        most = server.most_in_any_window()
    calls = sum(result["counts"].get("ok", 0) for result in found)
    asked = sum(result["daemon_requests"] for result in found)
    figure = {
        "scenario": name,
        "seconds": seconds,
        "server_200": seen.get(200, 0),
        "server_429": seen.get(429, 0),
        "allowed": LIMIT * seconds,
        "admitted_pct": round(100 * seen.get(200, 0) / (LIMIT * seconds), 1),
        "most_in_one_window": most,
        "per_process_ok": [result["counts"].get("ok", 0) for result in found],
        "daemon_requests_per_call": round(asked / calls, 3) if calls and asked else 0.0,
        "worker_counts": summed(found),
    }
    print(json.dumps(figure), flush=True)
    return figure


def concurrency_figure(socket_path: Path, seconds: float) -> dict[str, Any]:
    keys = ["sk-victim", "sk-a", "sk-b", "sk-c"]
    with LimitedServer(1000, latency=0.2) as server:
        _, found, killed_at = run_workers(
            server,
            socket_path,
            {"max_concurrent": 3, "wait": 10.0},
            seconds,
            threads=2,
            keys=keys,
            kill_first_when_busy=True,
            name="API-bulkhead",
        )
        flight = list(server.flight_log)
        most = server.max_in_flight
    assert killed_at is not None
    figure = {
        "scenario": "max_concurrent=3, 4 processes x 2 threads, one SIGKILLed",
        "max_in_flight_at_server": most,
        "three_in_flight_again_after_kill": any(at > killed_at and n == 3 for at, n in flight),
        "survivor_counts": summed(found),
    }
    print(json.dumps(figure), flush=True)
    return figure


def fairness_figure(socket_path: Path, seconds: float) -> dict[str, Any]:
    # One caller a process, so that "a process got a lease" is "its key
    # arrived at the server"; calls held 100 ms.
    keys = ["sk-a", "sk-b", "sk-c", "sk-d"]
    with LimitedServer(1000, latency=0.1) as server:
        start, found, _ = run_workers(
            server,
            socket_path,
            {"max_concurrent": 3, "wait": 5.0},
            seconds,
            threads=1,
            keys=keys,
            limits=False,
            name="API-fair",
        )
        by_key = {k: sorted(server.arrivals_by_key.get(f"Bearer {k}", [])) for k in keys}
        most = server.max_in_flight
    first = min((times[0] for times in by_key.values() if times), default=start)
    figure = {
        "scenario": "max_concurrent=3, 4 processes x 1 thread, calls held 100 ms",
        "max_in_flight_at_server": most,
        "calls_per_process": [len(times) for times in by_key.values()],
        "first_call_ms_after_the_first": [
            round((times[0] - first) * 1000) if times else None for times in by_key.values()
        ],
        "longest_gap_between_a_processs_calls_ms": [
            round(max(b - a for a, b in zip(t, [*t[1:], start + seconds], strict=True)) * 1000)
            if t
            else None
            for t in by_key.values()
        ],
        "counts": summed(found),
    }
    print(json.dumps(figure), flush=True)
    return figure


def outage_figure(socket_path: Path) -> dict[str, Any]:
    # Every thread calls until its first success; the server is down for the
    # first second, so the breaker opens and the threads wait (wait=5).
    breaker = {"wait": 5.0, "min_calls": 4, "timeout": 0.5, "failure_threshold": 0.5}
    with LimitedServer(1000, latency=0.02) as server:
        server.outage(60.0)

        def recover(start: float) -> None:
            poll_until(lambda: time.monotonic() > start + 1.0, 10)
            server.outage(0.0)

        _, found, _ = run_workers(
            server,
            socket_path,
            breaker,
            8.0,
            limits=False,
            until_ok=True,
            during=recover,
            name="API-outage",
        )
        arrivals = sorted(server.arrivals)
    counts = summed(found)
    failures = [at for at, status in arrivals if status == 503]
    after = [at for at, status in arrivals if status == 200 and failures and at > failures[-1]]
    ramp: list[int] = []
    if after:
        for step in range(6):
            lo, hi = after[0] + step * 0.1, after[0] + (step + 1) * 0.1
            ramp.append(sum(1 for at in after if lo <= at < hi))
    figure = {
        "scenario": "wait=5 through a 1 s outage, 4 processes x 4 threads, one call each",
        "rejected": {k: n for k, n in counts.items() if "rejected" in k or "budget" in k},
        "server_503": len(failures),
        "successes_after_recovery": len(after),
        "arrivals_per_100ms_after_recovery": ramp,
        "offsets_ms": [round((at - after[0]) * 1000) for at in after],
        "worker_counts": counts,
    }
    print(json.dumps(figure), flush=True)
    return figure


def success_path_figure(rounds: int = 7, calls: int = 20_000) -> dict[str, Any]:
    with ActorSystem().running_in_thread() as system:
        plain = CircuitBreaker("bench-plain", system=system)
        budgeted = CircuitBreaker(
            "bench-budgeted", max_rate="1000000000/s", burst=1000, system=system
        )

        def work() -> int:
            return 1

        def bare() -> None:
            for _ in range(calls):
                work()

        def no_budgets() -> None:
            call = plain.call_sync
            for _ in range(calls):
                call(work)

        def with_budgets() -> None:
            call = budgeted.call_sync
            for _ in range(calls):
                call(work)

        contenders = {"bare": bare, "no_budgets": no_budgets, "budgets": with_budgets}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for rnd in range(rounds):
            order = list(contenders.items())
            order = order[rnd % 3 :] + order[: rnd % 3]
            for name, func in order:
                started = time.perf_counter()
                func()
                times[name].append((time.perf_counter() - started) / calls * 1e9)
            plain.status()
            budgeted.status()
    base = statistics.median(times["bare"])
    figure = {
        "scenario": "embedded success path, ns per call (median of interleaved rounds)",
        "bare": round(base),
        "no_budgets_overhead": round(statistics.median(times["no_budgets"]) - base),
        "budgets_overhead": round(statistics.median(times["budgets"]) - base),
    }
    figure["budgets_over_no_budgets"] = round(
        figure["budgets_overhead"] / max(figure["no_budgets_overhead"], 1), 2
    )
    print(json.dumps(figure), flush=True)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tmp = short_tmpdir()
    figures = []
    try:
        daemon = DaemonProcess(tmp / "s.sock").wait_ready(started_log=True)
        poll_until(daemon.socket_path.exists, 10)
        socket_path = daemon.socket_path
        try:
            seconds = args.seconds
            rate = {"max_rate": "20/s", "wait": 5.0}
            for name, breaker, spec in (
                ("max_rate=20/s", rate, {"limits": False}),
                ("max_rate=20/s + header feed", rate, {}),
                ("headers only", {"wait": 5.0}, {}),
                ("no budgets (breaker, no header feed)", {}, {"limits": False}),
                ("bare SDK, no breaker", {}, {"protect": False}),
            ):
                figures.append(load_figure(socket_path, name, breaker, seconds, **spec))
            figures.append(concurrency_figure(socket_path, min(seconds, 4.0)))
            figures.append(fairness_figure(socket_path, min(seconds, 4.0)))
            figures.append(outage_figure(socket_path))
        finally:
            daemon.kill()
        figures.append(success_path_figure())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
