"""The fleet: daemons sharing opens through one real redis-server.

Figures:

  1. open propagation A -> B: from the failure report that opens a breaker
     on daemon A to the first call that daemon B rejects (a client on B
     calling ``acquire`` in a tight loop), over many breakers; p50/p99/max;
  2. Redis commands per second per host at steady state: the two daemons
     with figure 1's breakers registered (open, with 60 s to run: no
     transition during the stretch), Redis's ``total_commands_processed``
     over an idle stretch (our own ``INFO`` read subtracted);
  3. the call path with the fleet on and off: ``call_sync`` of a no-op
     through a daemon with ``--redis`` and one without, interleaved rounds
     in this process; the ratio is what counts (the machine is shared).

Needs ``redis-server`` on PATH. Run: ``python bench/bench_fleet.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon_helpers import DaemonProcess, RawClient, short_tmpdir, wait_for  # noqa: E402
from redis_helpers import RedisServer  # noqa: E402

from breakerd.clients import CircuitBreaker  # noqa: E402
from breakerd.protocol import Outcome  # noqa: E402

TRIPPY = {"min_calls": 2, "failure_threshold": 0.5, "timeout": 60.0}


def start(directory: Path, host: str, redis_url: str | None) -> DaemonProcess:
    config = directory / f"{host}.toml"
    config.write_text(f'[fleet]\nredis = "{redis_url}"\nhost = "{host}"\n' if redis_url else "")
    process = DaemonProcess(
        directory / f"{host}.sock",
        config,
        directory / f"{host}.log",
        extra_args=["--state-file", "none"],
    ).wait_ready(started_log=True)
    if redis_url:
        wait_for(lambda: "fleet_joined" in process.log(), what="fleet_joined")
    return process


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def propagation(a: RawClient, b: RawClient, rounds: int) -> list[float]:
    delays = []
    for i in range(rounds):
        name = f"prop{i}"
        b.register(name, **TRIPPY)
        generation = a.register(name, **TRIPPY).generation
        a.report(name, generation, Outcome.FAILURE)
        started = time.perf_counter()
        a.report(name, generation, Outcome.FAILURE)  # this one opens A
        while b.acquire(name).admitted:
            pass
        delays.append(time.perf_counter() - started)
    return delays


def info_commands(server: RedisServer) -> int:
    reply = server.command("INFO", "stats").decode()
    for line in reply.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError("no total_commands_processed in INFO")


def steady_commands(server: RedisServer, hosts: int, seconds: float) -> float:
    before = info_commands(server)
    time.sleep(seconds)  # a bench measures an idle stretch: nothing to wait for
    after = info_commands(server)
    return (after - before - 1) / seconds / hosts  # less our own INFO


def call_path(on: Path, off: Path, calls: int, rounds: int) -> tuple[float, float]:
    def noop() -> None:
        return None

    breakers = {
        "on": CircuitBreaker("callpath", daemon=str(on)),
        "off": CircuitBreaker("callpath", daemon=str(off)),
    }
    for breaker in breakers.values():
        for _ in range(1000):
            breaker.call_sync(noop)  # connect, register, warm up
    times: dict[str, list[float]] = {"on": [], "off": []}
    for round_ in range(rounds):
        # Each goes first in every other round: no order effect in the median.
        order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
        for key in order:
            breaker = breakers[key]
            started = time.perf_counter()
            for _ in range(calls):
                breaker.call_sync(noop)
            times[key].append((time.perf_counter() - started) / calls)
    return statistics.median(times["on"]), statistics.median(times["off"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 100 if args.quick else 500
    directory = short_tmpdir()
    server = RedisServer(directory)
    daemons: list[DaemonProcess] = []
    try:
        daemons += [start(directory, "a", server.url), start(directory, "b", server.url)]
        daemons.append(start(directory, "plain", None))
        a, b = RawClient(daemons[0].socket_path), RawClient(daemons[1].socket_path)

        delays = propagation(a, b, rounds)
        ms = [d * 1000 for d in delays]
        print(f"1. open propagation A -> B over {rounds} breakers (ms):")
        print(
            f"   p50 {percentile(ms, 0.5):.2f}  p99 {percentile(ms, 0.99):.2f}  "
            f"max {max(ms):.2f}   (goal: p99 < 100)"
        )

        seconds = 5.0 if args.quick else 20.0
        per_host = steady_commands(server, 2, seconds)
        print(f"2. Redis commands per second per host, steady state ({rounds} breakers each):")
        print(f"   {per_host:.2f}   (100 hosts: {100 * per_host:.0f}/s on one Redis)")

        calls = 20_000 if args.quick else 100_000
        on, off = call_path(daemons[0].socket_path, daemons[2].socket_path, calls, 10)
        print("3. call_sync through the daemon, success path (ns per call, median of 10):")
        print(f"   fleet on {on * 1e9:.0f}  fleet off {off * 1e9:.0f}  ratio {on / off:.3f}")
    finally:
        for process in daemons:
            process.kill()
        server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
