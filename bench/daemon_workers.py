"""Client processes for ``bench_daemon.py``, and the helpers both sides share.

``python bench/daemon_workers.py KIND ARGS_JSON`` runs one worker. A worker
talks to the benchmark over its standard streams in JSON lines: it writes one
object per line (flushed) and reads commands one line at a time; EOF on its
stdin means "exit now". Anything else that would write to stdout (structlog's
default logger, a stray print) is sent to stderr instead, so the protocol
stream stays clean.

Kinds:

* ``calls``: one ``CircuitBreaker(name, daemon=socket)``; on ``{"op": "run",
  "seconds": S}`` it calls ``call_sync(work)`` in a tight loop for S seconds,
  then makes one ``status()`` round trip (which flushes every queued outcome
  and waits until the daemon has applied them) and reports how many calls it
  made and when.
* ``trip``: one daemon-backed breaker that watches for ``open``. Mode
  ``callback``: an ``on_transition`` callback (run by the client's IO thread)
  records ``time.monotonic()`` first thing and reports it; the main thread
  just blocks. Mode ``spin``: on each ``arm`` command the main thread spins on
  ``breaker.state`` until it reads ``open``, records the instant, then spins
  until ``closed``. Mode ``calls``: on each ``arm`` it calls ``call_sync``
  every ``pause`` seconds until a call is rejected locally, and reports that
  instant and the start of its last admitted call; ``check`` reports the
  state.
* ``fanout``: the reference for ``trip``: blocks in ``poll`` on a socket it
  inherited; for every byte it reports the instant ``recv`` returned.
* ``hold``: many idle connections, each after ``hello`` and ``register``
  (the raw protocol over blocking sockets); holds them until stdin closes.
* ``reject``: a forced-open breaker (embedded or daemon-backed); one pass of
  rejected calls, reporting RSS before and after, or tracemalloc's growth.
* ``echo``: a raw Unix-socket ping-pong server (blocking sockets): for every
  complete request of ``request_size`` bytes it sends back ``reply`` bytes.

Workers import only the standard library, structlog and breakerd, so they
start fast.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import select
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, TextIO

import structlog

from breakerd.actor import ActorSystem
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState, Transition
from breakerd.protocol import (
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PROTOCOL_VERSION,
    BreakerError,
    Connection,
    Hello,
    Register,
    RequestMessage,
    ResponseReceived,
)

__all__ = [
    "PROTOCOL_OUT",
    "cpu_seconds_of",
    "host_cpu_jiffies",
    "open_registered",
    "raise_nofile_limit",
    "rss_of",
]

#: Set in ``main``: where a worker writes its JSON lines (the original stdout).
PROTOCOL_OUT: TextIO | None = None
_out_lock = threading.Lock()

#: Calls between two reads of the clock in the ``calls`` loop.
CHUNK = 1000


# -- shared helpers (imported by bench_daemon.py too) -------------------------------------


def raise_nofile_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (never above the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_of(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes, from ``/proc/PID/status``."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: fields are counted after its ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return ticks / os.sysconf("SC_CLK_TCK")


def host_cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, all CPUs, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
    total = sum(values[:8])
    return total - values[3] - values[4], total


def _read_replies(sock: socket.socket, conn: Connection, count: int) -> list[Any]:
    results: list[Any] = []
    while len(results) < count:
        event = conn.next_event()
        if event is NEED_DATA:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            conn.receive_data(data)
            continue
        if isinstance(event, ResponseReceived):
            if event.error is not None:
                raise event.error
            results.append(event.result)
    return results


def open_registered(
    socket_path: str,
    names: Sequence[str],
    config: dict[str, Any],
    *,
    window: int = 128,
    client: str = "breakerd-bench",
) -> socket.socket:
    """A connection that said ``hello`` and registered ``names``, pipelined.

    At most ``window`` requests are in flight at once (the daemon refuses
    more than ``max_inflight``, 256 by default, per connection).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(60.0)
        sock.connect(socket_path)
        conn = Connection("client")
        msgid = 1
        hello = Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, client, os.getpid())
        sock.sendall(conn.send_request(msgid, hello))
        _read_replies(sock, conn, 1)
        for start in range(0, len(names), window):
            chunk = names[start : start + window]
            data = []
            for name in chunk:
                msgid += 1
                message: RequestMessage = Register(name, config)
                data.append(conn.send_request(msgid, message))
            sock.sendall(b"".join(data))
            _read_replies(sock, conn, len(chunk))
    except BaseException:
        sock.close()
        raise
    return sock


# -- the worker side -------------------------------------------------------------------


def emit(**fields: Any) -> None:
    out = PROTOCOL_OUT
    assert out is not None
    line = json.dumps(fields)
    with _out_lock:
        out.write(line + "\n")
        out.flush()


def commands() -> Any:
    """Commands from stdin, one JSON object per line, until EOF."""
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield json.loads(line)


def is_remote(breaker: CircuitBreaker) -> bool | None:
    """Whether the breaker is on the daemon right now (not its fallback); None if unknown.

    A first use: a daemon-mode breaker connects then, not when it is made.
    """
    breaker.state  # noqa: B018
    remote = getattr(breaker._actor, "remote", None)  # RemoteBreaker.remote (private link)
    return bool(remote) if remote is not None else None


def io_thread_cpu(breaker: CircuitBreaker) -> Callable[[], float]:
    """CPU seconds of the daemon client's IO thread (0.0 if it cannot be read)."""
    try:
        ident = breaker._actor.client._thread.ident  # type: ignore[attr-defined]
        clock = time.pthread_getcpuclockid(ident)
    except (AttributeError, OSError, TypeError):
        return lambda: 0.0
    return lambda: time.clock_gettime(clock)


def work() -> int:
    return 1


def run_calls(args: dict[str, Any]) -> None:
    breaker = CircuitBreaker(args["name"], daemon=args["socket"], **args["config"])
    call_sync = breaker.call_sync
    for _ in range(5_000):  # warm-up, and the connection is up
        call_sync(work)
    breaker.status()
    io_cpu = io_thread_cpu(breaker)
    emit(ready=True, remote=is_remote(breaker), pid=os.getpid())
    monotonic = time.monotonic
    for command in commands():
        if command["op"] != "run":
            continue
        cpu0, io0 = time.process_time(), io_cpu()
        t0 = monotonic()
        end = t0 + command["seconds"]
        calls = 0
        while True:
            for _ in repeat(None, CHUNK):
                call_sync(work)
            calls += CHUNK
            if monotonic() >= end:
                break
        t_loop = monotonic()
        breaker.status()  # flush + barrier: the daemon has applied every outcome
        t_end = monotonic()
        emit(
            calls=calls,
            t0=t0,
            t_loop=t_loop,
            t_end=t_end,
            cpu=time.process_time() - cpu0,
            io_cpu=io_cpu() - io0,
            remote=is_remote(breaker),
        )


def run_trip(args: dict[str, Any]) -> None:
    breaker = CircuitBreaker(args["name"], daemon=args["socket"], **args["config"])
    monotonic = time.monotonic
    if args["mode"] == "callback":

        def on_transition(transition: Transition) -> None:
            t = monotonic()  # first thing: the instant this process sees the new state
            emit(state=transition.to_state.value, t=t)

        breaker.on_transition(on_transition)
        emit(ready=True, remote=is_remote(breaker), pid=os.getpid())
        sys.stdin.read()  # until EOF
        return
    if args["mode"] == "calls":
        run_trip_calls(breaker, float(args.get("pause", 0.0)))
        return
    opened = CircuitState.OPEN
    emit(ready=True, remote=is_remote(breaker), pid=os.getpid())
    for _command in commands():  # "arm"
        emit(armed=True)
        spins = 0
        give_up = monotonic() + 30.0
        while breaker.state is not opened:
            spins += 1
            if not spins & 0xFFFF and monotonic() > give_up:
                break
        t = monotonic()
        emit(state=breaker.state.value, t=t, spins=spins)
        while breaker.state is opened:
            spins += 1
            if not spins & 0xFFFF and monotonic() > give_up:
                break
        emit(state=breaker.state.value, t=monotonic())


def run_trip_calls(breaker: CircuitBreaker, pause: float) -> None:
    """A process with traffic: calls until its first local rejection, pausing between calls.

    Reports when its first rejected call ended (the state it read was read
    before that instant) and when its last admitted call started (the state
    it read was read after that one).
    """
    monotonic = time.monotonic
    call_sync = breaker.call_sync
    sleep = time.sleep
    emit(ready=True, remote=is_remote(breaker), pid=os.getpid())
    for command in commands():  # "arm", or "check" after the reset
        if command.get("op") == "check":
            emit(state=breaker.state.value, t=monotonic())
            continue
        emit(armed=True)
        last_admitted = 0.0
        calls = 0
        give_up = monotonic() + 30.0
        rejected_at = None
        while rejected_at is None:
            start = monotonic()
            try:
                call_sync(work)
            except CircuitBreakerOpenError:
                rejected_at = monotonic()
                break
            last_admitted = start
            calls += 1
            if start > give_up:
                break
            sleep(pause)
        emit(
            state=breaker.state.value,
            t=rejected_at if rejected_at is not None else monotonic(),
            last_admitted=last_admitted,
            calls=calls,
        )


def run_fanout(args: dict[str, Any]) -> None:
    sock = socket.socket(fileno=args["fd"])
    monotonic = time.monotonic
    poller = select.poll()  # like the client's IO thread: poll, then recv
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(sys.stdin.fileno(), select.POLLIN)  # EOF: the benchmark is done
    emit(ready=True, pid=os.getpid())
    while True:
        for fd, _ in poller.poll():
            if fd != sock.fileno():
                return
            data = sock.recv(64)
            t = monotonic()
            if not data:
                return
            emit(state="open", t=t)


def run_hold(args: dict[str, Any]) -> None:
    raise_nofile_limit(args["connections"] + 256)
    socks: list[socket.socket] = []
    try:
        for names in args["names"]:
            socks.append(open_registered(args["socket"], names, args["config"]))
        emit(ready=True, connections=len(socks), pid=os.getpid())
        sys.stdin.read()
    finally:
        for sock in socks:
            sock.close()


def run_reject(args: dict[str, Any]) -> None:
    n, warmup, traced = args["rejections"], args["warmup"], args["traced"]
    system: ActorSystem | None = None
    if args["socket"] is None:
        system = ActorSystem().start()
        breaker = CircuitBreaker(args["name"], system=system, **args["config"])
    else:
        breaker = CircuitBreaker(args["name"], daemon=args["socket"], **args["config"])
    breaker.force_open()
    emit(ready=True, remote=is_remote(breaker) if system is None else None, pid=os.getpid())
    call_sync = breaker.call_sync

    def reject(count: int) -> None:
        for _ in repeat(None, count):
            try:
                call_sync(work)
            except CircuitBreakerOpenError:
                pass
        breaker.status()  # flush: the rejection counts reach the actor

    try:
        if traced:
            tracemalloc.start()
        reject(warmup)
        gc.collect()
        counted0 = breaker.status().rejections
        # The benchmark reads the daemon's RSS now, then says go.
        emit(warm=True, remote=is_remote(breaker) if system is None else None)
        if sys.stdin.readline().strip() == "":
            return  # EOF: the benchmark is gone
        before = tracemalloc.get_traced_memory()[0] if traced else rss_of()[0]
        t0 = time.perf_counter()
        reject(n)
        seconds = time.perf_counter() - t0
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] if traced else rss_of()[0]
        counted = breaker.status().rejections - counted0
        if traced:
            tracemalloc.stop()
        emit(
            before=before,
            after=after,
            seconds=seconds,
            counted=counted,
            remote=is_remote(breaker) if system is None else None,
        )
    finally:
        if system is not None:
            system.stop()


def run_echo(args: dict[str, Any]) -> None:
    path = args["path"]
    size = args["request_size"]
    reply = bytes.fromhex(args["reply"])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(60.0)  # never wait forever for a parent that died
    emit(ready=True, pid=os.getpid())
    conn, _ = listener.accept()
    listener.close()
    conn.settimeout(None)
    buffered = 0
    recv, sendall = conn.recv, conn.sendall
    with conn:
        while True:
            data = recv(65536)
            if not data:
                return
            buffered += len(data)
            while buffered >= size:
                buffered -= size
                sendall(reply)


WORKERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "calls": run_calls,
    "trip": run_trip,
    "fanout": run_fanout,
    "hold": run_hold,
    "reject": run_reject,
    "echo": run_echo,
}


def main(argv: Sequence[str]) -> int:
    global PROTOCOL_OUT
    kind, args = argv[0], json.loads(argv[1])
    # The protocol keeps the real stdout; fd 1 now points at stderr.
    PROTOCOL_OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    try:
        WORKERS[kind](args)
    except (BrokenPipeError, KeyboardInterrupt):
        return 1  # the benchmark is gone
    except BreakerError as exc:
        print(f"worker {kind}: {exc!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
