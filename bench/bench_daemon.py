"""Daemon mode: breakerd shared through ``breakerd serve`` against local peers and raw sockets.

Scenarios (see bench/README.md; the letters are stable names, ``a`` is
``bench_embedded.py``):

  b. daemon-backed ``call_sync`` and ``call`` (closed, success path) against
     pybreaker, circuitbreaker, purgatory and aiobreaker's local breakers, as
     overhead per call over the bare call, side by side in this process;
  c. outcomes per second through one daemon from 1, 2, 4 and 8 client
     processes, each calling ``call_sync`` in a tight loop; the count is what
     the daemon recorded;
  d. a ``strict=True`` acquire round trip against a raw Unix-socket ping-pong
     (blocking sockets, the same message sizes) and the raw protocol;
  e. trip propagation: from the failure report that opens a breaker to the
     instant every one of N client processes rejects a call locally (and, for
     reference, to their ``on_transition`` callbacks, woken by the push);
  f. scale: one daemon with 10,000 breakers and 500 connected clients, its
     RSS and its throughput at that scale;
  g. memory across 1,000,000 rejected calls, embedded and daemon-backed.

Method: every process this starts (daemons, client workers, the echo
server) is a child that dies with it: workers exit when their stdin closes,
and daemons are started through a shim that sets PR_SET_PDEATHSIG. Timed
scenarios interleave their contenders and repeat; tables give the median
with min and max. The machine is shared: compare ratios from one run.

Run: ``python bench/bench_daemon.py [--quick] [--json PATH] [--only b,c,...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_embedded as emb  # noqa: E402
from daemon_helpers import RawClient, short_tmpdir  # noqa: E402
from daemon_workers import (  # noqa: E402
    cpu_seconds_of,
    host_cpu_jiffies,
    io_thread_cpu,
    is_remote,
    open_registered,
    raise_nofile_limit,
    rss_of,
)

from breakerd.actor import ActorSystem, BreakerConfig  # noqa: E402
from breakerd.clients import CircuitBreaker  # noqa: E402
from breakerd.protocol import (  # noqa: E402
    Acquire,
    Admin,
    BreakerError,
    CircuitState,
    Connection,
    Hello,
    Outcome,
    Report,
    Snapshot,
    Welcome,
)

WORKERS_PY = HERE / "daemon_workers.py"
MiB = 1024 * 1024

#: The breakers of b, c, d, f: the embedded benchmark's settings.
BREAKER_KWARGS: dict[str, Any] = {
    "failure_threshold": emb.FAILURE_THRESHOLD,
    "timeout": emb.RESET_TIMEOUT,
    "min_calls": emb.MIN_CALLS,
}
#: The breaker of e: one failure opens it, and it stays open until reset.
TRIP_KWARGS: dict[str, Any] = {"failure_threshold": 0.5, "timeout": 3600.0, "min_calls": 1}
#: Children with traffic fill the window with successes: judge the last outcome alone.
TRIP_CALLS_KWARGS: dict[str, Any] = {**TRIP_KWARGS, "window_size": 1}
#: Seconds a `calls` child sleeps between calls: 2,000 calls/s per process, a
#: busy worker; 16 of them leave the 2 vCPUs to the daemon and the tripper.
TRIP_CALL_PAUSE = 0.0005


def wire_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``register`` settings a ``CircuitBreaker(**kwargs)`` sends (so none conflict)."""
    return BreakerConfig(**kwargs).as_dict()


# -- parameters --------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonParams:
    quick: bool
    #: b: the embedded benchmark's repetitions, slices and call counts.
    calls: emb.Params
    #: c: client process counts, repetitions (one run of every count each) and seconds per run.
    process_counts: tuple[int, ...]
    tput_reps: int
    tput_seconds: float
    #: d: round trips per contender per repetition.
    rt: emb.Params
    #: e: trips per group per repetition (groups interleave), and repetitions.
    trip_reps: int
    trips_per_rep: int
    trip_sizes: tuple[int, ...]
    #: f: breakers, idle clients (spread over holder processes), throughput runs.
    scale_breakers: int
    scale_clients: int
    scale_holders: int
    scale_reps: int
    #: g: rejected calls measured, after a warm-up.
    rejections: int
    reject_warmup: int

    @staticmethod
    def for_mode(quick: bool) -> DaemonParams:
        if quick:
            return DaemonParams(
                quick=True,
                calls=emb.Params.for_mode(True),
                process_counts=(1, 2, 4, 8),
                tput_reps=2,
                tput_seconds=0.6,
                rt=emb.Params(
                    reps=5,
                    slices=2,
                    calls=600,
                    rejections=0,
                    warmup=100,
                    mem_rejections=0,
                    mem_warmup=0,
                ),
                trip_reps=2,
                trips_per_rep=15,
                trip_sizes=(4, 16),
                scale_breakers=10_000,
                scale_clients=500,
                scale_holders=5,
                scale_reps=2,
                rejections=200_000,
                reject_warmup=10_000,
            )
        return DaemonParams(
            quick=False,
            calls=emb.Params.for_mode(False),
            process_counts=(1, 2, 4, 8),
            tput_reps=5,
            tput_seconds=1.5,
            rt=emb.Params(
                reps=7,
                slices=2,
                calls=2_000,
                rejections=0,
                warmup=200,
                mem_rejections=0,
                mem_warmup=0,
            ),
            trip_reps=5,
            trips_per_rep=40,
            trip_sizes=(4, 16),
            scale_breakers=10_000,
            scale_clients=500,
            scale_holders=5,
            scale_reps=3,
            rejections=1_000_000,
            reject_warmup=20_000,
        )


# -- processes: the daemon and the workers -----------------------------------------------

# Runs first in every child: dies with the benchmark (SIGTERM when the thread
# that started it exits), then becomes the real program (same pid).
_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a child that is sent SIGTERM if this process dies."""
    return subprocess.Popen(
        [sys.executable, "-c", _SHIM, str(os.getpid()), *argv],
        **popen,
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class ManagedDaemon:
    """``python -m breakerd.actor.daemon`` on a short socket path, with a config file."""

    def __init__(
        self, directory: Path, tag: str, *, max_connections: int = 1024, settings: str = ""
    ) -> None:
        self.tag = tag
        self.socket_path = directory / f"{tag}.sock"
        self.config_path = directory / f"{tag}.toml"
        self.log_path = directory / f"{tag}.log"
        self.config_path.write_text(f"[daemon]\nmax_connections = {max_connections}\n{settings}")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.socket_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> ManagedDaemon:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = spawn(
            [
                sys.executable,
                "-m",
                "breakerd.actor.daemon",
                "--socket",
                self.socket,
                "--config",
                str(self.config_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():  # the readiness contract
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.tag} exited early:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon {self.tag}: no socket after {timeout:g}s")
            time.sleep(0.005)
        return self

    def rss(self) -> tuple[int, int]:
        return rss_of(self.pid)

    def cpu(self) -> float:
        return cpu_seconds_of(self.pid)

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ManagedDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Worker:
    """One ``daemon_workers.py`` process and its JSON-lines streams."""

    def __init__(
        self,
        kind: str,
        args: dict[str, Any],
        log_dir: Path,
        tag: str,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.tag = tag
        self.log_path = log_dir / f"{tag}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self._buffer = b""
        try:
            self.proc = spawn(
                [sys.executable, str(WORKERS_PY), kind, json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                bufsize=0,
                pass_fds=tuple(pass_fds),
            )
        except BaseException:
            self._log.close()
            raise

    def send(self, **command: Any) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write((json.dumps(command) + "\n").encode())

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"worker {self.tag}: no answer in {timeout:g}s\n{self.tail()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(5)
                raise RuntimeError(
                    f"worker {self.tag} exited ({self.proc.returncode})\n{self.tail()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def tail(self) -> str:
        return _tail(self.log_path)

    def close(self, timeout: float = 3.0) -> None:
        """Close its stdin (it exits), then make sure it is gone (SIGTERM, SIGKILL)."""
        proc = self.proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # a spinning worker does not read its stdin
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        self._log.close()


@contextlib.contextmanager
def workers(
    kind: str,
    args_list: Sequence[dict[str, Any]],
    log_dir: Path,
    tag: str,
    pass_fds: Sequence[int] = (),
) -> Iterator[list[Worker]]:
    """Start one worker per args, wait for each one's ``ready``; always clean them up."""
    started: list[Worker] = []
    try:
        for i, args in enumerate(args_list):
            started.append(Worker(kind, args, log_dir, f"{tag}-{i}", pass_fds))
        for worker in started:
            ready = worker.read(timeout=60.0)
            if not ready.get("ready"):
                raise RuntimeError(f"worker {worker.tag}: unexpected {ready}")
            if ready.get("remote") is False:
                raise RuntimeError(f"worker {worker.tag} is not on the daemon (fallback mode)")
        yield started
    finally:
        for worker in started:
            worker.close()


def _rotation(items: Sequence[Any], rep: int) -> list[Any]:
    shift = rep % len(items)
    return list(items[shift:]) + list(items[:shift])


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (as numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def stats_dict(values: Sequence[float]) -> dict[str, float]:
    return vars(emb.Stats.of(values))


# -- goals -------------------------------------------------------------------------------


@dataclass
class Goal:
    key: str
    text: str
    figure: str
    target: str
    met: bool | None
    value: float | None = None

    def verdict(self) -> str:
        return {True: "MET", False: "NOT MET", None: "n/a"}[self.met]


# -- b: daemon-backed call_sync / call against local peers -------------------------------


@dataclass
class CallsResult:
    sync: emb.ScenarioResult
    async_: emb.ScenarioResult
    ratios: dict[str, Any]
    daemon_cpu_us_per_call: dict[str, float]


def _daemon_contenders(
    base: Sequence[emb.Contender], reference: emb.Contender, label: str
) -> list[Any]:
    out: list[Any] = []
    for c in base:
        if c.key == "breakerd":
            out.append(dataclasses.replace(c, key="daemon", label=label))
            out.append(
                dataclasses.replace(
                    reference,
                    key="embedded",
                    label="ref: breakerd embedded (same call)",
                    role="reference",
                )
            )
        else:
            out.append(c)
    return out


def scenario_b(daemon: ManagedDaemon, p: DaemonParams) -> CallsResult:
    system = ActorSystem().start()
    try:
        actor_cpu = emb.actor_cpu_clock(system)
        remote_sync = CircuitBreaker("bench-b-sync", daemon=daemon.socket, **BREAKER_KWARGS)
        remote_async = CircuitBreaker("bench-b-async", daemon=daemon.socket, **BREAKER_KWARGS)
        for b in (remote_sync, remote_async):
            if not is_remote(b):
                raise RuntimeError(f"{b.name}: not on the daemon")
        io_cpu_s = io_thread_cpu(remote_sync)

        def io_cpu() -> int:
            return int(io_cpu_s() * 1e9)

        sync = _daemon_contenders(
            emb.sync_success_contenders(remote_sync, io_cpu),
            next(
                c
                for c in emb.sync_success_contenders(
                    emb.make_breakerd(system, "bench-b-embedded-sync"), actor_cpu
                )
                if c.key == "breakerd"
            ),
            "breakerd daemon: breaker.call_sync(work)",
        )
        cpu0 = daemon.cpu()
        sync_result = emb.run_sync_scenario(
            "b_daemon_sync",
            "b. daemon-backed call_sync, closed: overhead per call over `work()`, us",
            emb.SUCCESS_NOTE,
            sync,
            p.calls.calls,
            p.calls,
        )
        cpu1 = daemon.cpu()
        calls_made = p.calls.warmup + p.calls.reps * sync_result.calls
        asynchronous = _daemon_contenders(
            emb.async_success_contenders(remote_async, io_cpu),
            next(
                c
                for c in emb.async_success_contenders(
                    emb.make_breakerd(system, "bench-b-embedded-async"), actor_cpu
                )
                if c.key == "breakerd"
            ),
            "breakerd daemon: await breaker.call(work)",
        )

        async def run_async() -> emb.ScenarioResult:
            return await emb.run_async_scenario(
                "b_daemon_async",
                "b. daemon-backed call, closed: overhead per call over `await work()`, us",
                emb.SUCCESS_NOTE,
                asynchronous,
                p.calls.calls,
                p.calls,
            )

        async_result = asyncio.run(run_async())
        cpu2 = daemon.cpu()
    finally:
        system.stop()
    return CallsResult(
        sync_result,
        async_result,
        {},
        {
            "sync": (cpu1 - cpu0) * 1e6 / calls_made,
            "async": (cpu2 - cpu1) * 1e6 / calls_made,
        },
    )


def print_b(r: CallsResult) -> list[Goal]:
    cpu_of = {"daemon": "its client's IO thread", "embedded": "its actor thread"}
    r.ratios["sync"] = emb.print_scenario(
        r.sync, also_vs=("pybreaker",), goals={"pybreaker": 1.0}, cpu_of=cpu_of
    )
    print(
        f"   (the daemon process's own CPU time per daemon-backed call: "
        f"{r.daemon_cpu_us_per_call['sync']:.4f} us, on another core when one is free)"
    )
    r.ratios["async"] = emb.print_scenario(r.async_, cpu_of=cpu_of)
    print(
        f"   (the daemon process's own CPU time per daemon-backed call: "
        f"{r.daemon_cpu_us_per_call['async']:.4f} us)"
    )
    ratio = r.ratios["sync"]["pybreaker"]["ratio_of_medians"]
    over = r.sync.overhead_stats("daemon").median
    peer = r.sync.overhead_stats("pybreaker").median
    goals = [
        Goal(
            "b_daemon_call_sync",
            "Daemon-backed `call_sync` (closed) overhead vs pybreaker's local `call`",
            f"{ratio:.2f}x ({over:.3f} us vs {peer:.3f} us)",
            "<= 1.0x",
            ratio <= 1.0,
            ratio,
        )
    ]
    for label, result in (("call_sync", r.sync), ("call", r.async_)):
        # The same call through the daemon and embedded, in the same run.
        daemon_over = result.overhead_stats("daemon").median
        embedded_over = result.overhead_stats("embedded").median
        vs_embedded = daemon_over / embedded_over
        goals.append(
            Goal(
                f"b_daemon_vs_embedded_{label}",
                f"Daemon-backed `{label}` (closed) overhead vs the same call embedded",
                f"{vs_embedded:.2f}x ({daemon_over:.3f} us vs {embedded_over:.3f} us)",
                "<= 1.3x",
                vs_embedded <= 1.3,
                vs_embedded,
            )
        )
    io_ns = r.sync.actor_cpu_ns.get("daemon")
    if io_ns:
        io_us = statistics.median(io_ns) / 1000.0
        goals.append(
            Goal(
                "b_io_thread_cpu",
                "Client IO-thread CPU per daemon-backed success (`call_sync`)",
                f"{io_us:.4f} us",
                "<= 0.05 us",
                io_us <= 0.05,
                io_us,
            )
        )
    return goals


# -- c: outcomes per second from N client processes ---------------------------------------


@dataclass
class ThroughputRow:
    processes: int
    #: Outcomes the daemon recorded / the run's window, per repetition.
    rates: list[float] = field(default_factory=list)
    #: Calls the workers made / window (equal to ``rates`` unless outcomes were lost).
    call_rates: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    #: CPU used over the window, in CPUs (1.0 = one core busy all the time).
    daemon_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    io_cpu: list[float] = field(default_factory=list)
    #: Seconds from the last worker's loop end to its barrier's reply (flush lag).
    drain: list[float] = field(default_factory=list)
    #: Share of the whole host's CPU time that was busy (any process) during the run.
    host_busy: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "rate": stats_dict(self.rates)}


def _successes(client: RawClient, name: str) -> int:
    successes: int = client.status(name).breakers[0].successes
    return successes


def run_throughput(
    daemon: ManagedDaemon,
    name: str,
    counts: Sequence[int],
    reps: int,
    seconds: float,
    log_dir: Path,
    tag: str,
) -> list[ThroughputRow]:
    args = {"socket": daemon.socket, "name": name, "config": BREAKER_KWARGS}
    rows = {k: ThroughputRow(k) for k in counts}
    client = RawClient(daemon.socket_path)
    try:
        with workers("calls", [args] * max(counts), log_dir, tag) as pool:
            for rep in range(reps):
                for k in _rotation(list(counts), rep):
                    active = pool[:k]
                    before = _successes(client, name)
                    cpu0, host0 = daemon.cpu(), host_cpu_jiffies()
                    for w in active:
                        w.send(op="run", seconds=seconds)
                    results = [w.read(timeout=seconds + 60.0) for w in active]
                    cpu1, host1 = daemon.cpu(), host_cpu_jiffies()
                    recorded = _successes(client, name) - before
                    for result in results:
                        if result.get("remote") is False:
                            raise RuntimeError("a worker fell back to its local breaker")
                    window = max(r["t_end"] for r in results) - min(r["t0"] for r in results)
                    calls = sum(r["calls"] for r in results)
                    row = rows[k]
                    row.rates.append(recorded / window)
                    row.call_rates.append(calls / window)
                    row.lost.append(calls - recorded)
                    row.daemon_cpu.append((cpu1 - cpu0) / window)
                    row.client_cpu.append(sum(r["cpu"] for r in results) / window)
                    row.io_cpu.append(sum(r["io_cpu"] for r in results) / window)
                    row.drain.append(max(r["t_end"] - r["t_loop"] for r in results))
                    row.host_busy.append((host1[0] - host0[0]) / max(1, host1[1] - host0[1]))
    finally:
        client.close()
    return [rows[k] for k in counts]


def print_throughput(rows: Sequence[ThroughputRow], title: str, seconds: float, reps: int) -> None:
    print()
    print(f"== {title} ==")
    print(
        f"   {reps} reps x {seconds:g} s per run; process counts interleaved (order rotates); "
        "every worker: CircuitBreaker(daemon=...).call_sync(work) in a tight loop"
    )
    print(
        "   outcomes/s = successes the daemon recorded (StatusRequest delta) / window "
        "(first worker start .. last worker's flush barrier answered)"
    )
    header = (
        f"   {'processes':>9}{'outcomes/s':>13}{'min':>11}{'max':>11}{'per proc':>11}"
        f"{'vs 1':>7}{'daemon CPU':>12}{'client CPU':>12}{'lost':>7}"
    )
    print(header)
    print("   " + "-" * (len(header) - 3))
    base = statistics.median(rows[0].rates) if rows and rows[0].processes == 1 else None
    for row in rows:
        s = emb.Stats.of(row.rates)
        scale = f"{s.median / base:>6.2f}x" if base else f"{'':>7}"
        print(
            f"   {row.processes:>9}{s.median:>13,.0f}{s.min:>11,.0f}{s.max:>11,.0f}"
            f"{s.median / row.processes:>11,.0f}{scale}"
            f"{statistics.median(row.daemon_cpu):>11.0%} {statistics.median(row.client_cpu):>11.0%}"
            f"{sum(row.lost):>7}"
        )
    io = ", ".join(
        f"{row.processes}p {statistics.median(row.io_cpu):.0%}" for row in rows if row.io_cpu
    )
    drain = ", ".join(f"{row.processes}p {statistics.median(row.drain) * 1000:.1f}" for row in rows)
    print(
        f"   CPU columns: share of one core over the window (this machine has "
        f"{os.cpu_count()}); of the client CPU, the IO threads: {io}"
    )
    busy = ", ".join(f"{row.processes}p {statistics.median(row.host_busy):.0%}" for row in rows)
    print(f"   flush barrier after the loop (ms, slowest worker): {drain}")
    print(f"   whole host busy (all CPUs, any process, /proc/stat): {busy}")
    print("   lost = calls made - outcomes recorded, summed over reps (should be 0)")


def goal_c(rows: Sequence[ThroughputRow]) -> Goal:
    row = next((r for r in rows if r.processes == 4), None)
    if row is None:
        return Goal("c_throughput_4", "Outcomes/s through one daemon, 4 processes", "-", "", None)
    rate = statistics.median(row.rates)
    return Goal(
        "c_throughput_4",
        "Outcomes/s through one daemon from 4 client processes",
        f"{rate:,.0f}/s (min {min(row.rates):,.0f}, max {max(row.rates):,.0f})",
        ">= 500,000/s",
        rate >= 500_000,
        rate,
    )


# -- d: strict acquire round trip vs raw ping-pong ----------------------------------------


def _wire_sizes(name: str, admission: Any) -> tuple[bytes, bytes]:
    """The bytes of an ``acquire`` request and of its ``Admission`` reply, as sent."""
    client, server = Connection("client"), Connection("server")
    server.receive_data(client.send_request(1, Hello(1, 1, "bench", os.getpid())))
    server.next_event()
    client.receive_data(server.send_response(1, Welcome(1, "bench", os.getpid())))
    client.next_event()
    request = client.send_request(1000, Acquire(name))
    server.receive_data(request)
    server.next_event()
    return request, server.send_response(1000, admission)


def pin_process(pid: int, cpus: set[int]) -> set[int]:
    """Pin every thread of ``pid`` to ``cpus``; returns the main thread's old set."""
    before = os.sched_getaffinity(pid)
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)
    return before


def scenario_d(
    daemon: ManagedDaemon, p: DaemonParams, log_dir: Path
) -> tuple[emb.ScenarioResult, emb.ScenarioResult]:
    name = "bench-strict"
    strict = CircuitBreaker(name, daemon=daemon.socket, strict=True, **BREAKER_KWARGS)
    if not is_remote(strict):
        raise RuntimeError("the strict breaker is not on the daemon")
    raw = RawClient(daemon.socket_path)
    ping: Any = None
    # The thread hop of the client's reply path, alone: a byte over a socket
    # pair wakes a thread blocked in poll(), which releases a lock the caller
    # waits on (no daemon, no protocol).
    hop_caller, hop_thread_end = socket.socketpair()
    hop_done = threading.Lock()
    hop_done.acquire()

    def hop_server() -> None:
        poller = select.poll()
        poller.register(hop_thread_end.fileno(), select.POLLIN)
        while True:
            poller.poll()
            if not hop_thread_end.recv(4096):
                return
            hop_done.release()

    hopper = threading.Thread(target=hop_server, name="bench-thread-hop", daemon=True)
    hopper.start()
    try:
        raw.register(name, **wire_config(BREAKER_KWARGS))
        request, reply = _wire_sizes(name, raw.acquire(name))
        echo_path = log_dir / "echo.sock"
        echo_args = {"path": str(echo_path), "request_size": len(request), "reply": reply.hex()}
        with workers("echo", [echo_args], log_dir, "echo") as echo_workers:
            ping = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ping.connect(str(echo_path))

            def make_empty() -> emb.SyncLoop:
                def loop(n: int) -> None:
                    for _ in range(n):
                        pass

                return loop

            def make_pingpong() -> emb.SyncLoop:
                sendall, recv, size = ping.sendall, ping.recv, len(reply)

                def loop(n: int) -> None:
                    for _ in range(n):
                        sendall(request)
                        got = 0
                        while got < size:
                            got += len(recv(65536))

                return loop

            def make_raw() -> emb.SyncLoop:
                acquire = raw.acquire

                def loop(n: int) -> None:
                    for _ in range(n):
                        acquire(name)

                return loop

            def make_hop() -> emb.SyncLoop:
                send, acquire = hop_caller.send, hop_done.acquire

                def loop(n: int) -> None:
                    for _ in range(n):
                        send(b"x")
                        acquire()

                return loop

            def make_strict() -> emb.SyncLoop:
                call_sync, work = strict.call_sync, emb.work_sync

                def loop(n: int) -> None:
                    for _ in range(n):
                        call_sync(work)

                return loop

            contenders = [
                emb.SyncContender(
                    key="empty", label="empty loop", role="baseline", make=make_empty
                ),
                emb.SyncContender(
                    key="pingpong",
                    label=f"raw ping-pong ({len(request)} B / {len(reply)} B)",
                    role="peer",
                    make=make_pingpong,
                ),
                emb.SyncContender(
                    key="raw",
                    label="ref: RawClient.acquire (protocol, no thread)",
                    role="reference",
                    make=make_raw,
                ),
                emb.SyncContender(
                    key="hop",
                    label="ref: thread hop (socket -> poll thread -> lock)",
                    role="reference",
                    make=make_hop,
                ),
                emb.SyncContender(
                    key="strict",
                    label="breakerd strict=True call_sync(work)",
                    role="ours",
                    make=make_strict,
                    drain=emb.settle(strict),
                ),
            ]
            result = emb.run_sync_scenario(
                "d_strict_round_trip",
                "d. strict=True acquire vs raw Unix-socket ping-pong: us per round trip",
                "us per call - an empty loop iteration; blocking sockets, one request in flight",
                contenders,
                p.rt.calls,
                p.rt,
            )
            # The same, every process on one CPU: each wake-up is then a
            # context switch, not a cross-CPU wake of an idle vCPU, so the
            # ratio shows the work on each side rather than where the
            # scheduler happened to put the pair.
            echo_pids = [w.proc.pid for w in echo_workers]
            everyone = [os.getpid(), daemon.pid, *echo_pids]
            saved = {pid: pin_process(pid, {0}) for pid in everyone}
            try:
                pinned = emb.run_sync_scenario(
                    "d_strict_round_trip_one_cpu",
                    "d'. the same, the benchmark, the daemon and the echo server all on CPU 0",
                    "us per call - an empty loop iteration; every thread pinned to CPU 0",
                    contenders,
                    p.rt.calls,
                    p.rt,
                )
            finally:
                for pid, cpus in saved.items():
                    pin_process(pid, cpus)
    finally:
        raw.close()
        if ping is not None:
            ping.close()
        hop_caller.close()  # the hop thread reads EOF and returns
        hopper.join(5.0)
        hop_thread_end.close()
    return result, pinned


def print_d(
    result: emb.ScenarioResult, pinned: emb.ScenarioResult
) -> tuple[dict[str, Any], dict[str, Any], Goal]:
    ratios = emb.print_scenario(result, also_vs=("raw",), goals={"pingpong": 1.3})
    pinned_ratios = emb.print_scenario(pinned, also_vs=("raw",), goals={"pingpong": 1.3})
    ratio = ratios["pingpong"]["ratio_of_medians"]
    one_cpu = pinned_ratios["pingpong"]["ratio_of_medians"]
    ours = result.overhead_stats("strict").median
    ping = result.overhead_stats("pingpong").median
    return (
        ratios,
        pinned_ratios,
        Goal(
            "d_strict_round_trip",
            "`strict=True` acquire round trip vs raw Unix-socket ping-pong",
            f"{ratio:.2f}x ({ours:.1f} us vs {ping:.1f} us); all on one CPU {one_cpu:.2f}x "
            f"({pinned.overhead_stats('strict').median:.1f} us vs "
            f"{pinned.overhead_stats('pingpong').median:.1f} us)",
            "<= 1.3x",
            ratio <= 1.3,
            ratio,
        ),
    )


# -- e: trip propagation -------------------------------------------------------------------


@dataclass
class TripGroup:
    key: str
    #: "calls" (processes calling until rejected), "callback", "spin", or "raw"
    #: (the fan-out reference, no breakerd).
    mode: str
    size: int
    label: str
    #: Seconds from the trip to each child's instant, every (trip, child).
    every: list[float] = field(default_factory=list)
    #: Seconds from the trip to the last child's instant, one per trip.
    slowest: list[float] = field(default_factory=list)
    #: Seconds from the trip to the failure report's ack at the tripping client.
    acks: list[float] = field(default_factory=list)
    per_rep_p99: list[float] = field(default_factory=list)
    #: calls: calls admitted that started after the tripper had its ack (must be 0).
    late_admissions: int = 0
    #: calls: seconds from the trip until the first call anywhere was rejected,
    #: one per trip: from then on, the breaker is open for every process.
    host_wide: list[float] = field(default_factory=list)
    #: calls: admitted calls that started after another process's call had
    #: already been rejected (the table read later said closed: must be 0).
    inversions: int = 0
    #: calls: calls the children made while armed, all trips.
    calls: int = 0
    #: raw: this end of each child's socket pair.
    socks: list[socket.socket] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"bench-trip-{self.key}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: v for k, v in vars(self).items() if k not in ("every", "slowest", "acks", "socks")
        }
        for key in ("every", "slowest", "acks"):
            values: list[float] = getattr(self, key)
            if not values:
                continue
            out[key + "_ms"] = {
                "p50": percentile(values, 50) * 1000,
                "p99": percentile(values, 99) * 1000,
                "max": max(values) * 1000,
                "n": len(values),
            }
        out["slowest_ms_samples"] = [v * 1000 for v in self.slowest]
        return out


#: Seconds the benchmark sleeps after the trip's ack before it reads the children's reports.
SETTLE_AFTER_TRIP = 0.005


def _fanout_once(group: TripGroup, children: Sequence[Worker]) -> list[float]:
    """The floor: one byte to each of N processes blocked in ``recv``, no breakerd."""
    time.sleep(0.002)
    t0 = time.monotonic()
    for sock in group.socks:
        sock.send(b"!")
    time.sleep(SETTLE_AFTER_TRIP)
    return [child.read(timeout=30.0)["t"] - t0 for child in children]


def _trip_once(
    client: RawClient,
    group: TripGroup,
    children: Sequence[Worker],
    generation: int,
    observer: Worker | None = None,
) -> tuple[int, list[float], float]:
    time.sleep(0.002)  # every child back in its poll (or, spinning, re-armed below)
    armed = list(children) if group.mode in ("spin", "calls") else []
    if observer is not None:
        armed.append(observer)
    if armed:
        for child in armed:
            child.send(op="arm")
        for child in armed:
            child.read()
        time.sleep(0.002)  # it is spinning (calling) now
    t0 = time.monotonic()
    snapshot: Snapshot = client.request(Report(group.name, generation, Outcome.FAILURE))
    ack = time.monotonic() - t0
    if snapshot.state is not CircuitState.OPEN:
        raise RuntimeError(f"{group.name}: one failure left it {snapshot.state.value}")
    # Stay off the CPUs while the children react: reading their lines now would
    # compete with the ones still waiting for a core (2 vCPUs, up to 16 children).
    time.sleep(SETTLE_AFTER_TRIP)
    seen = []
    admitted_last = []
    for child in children:
        message = child.read(timeout=30.0)
        if message.get("state") != "open":
            raise RuntimeError(f"{child.tag}: expected open, got {message}")
        seen.append(message["t"] - t0)
        if group.mode == "calls":
            group.calls += message["calls"]
            admitted_last.append(message["last_admitted"] - t0)
            if message["last_admitted"] > t0 + ack:
                group.late_admissions += 1
    if group.mode == "calls":
        first_rejection = min(seen)
        group.host_wide.append(first_rejection)
        group.inversions += sum(1 for start in admitted_last if start > first_rejection)
    if observer is not None:
        message = observer.read(timeout=30.0)
        if message.get("state") != "open":
            raise RuntimeError(f"{observer.tag}: expected open, got {message}")
        group.host_wide.append(message["t"] - t0)
    snapshot = client.request(Admin(group.name, "reset"))
    if group.mode == "calls":
        for child in children:
            child.send(op="check")
    for child in [*children, observer] if observer is not None else children:
        message = child.read(timeout=30.0)
        if message.get("state") != "closed":
            raise RuntimeError(f"{child.tag}: expected closed, got {message}")
    return snapshot.generation, seen, ack


def scenario_e(daemon: ManagedDaemon, p: DaemonParams, log_dir: Path) -> list[TripGroup]:
    groups = [
        TripGroup(f"calls{n}", "calls", n, f"{n} processes calling every 0.5 ms (under load)")
        for n in p.trip_sizes
    ]
    groups += [
        TripGroup(f"cb{n}", "callback", n, f"{n} idle processes and a spinning observer")
        for n in p.trip_sizes
    ]
    groups.append(TripGroup("spin1", "spin", 1, "1 process spinning on breaker.state"))
    groups += [
        TripGroup(f"raw{n}", "raw", n, f"ref: raw fan-out, 1 byte to {n} processes in recv()")
        for n in p.trip_sizes
    ]
    client = RawClient(daemon.socket_path)
    try:
        with contextlib.ExitStack() as stack:
            children: dict[str, list[Worker]] = {}
            observers: dict[str, Worker] = {}
            for g in groups:
                if g.mode == "raw":
                    ends = []
                    for _ in range(g.size):
                        ours, theirs = socket.socketpair()
                        g.socks.append(stack.enter_context(ours))
                        ends.append(stack.enter_context(theirs))
                    children[g.key] = stack.enter_context(
                        workers(
                            "fanout",
                            [{"fd": end.fileno()} for end in ends],
                            log_dir,
                            f"fanout-{g.key}",
                            pass_fds=[end.fileno() for end in ends],
                        )
                    )
                    for end in ends:
                        end.close()  # the children hold their own copies
                    continue
                args = {
                    "socket": daemon.socket,
                    "name": g.name,
                    "config": TRIP_CALLS_KWARGS if g.mode == "calls" else TRIP_KWARGS,
                    "mode": g.mode,
                    "pause": TRIP_CALL_PAUSE,
                }
                children[g.key] = stack.enter_context(
                    workers("trip", [args] * g.size, log_dir, f"trip-{g.key}")
                )
                if g.mode == "callback":
                    # One more process on the same breaker, spinning on its
                    # state: the instant the table says open, for everyone.
                    (observers[g.key],) = stack.enter_context(
                        workers("trip", [{**args, "mode": "spin"}], log_dir, f"watch-{g.key}")
                    )
            generations = {
                g.key: client.request(Admin(g.name, "reset")).generation
                for g in groups
                if g.mode != "raw"
            }
            for rep in range(p.trip_reps):
                for g in _rotation(groups, rep):
                    slowest = []
                    for _ in range(p.trips_per_rep):
                        if g.mode == "raw":
                            seen = _fanout_once(g, children[g.key])
                        else:
                            generation, seen, ack = _trip_once(
                                client,
                                g,
                                children[g.key],
                                generations[g.key],
                                observers.get(g.key),
                            )
                            generations[g.key] = generation
                            g.acks.append(ack)
                        g.every.extend(seen)
                        g.slowest.append(max(seen))
                        slowest.append(max(seen))
                    g.per_rep_p99.append(percentile(slowest, 99))
    finally:
        client.close()
    return groups


def print_e(groups: Sequence[TripGroup], p: DaemonParams) -> list[Goal]:
    print()
    print("== e. trip propagation: failure report -> every client process rejects locally ==")
    print(
        f"   {p.trip_reps} reps x {p.trips_per_rep} trips per group, groups interleaved; "
        "one failure opens the breaker (min_calls=1), Admin reset between trips"
    )
    print(
        "   t0 = time.monotonic() just before the tripping client sends its failure report; "
        "each child records time.monotonic() when it first sees `open` (CLOCK_MONOTONIC is "
        "host-wide)"
    )
    print(
        "   the goal's figure: N idle connected processes and one more spinning on "
        "breaker.state, which reads the shared state table like every call does: the "
        "instant it sees `open` is the instant every process's next call is rejected"
    )
    header = f"   {'group':<52}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p99/rep min..max':>20}"
    print(header)
    print("   " + "-" * (len(header) - 3))
    for g in groups:
        spread = f"{min(g.per_rep_p99) * 1000:.3f}..{max(g.per_rep_p99) * 1000:.3f}"
        if g.mode == "calls":
            first = "open host-wide: first local rejection anywhere"
            slowest = "all clients: slowest child's first rejection"
        elif g.mode == "callback":
            first = "open in the table: the spinning observer sees it"
            slowest = "all clients' on_transition callbacks (the push)"
        else:
            first, slowest = "", "all clients (slowest child per trip)"
        rows = [
            (first, g.host_wide, ""),
            (slowest, g.slowest, spread),
            ("each client (every child, every trip)", g.every, ""),
            ("ref: the failure report's ack at the tripper", g.acks, ""),
        ]
        print(f"   {g.label}")
        for label, values, extra in rows:
            if not values:
                continue
            print(
                f"     {label:<50}{percentile(values, 50) * 1000:>9.3f}"
                f"{percentile(values, 99) * 1000:>9.3f}{max(values) * 1000:>9.3f}{extra:>20}"
            )
        if g.mode == "calls":
            print(
                f"     calls made while armed: {g.calls:,}; admitted after the tripper's ack: "
                f"{g.late_admissions}; admitted after a rejection elsewhere: {g.inversions} "
                "(both must be 0)"
            )
    print(
        f"   calls: each child calls call_sync every {TRIP_CALL_PAUSE * 1000:g} ms and stamps "
        "the end of its first rejected call; the rejection comes from the shared state table, "
        "no wake-up or push involved. `open host-wide`: the first rejected call in any process; "
        "every process reads the same table, and no call starting later was admitted anywhere "
        "(checked). `all clients` adds each process's wait for its own next call"
    )
    print(
        "   idle + observer: children idle, blocked in their IO thread's poll(); the push wakes "
        "it and the on_transition callback records the instant (the rows below the table's)"
    )
    print(
        "   spin: the child's main thread spins on breaker.state (holding the GIL); "
        "the IO thread must get the GIL to apply the push"
    )
    print(
        "   raw fan-out: the floor on this machine for waking N processes, no breakerd "
        "(t0 before the first of N send() calls; each child stamps right after recv())"
    )
    goals = []
    loaded = {g.size: g for g in groups if g.mode == "calls"}
    for g in groups:
        if g.mode != "callback":
            continue
        p99 = percentile(g.host_wide, 99)
        busy = loaded.get(g.size)
        under_load = ""
        ok = True
        if busy is not None:
            wrong = busy.late_admissions + busy.inversions
            ok = wrong == 0
            under_load = (
                f"; with {g.size} processes calling every {TRIP_CALL_PAUSE * 1000:g} ms: "
                f"first rejection anywhere p99 {percentile(busy.host_wide, 99) * 1000:.3f} ms, "
                f"{wrong} calls admitted after it"
            )
        goals.append(
            Goal(
                f"e_propagation_{g.size}",
                f"Trip propagation to all of {g.size} client processes, p99 "
                "(open in the shared state table every call reads)",
                f"p99 {p99 * 1000:.3f} ms (p50 {percentile(g.host_wide, 50) * 1000:.3f} ms); "
                f"push to every on_transition p99 {percentile(g.slowest, 99) * 1000:.3f} ms"
                + under_load,
                "< 1 ms",
                p99 < 0.001 and ok,
                p99 * 1000,
            )
        )
    return goals


# -- f: scale -----------------------------------------------------------------------------


@dataclass
class ScaleResult:
    breakers: int
    clients: int
    register_seconds: float
    clients_seconds: float
    rss: dict[str, int]
    #: Peak RSS before the ``status`` of everything, and at the end.
    hwm: int
    hwm_final: int
    clients_seen: int
    status_all: str
    throughput: list[ThroughputRow]

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "throughput"}
        out["throughput"] = [row.to_json() for row in self.throughput]
        return out


def _status_all(daemon: ManagedDaemon) -> str:
    """``status`` of every breaker in one request (what ``breakerd status`` sends)."""
    client = RawClient(daemon.socket_path, timeout=60.0)
    t0 = time.perf_counter()
    try:
        everything = client.status(None)
        return f"ok: {len(everything.breakers):,} breakers in {time.perf_counter() - t0:.2f} s"
    except (AssertionError, OSError, BreakerError) as exc:
        outcome = f"FAILED after {time.perf_counter() - t0:.2f} s ({exc!r})"
    finally:
        client.close()
    time.sleep(0.1)  # the daemon's log line
    for line in reversed(daemon.log_path.read_text(errors="replace").splitlines()):
        if '"reply_failed"' in line:
            outcome += f"; daemon log: reply_failed: {json.loads(line).get('error')}"
            break
    return outcome


def scenario_f(p: DaemonParams, tmp: Path, log_dir: Path) -> ScaleResult:
    n, clients = p.scale_breakers, p.scale_clients
    raise_nofile_limit(clients + 1024)
    config = wire_config(BREAKER_KWARGS)
    names = [f"scale-{i:05d}" for i in range(n)]
    registrars = 4
    per_client = max(1, n // clients)
    rss: dict[str, int] = {}
    # Four registrars hold every breaker: past the default per-client cap.
    limits = (
        f"max_breakers = {max(n, 10_000)}\nmax_breakers_per_client = {n}\n"
        # Each holder process keeps many connections: past the per-process cap.
        f"max_connections_per_pid = {clients + 256}\n"
    )
    with ManagedDaemon(tmp, "scale", max_connections=clients + 256, settings=limits) as daemon:
        time.sleep(0.2)
        rss["idle"] = daemon.rss()[0]
        socks = []
        try:
            t0 = time.perf_counter()
            for i in range(registrars):
                socks.append(open_registered(daemon.socket, names[i::registrars], config))
            register_seconds = time.perf_counter() - t0
            rss["breakers"] = daemon.rss()[0]
            per_holder = clients // p.scale_holders
            holder_args = []
            for h in range(p.scale_holders):
                conns = range(h * per_holder, (h + 1) * per_holder)
                holder_args.append(
                    {
                        "socket": daemon.socket,
                        "config": config,
                        "connections": per_holder,
                        "names": [
                            [names[(c * per_client + k) % n] for k in range(per_client)]
                            for c in conns
                        ],
                    }
                )
            t0 = time.perf_counter()
            with workers("hold", holder_args, log_dir, "hold"):
                clients_seconds = time.perf_counter() - t0
                time.sleep(0.2)
                rss["clients"] = daemon.rss()[0]
                status = RawClient(daemon.socket_path)
                try:
                    clients_seen = status.status(names[1]).breakers[0].clients
                    throughput = run_throughput(
                        daemon, names[0], (4,), p.scale_reps, p.tput_seconds, log_dir, "scale-calls"
                    )
                    rss["after_throughput"], hwm = daemon.rss()
                finally:
                    status.close()
                status_all = _status_all(daemon)
                hwm_final = daemon.rss()[1]
        finally:
            for sock in socks:
                sock.close()
    return ScaleResult(
        n,
        clients,
        register_seconds,
        clients_seconds,
        rss,
        hwm,
        hwm_final,
        clients_seen,
        status_all,
        throughput,
    )


def print_f(r: ScaleResult, p: DaemonParams) -> list[Goal]:
    print()
    print(f"== f. scale: {r.breakers:,} breakers and {r.clients} connected clients, one daemon ==")
    print(
        f"   breakers registered through 4 connections (pipelined) in {r.register_seconds:.2f} s;"
        f" {r.clients} idle clients ({p.scale_holders} processes, hello + register "
        f"{max(1, r.breakers // r.clients)} breakers each) connected in {r.clients_seconds:.2f} s"
    )
    idle = r.rss["idle"]
    print(f"   {'daemon VmRSS':<40}{'MiB':>9}{'delta':>14}")
    labels = {
        "idle": "started, no breakers",
        "breakers": f"+ {r.breakers:,} breakers",
        "clients": f"+ {r.clients} clients",
        "after_throughput": "after the throughput runs",
    }
    previous = idle
    for key, label in labels.items():
        value = r.rss.get(key)
        if value is None:
            continue
        delta = value - previous
        note = ""
        if key == "breakers":
            note = f" ({delta / r.breakers / 1024:.1f} KiB each)"
        elif key == "clients":
            note = f" ({delta / r.clients / 1024:.1f} KiB each)"
        print(f"   {label:<40}{value / MiB:>9.1f}{delta / MiB:>+10.1f} MiB{note}")
        previous = value
    print(f"   {'peak so far (VmHWM)':<40}{r.hwm / MiB:>9.1f}")
    print(f"   subscribers of one breaker (status .clients): {r.clients_seen}")
    print(f"   `status` of all {r.breakers:,} breakers in one request: {r.status_all}")
    print(f"   peak (VmHWM) after that request: {r.hwm_final / MiB:.1f} MiB")
    print_throughput(
        r.throughput,
        "f. throughput at that scale (4 processes, one of the 10,000 breakers)",
        p.tput_seconds,
        p.scale_reps,
    )
    peak = max(r.rss.values())
    rate = statistics.median(r.throughput[0].rates)
    return [
        Goal(
            "f_scale_rss",
            f"Daemon RSS with {r.breakers:,} breakers and {r.clients} connected clients",
            f"{peak / MiB:.1f} MiB (VmHWM {r.hwm / MiB:.1f} MiB); {rate:,.0f} outcomes/s "
            "from 4 processes at that scale",
            "< 150 MiB",
            peak < 150 * MiB,
            peak / MiB,
        )
    ]


# -- g: memory across rejections ---------------------------------------------------------


@dataclass
class RejectRow:
    mode: str
    rejections: int
    client_rss_growth: int
    traced_growth: int
    daemon_rss_growth: int | None
    counted: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return vars(self)


def scenario_g(daemon: ManagedDaemon, p: DaemonParams, log_dir: Path) -> list[RejectRow]:
    rows = []
    for mode in ("embedded", "daemon"):
        growth: dict[bool, dict[str, Any]] = {}
        daemon_growth: int | None = None
        for traced in (False, True):
            args = {
                "socket": daemon.socket if mode == "daemon" else None,
                "name": f"bench-reject-{mode}-{'traced' if traced else 'rss'}",
                "config": BREAKER_KWARGS,
                "rejections": p.rejections,
                "warmup": p.reject_warmup,
                "traced": traced,
            }
            with workers("reject", [args], log_dir, f"reject-{mode}-{traced}") as (w,):
                warm = w.read(timeout=120.0)
                if not warm.get("warm"):
                    raise RuntimeError(f"reject worker: {warm}")
                d0 = daemon.rss()[0]
                w.send(op="go")
                result = w.read(timeout=600.0)
                d1 = daemon.rss()[0]
            if result.get("remote") is False:
                raise RuntimeError("the daemon-backed reject worker fell back to local")
            growth[traced] = result
            if mode == "daemon" and not traced:
                daemon_growth = d1 - d0
        rows.append(
            RejectRow(
                mode,
                p.rejections,
                growth[False]["after"] - growth[False]["before"],
                growth[True]["after"] - growth[True]["before"],
                daemon_growth,
                growth[False]["counted"],
                growth[False]["seconds"],
            )
        )
    return rows


#: "No growth": below these over the whole run (a leak of 1 B/rejection is 1 MB per million).
TRACED_LIMIT = 1.0  # bytes per rejection, tracemalloc
RSS_LIMIT = 2 * MiB  # RSS growth, client and daemon


def print_g(rows: Sequence[RejectRow]) -> list[Goal]:
    print()
    n = rows[0].rejections if rows else 0
    print(f"== g. memory across {n:,} rejected calls (breaker forced open) ==")
    print(
        "   each row: its own client process; RSS pass and tracemalloc pass run separately; "
        "gc.collect() before each reading; daemon RSS read around the RSS pass"
    )
    header = (
        f"   {'breaker':<12}{'us/rej':>8}{'traced B/rej':>14}{'client RSS':>13}"
        f"{'daemon RSS':>13}{'daemon counted':>16}"
    )
    print(header)
    print("   " + "-" * (len(header) - 3))
    goals = []
    for r in rows:
        traced = round(r.traced_growth / r.rejections, 3) + 0.0
        daemon_rss = "-" if r.daemon_rss_growth is None else f"{r.daemon_rss_growth / MiB:+.2f} MiB"
        print(
            f"   {r.mode:<12}{r.seconds / r.rejections * 1e6:>8.3f}{traced:>14.3f}"
            f"{r.client_rss_growth / MiB:>+9.2f} MiB{daemon_rss:>13}"
            f"{r.counted:>16,}"
        )
        ok = (
            r.traced_growth / r.rejections < TRACED_LIMIT
            and r.client_rss_growth < RSS_LIMIT
            and (r.daemon_rss_growth is None or r.daemon_rss_growth < RSS_LIMIT)
        )
        figure = (
            f"traced {r.traced_growth / 1024:+.1f} KiB ({traced:.3f} B/rej), "
            f"client RSS {r.client_rss_growth / MiB:+.2f} MiB"
        )
        if r.daemon_rss_growth is not None:
            figure += f", daemon RSS {r.daemon_rss_growth / MiB:+.2f} MiB"
        if r.counted != r.rejections:
            figure += f"; counted {r.counted:,} of {r.rejections:,}"
        goals.append(
            Goal(
                f"g_memory_{r.mode}",
                f"Memory growth across {r.rejections:,} rejections, {r.mode}",
                figure,
                f"no growth (< {TRACED_LIMIT:g} B/rej traced, < {RSS_LIMIT // MiB} MiB RSS)",
                ok,
                r.traced_growth / r.rejections,
            )
        )
    print(
        "   daemon counted: rejections the breaker's status shows for the run "
        "(local rejections are sent as counts)"
    )
    return goals


# -- main ----------------------------------------------------------------------------------


def print_goals(goals: Sequence[Goal]) -> None:
    print()
    print("== goals ==")
    for g in goals:
        print(f"   {g.verdict():<8} {g.text}: {g.figure}  [goal {g.target}]")


SCENARIOS = ("b", "c", "d", "e", "f", "g")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="breakerd daemon mode vs peers and raw sockets")
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 40 s)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    parser.add_argument(
        "--only", metavar="LIST", default=",".join(SCENARIOS), help="e.g. --only c,e"
    )
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    p = DaemonParams.for_mode(args.quick)
    # SIGTERM unwinds like Ctrl-C, so every finally block stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    emb.quiet_structlog()
    started = time.monotonic()
    env = emb.environment()
    print(
        f"bench_daemon ({'quick' if args.quick else 'full'}): Python {env['python']}, "
        f"{env['cpus']} CPUs; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    )
    print(f"breakerd source: {env['breakerd_source']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tmp = short_tmpdir()
    log_dir = tmp
    report: dict[str, Any] = {
        "environment": env,
        "mode": "quick" if args.quick else "full",
        "params": dataclasses.asdict(p),
        "scenarios": {},
    }
    goals: list[Goal] = []
    ok = False
    try:
        with ManagedDaemon(tmp, "main") as daemon:
            report["daemon_rss_start"] = daemon.rss()[0]
            steps: list[tuple[str, Callable[[], None]]] = []

            def b() -> None:
                r = scenario_b(daemon, p)
                goals.extend(print_b(r))
                report["scenarios"]["b"] = {
                    "sync": r.sync.to_json(),
                    "async": r.async_.to_json(),
                    "ratios": r.ratios,
                    "daemon_cpu_us_per_call": r.daemon_cpu_us_per_call,
                }

            def c() -> None:
                rows = run_throughput(
                    daemon,
                    "bench-throughput",
                    p.process_counts,
                    p.tput_reps,
                    p.tput_seconds,
                    log_dir,
                    "calls",
                )
                print_throughput(
                    rows,
                    "c. outcomes per second through one daemon, N client processes",
                    p.tput_seconds,
                    p.tput_reps,
                )
                goals.append(goal_c(rows))
                report["scenarios"]["c"] = [row.to_json() for row in rows]

            def d() -> None:
                result, pinned = scenario_d(daemon, p, log_dir)
                ratios, pinned_ratios, goal = print_d(result, pinned)
                goals.append(goal)
                report["scenarios"]["d"] = {
                    "result": result.to_json(),
                    "ratios": ratios,
                    "one_cpu": {"result": pinned.to_json(), "ratios": pinned_ratios},
                }

            def e() -> None:
                groups = scenario_e(daemon, p, log_dir)
                goals.extend(print_e(groups, p))
                report["scenarios"]["e"] = [g.to_json() for g in groups]

            def f() -> None:
                r = scenario_f(p, tmp, log_dir)
                goals.extend(print_f(r, p))
                report["scenarios"]["f"] = r.to_json()

            def g() -> None:
                rows = scenario_g(daemon, p, log_dir)
                goals.extend(print_g(rows))
                report["scenarios"]["g"] = [row.to_json() for row in rows]

            steps = [("b", b), ("c", c), ("d", d), ("e", e), ("f", f), ("g", g)]
            for key, step in steps:
                if key in only:
                    t0 = time.monotonic()
                    step()
                    sys.stdout.flush()
                    report.setdefault("seconds", {})[key] = time.monotonic() - t0
            report["daemon_rss_end"] = daemon.rss()[0]
        print_goals(goals)
        elapsed = time.monotonic() - started
        print()
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"total time: {elapsed:.1f} s")
        report["goals"] = [vars(g) for g in goals]
        report["elapsed_s"] = elapsed
        if args.json:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=2)
            print(f"wrote {args.json}")
        ok = True
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"(logs of the daemons and workers kept in {tmp})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
