"""What the daemon's state file costs its loop: one write, and the periodic check.

The daemon writes the whole file, synchronously on its loop, at every
transition (before the pushes and the reply) and, when anything changed,
once per ``SNAPSHOT_INTERVAL``. This measures, for several numbers of
breakers, with real actors (full count windows) and a real file:

* ``first``: the first write, every breaker exported and encoded;
* ``idle``: the periodic check when nothing changed (nothing is written);
* ``one``: a write after one breaker changed, as at a transition: that
  breaker exported and encoded again, the file assembled and written;
* ``fsyncs``: of which the file system's part: temporary file, write,
  fsync, rename, fsync of the directory.

Run: ``python bench/bench_state_file.py [--dir DIR] [--repeat N]``; ``--dir``
decides the file system (default: a temporary directory under /tmp).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from breakerd.actor._actor import BreakerActor
from breakerd.actor._machine import BreakerConfig
from breakerd.actor.daemon._state_file import StateFile
from breakerd.protocol import Outcome


def actors(count: int) -> list[BreakerActor]:
    made = []
    for index in range(count):
        actor = BreakerActor(f"service-{index}", BreakerConfig(), clock=time.monotonic)
        generation = actor.machine.generation
        # A full count window (100 outcomes), a few of them failures.
        actor.post_success(generation, 95)
        for _ in range(5):
            actor.post_report((generation, Outcome.FAILURE, 0.0))
        actor.settle()
        made.append(actor)
    return made


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or "/tmp") as directory:
        print(f"file system of {directory}; medians of {args.repeat} runs, milliseconds")
        print(f"{'breakers':>9} {'bytes':>10} {'first':>9} {'idle':>9} {'one':>9} {'fsyncs':>9}")
        for count in (1, 100, 1_000, 10_000):
            group = actors(count)
            path = Path(directory) / "b.state"
            firsts, idles, ones, syncs = [], [], [], []
            for _ in range(args.repeat):
                state_file = StateFile(path, lambda g=group: g)
                started = time.perf_counter()
                assert state_file.write()
                firsts.append(time.perf_counter() - started)
                started = time.perf_counter()
                assert not state_file.write()
                idles.append(time.perf_counter() - started)
                # One breaker changes (a success): what a transition costs the loop.
                actor = group[0]
                actor.post_success(actor.machine.generation, 1)
                actor.settle()
                started = time.perf_counter()
                assert state_file.write()
                ones.append(time.perf_counter() - started)
                data = path.read_bytes()
                started = time.perf_counter()
                state_file._write_atomically(data)
                syncs.append(time.perf_counter() - started)
            print(
                f"{count:>9} {len(data):>10} {median_ms(firsts)} {median_ms(idles)} "
                f"{median_ms(ones)} {median_ms(syncs)}"
            )


if __name__ == "__main__":
    main()
