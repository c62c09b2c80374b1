"""How long ``breakerd status`` takes against a running daemon, as an operator runs it.

``python bench/bench_status.py [--runs N] [--breakers K] [--quick] [--json PATH]``
starts a daemon, registers K breakers (default 20), then runs the
``breakerd`` console script (``breakerd status``) N times (default 40) one
after the other, each a fresh process as from a shell, and reports the
median, the 90th percentile and the fastest wall-clock time, start to exit.
Beside it, the same for ``python -c pass``: the interpreter's own floor,
which no change to breakerd can remove.

The goal: the median under 100 ms on a 2-vCPU machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from breakerd.clients.cli._admin import ask_daemon
from breakerd.protocol import Register

GOAL_MS = 100.0


def command() -> list[str]:
    """The installed console script, as an operator types it; ``-m`` without one."""
    script = Path(sys.executable).with_name("breakerd")
    if script.exists():
        return [str(script)]
    found = shutil.which("breakerd")
    return [found] if found else [sys.executable, "-m", "breakerd.clients"]


@contextmanager
def running_daemon(socket_path: Path) -> Iterator[None]:
    """``python -m breakerd.actor.daemon`` on ``socket_path``, stopped with SIGTERM after."""
    log = open(socket_path.with_suffix(".log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "breakerd.actor.daemon", "--socket", str(socket_path)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():  # the readiness contract
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: see {log.name}")
            time.sleep(0.005)
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def time_runs(argv: Sequence[str], runs: int) -> list[float]:
    """Wall-clock milliseconds of ``runs`` runs of ``argv``, one after the other."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        samples.append((time.perf_counter() - t0) * 1000)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.decode()}")
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered),
        "p90_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))],
        "min_ms": ordered[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--breakers", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="15 runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    runs = 15 if args.quick else args.runs
    cli = command()
    with tempfile.TemporaryDirectory(prefix="bdst", dir="/tmp") as tmp:
        socket_path = Path(tmp) / "s.sock"
        with running_daemon(socket_path):
            ask_daemon(socket_path, *(Register(f"svc-{i}") for i in range(args.breakers)))
            status_argv = [*cli, "status", "--socket", str(socket_path)]
            time_runs(status_argv, 2)  # warm the page cache, not the interpreter
            status = summary(time_runs(status_argv, runs))
            floor = summary(time_runs([sys.executable, "-c", "pass"], runs))
    print(f"breakerd status: {runs} runs against a daemon with {args.breakers} breakers")
    print(f"  command: {' '.join(cli)} status --socket ...")
    print(f"  {'':<24}{'median':>10}{'p90':>10}{'min':>10}")
    for label, figures in (("breakerd status", status), ("python -c pass", floor)):
        print(
            f"  {label:<24}{figures['median_ms']:>8.1f}ms{figures['p90_ms']:>8.1f}ms"
            f"{figures['min_ms']:>8.1f}ms"
        )
    met = status["median_ms"] < GOAL_MS
    goal = {
        "text": "`breakerd status` wall time, start to exit (median)",
        "figure": f"{status['median_ms']:.1f} ms (p90 {status['p90_ms']:.1f} ms; "
        f"python -c pass {floor['median_ms']:.1f} ms)",
        "target": f"< {GOAL_MS:g} ms",
        "met": met,
    }
    print(f"  goal: median < {GOAL_MS:g} ms: {'MET' if met else 'NOT MET'}")
    if args.json is not None:
        report = {"status": status, "python_floor": floor, "runs": runs, "goals": [goal]}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
