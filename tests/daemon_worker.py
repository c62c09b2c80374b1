"""A real client process for the end-to-end tests: ``CircuitBreaker(daemon=PATH)`` on a plan.

``python tests/daemon_worker.py PLAN_JSON`` builds one daemon-backed breaker
with the public API and runs the plan's steps in order. Every step prints one
JSON line on stdout (flushed) tagged with this process's pid and the step's
index, so a test can follow several workers at once; ``barrier`` steps read a
line from stdin, which is how a test orders what happens across processes.

The plan::

    {
        "socket": "/tmp/bd.../s.sock",
        "name": "svc",
        "breaker": {...},          # CircuitBreaker keyword arguments
        "flush_delay": 60.0,       # optional: how long batched successes may wait
        "lazy": true,              # optional: "ready" does not read the state (no connection)
        "request_timeout": 0.5,    # optional: the client's (default 5 s)
        "steps": [...],
    }

Steps (``fn`` is what the protected call does: ``"ok"`` returns, ``"fail"``
raises ``Boom``, ``"block"`` prints ``{"event": "in_call"}`` and waits for a
stdin line, then returns if it says ``ok`` and raises otherwise):

* ``{"op": "call", "fn": ...}``: one ``call_sync``. The result says how it
  ended (``ok``, ``failed``, ``rejected``: ``CircuitBreakerOpenError``,
  ``unavailable``: ``DaemonUnavailableError``), whether the function ran,
  the state afterwards and how long the call took.
* ``{"op": "calls", "n": N, "fail_every": K}``: N calls, every K-th fails
  (0: none fails); the result counts each ending.
* ``{"op": "call_until", "fn": ..., "want": ENDING, "state": STATE, "timeout": S}``:
  calls, a few ms apart, until one ends with ``want`` and leaves the breaker
  in ``STATE`` (either may be left out); reports the attempts, the endings
  seen and the slowest call.
* ``{"op": "wait_state", "state": STATE, "timeout": S}``: until
  ``breaker.state`` is ``STATE`` (a push from the daemon, say).
* ``{"op": "wait_log", "event": EVENT, "timeout": S}``: until this process
  has logged ``EVENT`` (structlog; e.g. ``daemon_unavailable``).
* ``{"op": "barrier"}``: read one line from stdin.
* ``{"op": "threads"}``: the names of this process's threads.
* ``{"op": "wait_remote", "timeout": S}``: until the breaker is on the
  daemon's breaker again; ``at`` is when (``time.monotonic()``, host-wide).
* ``{"op": "wait_attempts", "n": N, "timeout": S}``: until the client has
  made N connection attempts; ``at`` is when the N-th was seen. With
  ``"between": true``, then also until it is between attempts (the N-th
  connection gone) or has started the next one.
* ``{"op": "fork", "steps": [...]}``: ``os.fork()``; the child runs the
  steps (its lines carry its pid) and exits normally, so its atexit hooks
  run; the parent waits for it and reports its exit status.

At the end of the plan the process exits normally, without flushing
anything itself: queued outcomes are left to the client's own exit hook.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog
from daemon_helpers import poll_until

from breakerd.clients import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    DaemonUnavailableError,
    _daemon_client,
    _link,
)

_out_lock = threading.Lock()
_logged: list[str] = []


class Boom(Exception):
    """What a failing protected call raises."""


def emit(**fields: Any) -> None:
    line = json.dumps({"pid": os.getpid(), **fields})
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _record_event(logger: object, method: str, event: MutableMapping[str, Any]) -> Any:
    _logged.append(str(event.get("event")))
    return event


def configure_logging() -> None:
    # JSON lines on stderr (the test keeps them in a file); every event is
    # also remembered here so that ``wait_log`` can wait for one.
    structlog.configure(
        processors=[
            _record_event,
            structlog.processors.add_log_level,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def protected(fn: str, ran: list[bool]) -> Any:
    def call() -> str:
        ran.append(True)
        if fn == "ok":
            return "ok"
        if fn == "block":
            emit(event="in_call")
            if sys.stdin.readline().strip() == "ok":
                return "ok"
        raise Boom(fn)

    return call


def one_call(breaker: CircuitBreaker, fn: str) -> dict[str, Any]:
    ran: list[bool] = []
    started = time.monotonic()
    retry_after = None
    try:
        breaker.call_sync(protected(fn, ran))
        ending = "ok"
    except Boom:
        ending = "failed"
    except CircuitBreakerOpenError as exc:
        ending = "rejected"
        retry_after = exc.retry_after
    except DaemonUnavailableError:
        ending = "unavailable"
    snapshot = breaker.snapshot
    return {
        "result": ending,
        "ran": bool(ran),
        "state": snapshot.state.value,
        "open_until": snapshot.open_until,
        "retry_after": retry_after,
        "elapsed": time.monotonic() - started,
    }


def wait(predicate: Callable[[], bool], timeout: float) -> bool:
    return poll_until(predicate, timeout) is not None


def on_daemon(breaker: CircuitBreaker) -> Callable[[], bool]:
    link = breaker._actor
    assert isinstance(link, _link.RemoteBreaker)
    return lambda: link.remote


def state_is(breaker: CircuitBreaker, state: str) -> Callable[[], bool]:
    return lambda: breaker.state.value == state


def logged(event: str) -> Callable[[], bool]:
    return lambda: event in _logged


def run_steps(breaker: CircuitBreaker, steps: list[Mapping[str, Any]]) -> None:
    for index, step in enumerate(steps):
        op = step["op"]
        result: dict[str, Any]
        if op == "call":
            result = one_call(breaker, step["fn"])
        elif op == "calls":
            counts = {"ok": 0, "failed": 0, "rejected": 0, "unavailable": 0}
            fail_every = step.get("fail_every", 0)
            for number in range(1, step["n"] + 1):
                fn = "fail" if fail_every and number % fail_every == 0 else "ok"
                try:
                    breaker.call_sync(protected(fn, []))
                    counts["ok"] += 1
                except Boom:
                    counts["failed"] += 1
                except CircuitBreakerOpenError:
                    counts["rejected"] += 1
                except DaemonUnavailableError:
                    counts["unavailable"] += 1
            result = {"counts": counts, "state": breaker.state.value}
        elif op == "call_until":
            deadline = time.monotonic() + step.get("timeout", 10.0)
            attempts, slowest, seen = 0, 0.0, []
            while True:
                outcome = one_call(breaker, step["fn"])
                attempts += 1
                slowest = max(slowest, outcome["elapsed"])
                if outcome["result"] not in seen:
                    seen.append(outcome["result"])
                done = outcome["result"] == step.get("want", outcome["result"]) and (
                    outcome["state"] == step.get("state", outcome["state"])
                )
                remaining = deadline - time.monotonic()
                if done or remaining <= 0:
                    break
                # Not there yet: only the daemon's breaker can answer otherwise,
                # so wait for the link to be back on it (the reconnect), not for time.
                wait(on_daemon(breaker), remaining)
            result = {**outcome, "attempts": attempts, "slowest": slowest, "seen": seen}
        elif op == "wait_state":
            ok = wait(state_is(breaker, step["state"]), step.get("timeout", 10.0))
            result = {"ok": ok, "state": breaker.state.value}
        elif op == "wait_log":
            ok = wait(logged(step["event"]), step.get("timeout", 10.0))
            result = {"ok": ok}
        elif op == "barrier":
            result = {"line": sys.stdin.readline().strip()}
        elif op == "threads":
            result = {"threads": [thread.name for thread in threading.enumerate()]}
        elif op == "wait_remote":
            ok = wait(on_daemon(breaker), step.get("timeout", 10.0))
            result = {"ok": ok, "at": time.monotonic()}
        elif op == "wait_attempts":
            link = breaker._actor
            assert isinstance(link, _link.RemoteBreaker)
            client, attempts = link.client, step["n"]
            ok = wait(lambda: client.attempts >= attempts, step.get("timeout", 10.0))  # noqa: B023 - used at once
            if ok and step.get("between"):
                ok = wait(
                    lambda: not client.connected or client.attempts > attempts,  # noqa: B023
                    step.get("timeout", 10.0),
                )
            result = {"ok": ok, "attempts": client.attempts, "at": time.monotonic()}
        elif op == "fork":
            with warnings.catch_warnings():
                # 3.12+ warns about fork() with threads running: that is the point here.
                warnings.simplefilter("ignore", DeprecationWarning)
                child = os.fork()
            if child == 0:
                run_steps(breaker, step["steps"])
                emit(i=index, op="child_done")
                raise SystemExit(0)  # a normal exit: atexit hooks run
            _, status = os.waitpid(child, 0)
            result = {"child_pid": child, "child_status": os.waitstatus_to_exitcode(status)}
        else:
            raise ValueError(f"unknown step {op!r}")
        emit(i=index, op=op, **result)


def main(plan: Mapping[str, Any]) -> None:
    configure_logging()
    if "request_timeout" in plan:
        # The process's client is made on first use with DaemonClient's defaults.
        defaults = _daemon_client.DaemonClient.__init__.__kwdefaults__
        assert defaults is not None
        defaults["request_timeout"] = plan["request_timeout"]
    if "flush_delay" in plan:
        # DaemonClient reads the module's FLUSH_DELAY when it is made.
        _daemon_client.FLUSH_DELAY = plan["flush_delay"]  # type: ignore[misc]
    breaker = CircuitBreaker(plan["name"], daemon=plan["socket"], **plan.get("breaker", {}))
    # Reading the state is a first use, which connects: not for a lazy plan.
    emit(event="ready", state=None if plan.get("lazy") else breaker.state.value)
    run_steps(breaker, plan["steps"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
