"""``breakerd demo --daemon``: the original script's scenario through a daemon, across processes.

The embedded demo (``_demo``) replays the original script's calls in one process. Here
the same story runs through a ``breakerd`` daemon with the calls spread over
several worker *processes*, each with its own ``CircuitBreaker("LLM", ...,
daemon=socket)`` and its own openai SDK client, all talking to the stand-in
OpenAI server of ``_demo`` (no network, no API key):

* worker 1 gets two answers, workers 2 and 3 run into three timeouts between
  them; no process sees more than two failures, but the daemon's breaker
  sees 3 of 5 calls fail and opens;
* the daemon pushes the trip to every worker, so each worker's next call
  gets the fallback without reaching the server;
* after the open timeout one worker's trial call closes the breaker for all,
  and every worker's call succeeds again.

The coordinator (this process) starts a private daemon (or reuses the one at
``--socket``), the stand-in server and the workers, and tells the workers
which call to make when, so the output is the same on every run. Workers are
``python -m breakerd.clients.cli._demo_worker PLAN_JSON`` processes that read one
command per line on stdin and answer with JSON lines on stdout; the state
changes their breaker sees arrive on the same stdout as they happen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TextIO, TypeAlias

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from breakerd.protocol import (
    BreakerError,
    BreakerStatus,
    CircuitState,
    DaemonUnavailableError,
    Status,
    StatusRequest,
)

from . import _demo_worker
from ._admin import ask_daemon
from ._demo import (
    BREAKER_NAME,
    DEADLINE_MARGIN,
    FAILURE_THRESHOLD,
    MIN_CALLS,
    SCRIPT,
    CallResult,
    Kind,
    Printer,
    StandInServer,
    stand_in_server,
)

__all__ = [
    "EXPECTED",
    "PLAN",
    "WORKERS",
    "DaemonDemoResult",
    "SeenTransition",
    "WorkerRequest",
    "main_demo_daemon",
    "run_daemon_demo",
]

#: Worker processes sharing the breaker.
WORKERS: Final = 3
#: Which worker makes each call, in order. The stand-in answers the first two
#: chat completions and stalls the next three (``_demo.SCRIPT``).
PLAN: Final[tuple[int, ...]] = (
    *(1, 1),  # two answers, both in worker 1
    *(2, 3, 2),  # three timeouts, in workers 2 and 3: the breaker opens
    *(1, 3, 2),  # every worker's next call: the fallback
    *(1, 2, 3),  # after the open timeout: worker 1's trial, then everyone
)
EXPECTED: Final[tuple[Kind, ...]] = (
    *("success", "success"),
    *("failure", "failure", "failure"),
    *("fallback", "fallback", "fallback"),
    *("success", "success", "success"),
)
#: The call that should open the breaker, and the half-open trial.
TRIP_REQUEST: Final = 4
TRIAL_REQUEST: Final = 8
_STATES: Final = (CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN)
EXPECTED_MOVES: Final = (
    (CircuitState.CLOSED, CircuitState.OPEN),
    (CircuitState.OPEN, CircuitState.HALF_OPEN),
    (CircuitState.HALF_OPEN, CircuitState.CLOSED),
)
#: Bound on any one wait: a worker starting, answering, hearing of a transition.
_WAIT: Final = 30.0
_MAX_LINE: Final = 1 << 20


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRequest(CallResult):
    """What became of one call, and which worker process made it."""

    worker: int
    pid: int


@dataclass(frozen=True, slots=True)
class SeenTransition:
    """A state change of the daemon's breaker, as the workers saw it."""

    from_state: CircuitState
    to_state: CircuitState
    generation: int
    failure_rate: float | None
    open_until: float | None
    #: The call during which it happened.
    request: int
    #: Workers that saw it (by push, or in the reply to their own call).
    seen_by: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DaemonDemoResult:
    requests: tuple[WorkerRequest, ...]
    transitions: tuple[SeenTransition, ...]
    #: Worker number -> pid.
    pids: Mapping[int, int]
    server_requests: int
    #: The breaker's totals in the daemon after the workers exited (``breakerd status``).
    daemon_status: BreakerStatus | None
    #: Each worker's breaker state at the end.
    final_states: Mapping[int, CircuitState]
    worker_exit_codes: Mapping[int, int | None]
    socket: str
    breaker: str
    #: True when an already running daemon was used; else its exit status.
    reused_daemon: bool
    daemon_exit_code: int | None
    elapsed: float

    def kinds(self) -> list[Kind]:
        return [request.kind for request in self.requests]

    def problems(self) -> list[str]:
        """Where the run strayed from the script (empty when it did not)."""
        found: list[str] = []
        if self.kinds() != list(EXPECTED):
            found.append(f"calls went {self.kinds()}, expected {list(EXPECTED)}")
        if [r.worker for r in self.requests] != list(PLAN)[: len(self.requests)]:
            found.append("calls were made by the wrong workers")
        timeouts = [r.error for r in self.requests if r.kind == "failure"]
        if any(error != "APITimeoutError" for error in timeouts):
            found.append(f"failures were {timeouts}, expected APITimeoutError")
        fallbacks = [r for r in self.requests if r.kind == "fallback"]
        if any(r.reached_server for r in fallbacks):
            found.append("a fallback call reached the server")
        if sorted(r.worker for r in fallbacks) != list(range(1, WORKERS + 1)):
            found.append("not every worker was protected by the trip")
        moves = [(t.from_state, t.to_state) for t in self.transitions]
        if moves != list(EXPECTED_MOVES):
            found.append(f"transitions went {moves}, expected {list(EXPECTED_MOVES)}")
        everyone = tuple(range(1, WORKERS + 1))
        for t in self.transitions:
            if t.seen_by != everyone:
                found.append(
                    f"{t.from_state.value} -> {t.to_state.value} reached only workers {t.seen_by}"
                )
        when = [t.request for t in self.transitions]
        if when and when != [TRIP_REQUEST, TRIAL_REQUEST, TRIAL_REQUEST]:
            found.append(f"transitions came with calls {when}")
        seen = sum(1 for kind in EXPECTED if kind != "fallback")
        if self.server_requests != seen:
            found.append(f"the server saw {self.server_requests} requests, expected {seen}")
        if any(state is not CircuitState.CLOSED for state in self.final_states.values()):
            found.append(f"workers ended in states {dict(self.final_states)}, expected closed")
        if any(code != 0 for code in self.worker_exit_codes.values()):
            found.append(f"worker exit codes {dict(self.worker_exit_codes)}")
        status = self.daemon_status
        totals = EXPECTED.count("success"), EXPECTED.count("failure"), EXPECTED.count("fallback")
        if status is None:
            found.append("no status from the daemon")
        elif (status.successes, status.failures, status.rejections) != totals:
            found.append(
                f"the daemon counted {status.successes} successes, {status.failures} failures "
                f"and {status.rejections} rejections, expected {totals}"
            )
        if not self.reused_daemon and self.daemon_exit_code != 0:
            found.append(f"the daemon exited with {self.daemon_exit_code}")
        return found


# -- the coordinator ----------------------------------------------------------------------


#: A transition as a worker reports it: (from, to, generation, failure_rate, open_until).
_Move: TypeAlias = tuple[CircuitState, CircuitState, int, float | None, float | None]


class _Worker:
    """One worker process, seen from the coordinator."""

    def __init__(self, number: int, process: anyio.abc.Process, log: Path | None) -> None:
        self.number = number
        self.process = process
        self.log = log
        self.pid = process.pid
        self.state = CircuitState.CLOSED
        self.generation = -1
        #: The transitions this worker's breaker reported, in order.
        self.transitions: list[_Move] = []
        self.changed = anyio.Event()
        self.ready = anyio.Event()
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](16)
        self._replies_in, self.replies = send, receive
        self.gone = False

    async def read(self) -> None:
        """Route the worker's stdout lines until it exits."""
        assert self.process.stdout is not None
        lines = BufferedByteReceiveStream(self.process.stdout)
        try:
            while True:
                message = json.loads(await lines.receive_until(b"\n", _MAX_LINE))
                event = message.get("event")
                if event == "transition":
                    self.transitions.append(
                        (
                            CircuitState(message["from"]),
                            CircuitState(message["to"]),
                            message["generation"],
                            message["failure_rate"],
                            message["open_until"],
                        )
                    )
                    self._saw(CircuitState(message["to"]), message["generation"])
                elif event == "ready":
                    self._saw(CircuitState(message["state"]), message["generation"])
                    self.ready.set()
                else:
                    self._saw(CircuitState(message["state"]), message["generation"])
                    await self._replies_in.send(message)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            pass
        finally:
            self.gone = True
            self.ready.set()
            self.changed.set()
            self._replies_in.close()

    def _saw(self, state: CircuitState, generation: int) -> None:
        if generation >= self.generation:
            self.state, self.generation = state, generation
        self.changed.set()
        self.changed = anyio.Event()

    async def send(self, command: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send((json.dumps(command) + "\n").encode())

    async def call(self, index: int, prompt: str) -> dict[str, Any]:
        await self.send({"op": "call", "index": index, "prompt": prompt})
        with anyio.fail_after(_WAIT):
            try:
                return await self.replies.receive()
            except anyio.EndOfStream:
                raise RuntimeError(
                    f"worker {self.number} (pid {self.pid}) exited during request {index}"
                    + self.log_tail()
                ) from None

    async def hear_of(self, generation: int, patience: float) -> bool:
        """Wait (up to ``patience`` seconds) until this worker's breaker is at ``generation``."""
        with anyio.move_on_after(patience):
            while self.generation < generation and not self.gone:
                await self.changed.wait()
        return self.generation >= generation

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        lines = self.log.read_text(errors="replace").splitlines()[-10:]
        return "; its log ends:\n" + "\n".join(lines) if lines else ""


@dataclass
class _Daemon:
    socket: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    exit_code: int | None = None

    @property
    def reused(self) -> bool:
        return self.process is None


@dataclass
class _Run:
    say: Callable[[str], None]
    server: StandInServer
    workers: dict[int, _Worker]
    results: list[WorkerRequest] = field(default_factory=list)
    transitions: dict[int, SeenTransition] = field(default_factory=dict)


async def run_daemon_demo(
    out: TextIO | None = None,
    *,
    socket: str | Path | None = None,
    open_timeout: float = 1.0,
    client_timeout: float = 0.3,
    verbose: bool = False,
) -> DaemonDemoResult:
    """Play the scenario through a daemon; print the story to ``out`` and return what happened.

    Without ``socket`` a private daemon is started on a socket under /tmp and
    stopped at the end. With ``socket``, a daemon already serving there is
    used (under a breaker name of this run's own, so no real breaker is
    touched), or one is started there and stopped at the end.
    """
    say = Printer(out)
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="breakerd-demo-", dir="/tmp"))
    try:
        path = Path(socket) if socket is not None else scratch / "d.sock"
        daemon = await anyio.to_thread.run_sync(_open_daemon, path, scratch, verbose)
        try:
            if daemon.reused:
                say(f"using the breakerd daemon already serving {daemon.socket}")
            else:
                assert daemon.process is not None
                say(f"breakerd daemon (pid {daemon.process.pid}) serving {daemon.socket}")
            # On a daemon that serves real breakers, one of this run's own.
            breaker = f"{BREAKER_NAME}-demo-{os.getpid()}" if daemon.reused else BREAKER_NAME
            async with stand_in_server(SCRIPT, stall=max(10.0, 20 * client_timeout)) as server:
                say(f"stand-in OpenAI API on {server.base_url} (no network, no API key)")
                result = await _with_workers(
                    say,
                    server,
                    daemon,
                    breaker,
                    scratch,
                    verbose,
                    open_timeout=open_timeout,
                    client_timeout=client_timeout,
                )
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_close_daemon, daemon, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        elapsed = time.monotonic() - started
        say(f"finished in {elapsed:.1f}s")
    return dataclasses.replace(result, daemon_exit_code=daemon.exit_code, elapsed=elapsed)


def _open_daemon(path: Path, scratch: Path, verbose: bool) -> _Daemon:
    """The daemon serving ``path``, started here unless one already is (blocking)."""
    if _serving(path):
        return _Daemon(path)
    log = None if verbose else open(scratch / "daemon.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "breakerd.actor.daemon", "--socket", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    daemon = _Daemon(path, process, log)
    # The readiness contract: the socket file exists once the daemon accepts.
    # (A stale file left by a dead daemon answers nothing: hence the question.)
    deadline = time.monotonic() + _WAIT
    while process.poll() is None and time.monotonic() < deadline:
        if _serving(path):
            return daemon
        time.sleep(0.01)
    code = process.poll()
    _close_daemon(daemon, lambda line: None)
    reason = f"exited with {code}" if code is not None else f"not ready within {_WAIT:g}s"
    tail = ""
    if log is not None:
        tail = ": " + (scratch / "daemon.log").read_text(errors="replace").strip()[-500:]
    raise RuntimeError(f"could not start a breakerd daemon on {path} ({reason}){tail}")


def _serving(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        ask_daemon(path, StatusRequest(None), timeout=5)
    except DaemonUnavailableError:
        return False
    return True


def _close_daemon(daemon: _Daemon, say: Callable[[str], None]) -> None:
    process = daemon.process
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        daemon.exit_code = process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        daemon.exit_code = process.wait(10)
    if daemon.log is not None:
        daemon.log.close()
    gone = "socket removed" if not daemon.socket.exists() else "socket LEFT BEHIND"
    say(f"daemon stopped (exit {daemon.exit_code}, {gone})")


async def _with_workers(
    say: Callable[[str], None],
    server: StandInServer,
    daemon: _Daemon,
    breaker: str,
    scratch: Path,
    verbose: bool,
    *,
    open_timeout: float,
    client_timeout: float,
) -> DaemonDemoResult:
    plan = {
        "socket": str(daemon.socket),
        "name": breaker,
        "base_url": server.base_url,
        "open_timeout": open_timeout,
        "client_timeout": client_timeout,
        "verbose": verbose,
    }
    workers: dict[int, _Worker] = {}
    exit_codes: dict[int, int | None] = {}
    async with anyio.create_task_group() as group:
        try:
            for number in range(1, WORKERS + 1):
                log = None if verbose else scratch / f"worker{number}.log"
                stderr = None if log is None else log.open("wb")
                try:
                    process = await anyio.open_process(
                        [sys.executable, "-m", _demo_worker.__name__, json.dumps(plan)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                    )
                finally:
                    if stderr is not None:
                        stderr.close()  # the worker has its own copy
                worker = workers[number] = _Worker(number, process, log)
                group.start_soon(worker.read)
            with anyio.fail_after(_WAIT):
                for worker in workers.values():
                    await worker.ready.wait()
                    if worker.gone:
                        raise RuntimeError(
                            f"worker {worker.number} exited at start" + worker.log_tail()
                        )
            say(
                f"{WORKERS} worker processes share breaker {breaker!r} through the daemon: "
                + ", ".join(f"worker {n} (pid {w.pid})" for n, w in workers.items())
            )
            say(
                f"breaker {breaker!r}: opens above {FAILURE_THRESHOLD:.0%} failures once "
                f"{MIN_CALLS} calls are in (counted host-wide), stays open {open_timeout:g}s; "
                f"client timeout {client_timeout:g}s"
            )
            run = _Run(say, server, workers)
            await _play(run)
            fallbacks = [r for r in run.results if r.kind == "fallback"]
            say(
                f"the server saw {server.requests} requests for {len(run.results)} calls: "
                f"{len(fallbacks)} fallbacks, in workers "
                + ", ".join(str(r.worker) for r in fallbacks)
                + ", never reached it"
            )
            # Plain successes and local rejections travel in batches: the
            # workers' exit hooks send what is left, then the daemon's totals are final.
            for worker in workers.values():
                await worker.send({"op": "exit"})
            with anyio.fail_after(_WAIT):
                for number, worker in workers.items():
                    exit_codes[number] = await worker.process.wait()
        finally:
            for worker in workers.values():
                if worker.process.returncode is None:
                    worker.process.kill()
            with anyio.CancelScope(shield=True):
                for worker in workers.values():
                    await worker.process.aclose()
    status = await _daemon_status(daemon.socket, breaker)
    if status is not None:
        say(
            f"breakerd status: {status.successes} successes, {status.failures} failures, "
            f"{status.rejections} rejections for {breaker!r}, state {status.snapshot.state.value}"
        )
    return DaemonDemoResult(
        requests=tuple(run.results),
        transitions=tuple(run.transitions[g] for g in sorted(run.transitions)),
        pids={n: w.pid for n, w in workers.items()},
        server_requests=server.requests,
        daemon_status=status,
        final_states={n: w.state for n, w in workers.items()},
        worker_exit_codes=exit_codes,
        socket=str(daemon.socket),
        breaker=breaker,
        reused_daemon=daemon.reused,
        # Filled in by run_daemon_demo once the daemon is stopped:
        daemon_exit_code=None,
        elapsed=0.0,
    )


async def _daemon_status(path: Path, name: str) -> BreakerStatus | None:
    try:
        (status,) = await anyio.to_thread.run_sync(
            lambda: ask_daemon(path, StatusRequest(name), timeout=5)
        )
    except BreakerError:
        return None
    assert isinstance(status, Status)
    return status.breakers[0] if status.breakers else None


async def _play(run: _Run) -> None:
    say, server, workers = run.say, run.server, run.workers
    for index, number in enumerate(PLAN):
        if index == TRIAL_REQUEST:
            await _wait_out_open(run)
        worker = workers[number]
        prompt = f"test {index}"
        before = server.requests
        reply = await worker.call(index, prompt)
        kind: Kind = reply["kind"]
        result = WorkerRequest(
            index=index,
            worker=number,
            pid=worker.pid,
            prompt=prompt,
            kind=kind,
            text=reply["text"],
            error=reply["error"],
            reached_server=server.requests > before,
            server_requests=server.requests,
            state=CircuitState(reply["state"]),
            retry_after=reply["retry_after"],
        )
        run.results.append(result)
        say(_describe(result, before))
        # Before the next call, every worker must have heard of what this one
        # did to the breaker: that is what protects them.
        generation = reply["generation"]
        for w in workers.values():
            await w.hear_of(generation, _WAIT / 3)
        new: dict[int, _Move] = {}
        for w in workers.values():
            for move in w.transitions:
                if move[2] not in run.transitions and move[2] <= generation:
                    new.setdefault(move[2], move)
        for gen in sorted(new):
            from_state, to_state, _, rate, open_until = new[gen]
            seen_by = tuple(
                w.number for w in workers.values() if any(m[2] == gen for m in w.transitions)
            )
            seen = SeenTransition(from_state, to_state, gen, rate, open_until, index, seen_by)
            run.transitions[gen] = seen
            say(_describe_transition(seen))


async def _wait_out_open(run: _Run) -> None:
    opened = [t for t in run.transitions.values() if t.to_state is CircuitState.OPEN]
    if not opened or opened[-1].open_until is None:
        return
    delay = max(0.0, opened[-1].open_until - time.monotonic()) + DEADLINE_MARGIN
    run.say(f"waiting {delay:.1f}s for the open timeout to pass...")
    await anyio.sleep(delay)


def _describe(result: WorkerRequest, server_before: int) -> str:
    line = f"request {result.index} (worker {result.worker}, pid {result.pid}): {result.kind} - "
    if result.kind == "success":
        line += result.text
        if result.index == TRIAL_REQUEST:
            line += " (the half-open trial call)"
    elif result.kind == "failure":
        line += f"{result.error} ({result.text})"
    else:
        retry = "" if result.retry_after is None else f", retry in {result.retry_after:.1f}s"
        reached = (
            "REACHED THE SERVER"
            if result.reached_server
            else f"not sent: the server is still at {server_before} requests"
        )
        line += f"{result.text} (breaker {result.state.value}{retry}; {reached})"
    return line


def _describe_transition(t: SeenTransition) -> str:
    moves = (t.from_state, t.to_state)
    if moves == (CircuitState.CLOSED, CircuitState.OPEN) and t.failure_rate is not None:
        why = f"failure rate {t.failure_rate:.0%} > {FAILURE_THRESHOLD:.0%}, across processes"
    elif moves == (CircuitState.OPEN, CircuitState.HALF_OPEN):
        why = "open timeout elapsed, one trial call let through"
    elif moves == (CircuitState.HALF_OPEN, CircuitState.CLOSED):
        why = "the trial call succeeded"
    elif moves == (CircuitState.HALF_OPEN, CircuitState.OPEN):
        why = "the trial call failed"
    else:
        why = "changed"
    line = f"  breaker {t.from_state.value} -> {t.to_state.value}: {why}"
    if t.open_until is not None and t.to_state is CircuitState.OPEN:
        line += f"; open for {max(0.0, t.open_until - time.monotonic()):.1f}s"
    seen = ", ".join(str(n) for n in t.seen_by) or "none"
    return line + f"; seen by workers {seen}"


# -- the CLI entry point ------------------------------------------------------------------


def main_demo_daemon(
    out: TextIO,
    *,
    socket: str | Path | None = None,
    open_timeout: float = 1.0,
    client_timeout: float = 0.3,
    verbose: bool = False,
) -> int:
    """``breakerd demo --daemon``: run the scenario, return 0 if it went as scripted."""
    result = anyio.run(
        lambda: run_daemon_demo(
            out,
            socket=socket,
            open_timeout=open_timeout,
            client_timeout=client_timeout,
            verbose=verbose,
        )
    )
    problems = result.problems()
    if problems:
        raise RuntimeError("the daemon demo did not go as scripted: " + "; ".join(problems))
    return 0
