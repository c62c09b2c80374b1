"""A client process whose children end the ways ``multiprocessing`` ends them.

``python tests/exit_worker.py SOCKET MODE N`` makes two daemon-mode
breakers, ``ok`` (closed) and ``shut`` (forced open here), then children
that each make N successful calls through ``ok`` and N rejected ones through
``shut`` and end:

* ``process``: two ``multiprocessing.Process`` (fork), returning from their
  target: multiprocessing ends them with ``os._exit()`` after its finalizers;
* ``pool``: a fork ``Pool`` of two workers running four tasks, closed and
  joined: each worker ends like a ``Process``;
* ``fork``: two bare ``os.fork()`` children that call
  ``breakerd.clients.flush()`` and then ``os._exit(0)``.

Batched outcomes wait an hour here: only an exit flush can send them. The
parent prints one JSON line: how many children made calls and their exit codes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import warnings

import breakerd.clients
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, _daemon_client

_daemon_client.FLUSH_DELAY = 3600.0  # type: ignore[misc]

SOCKET, MODE, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
# "deny", and time to connect under load: every outcome is the daemon's or an error.
ok = CircuitBreaker("ok", daemon=SOCKET, on_unavailable="deny", daemon_timeout=5.0)
shut = CircuitBreaker("shut", daemon=SOCKET, on_unavailable="deny", daemon_timeout=5.0)


def calls(_: int = 0) -> int:
    for _ in range(N):
        ok.call_sync(int)
        try:
            shut.call_sync(int)
        except CircuitBreakerOpenError:
            pass
        else:
            raise AssertionError("shut admitted a call")
    return N


def main() -> None:
    shut.force_open()
    fork = multiprocessing.get_context("fork")
    codes: list[int | None] = []
    children = 2
    if MODE == "process":
        procs = [fork.Process(target=calls) for _ in range(children)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        codes = [proc.exitcode for proc in procs]
    elif MODE == "pool":
        children = 4
        pool = fork.Pool(2)
        assert pool.map(calls, range(children), chunksize=1) == [N] * children
        pool.close()
        pool.join()
        codes = [0]
    elif MODE == "fork":
        pids = []
        for _ in range(children):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    calls()
                    breakerd.clients.flush()
                    code = 0
                finally:
                    os._exit(code)  # no atexit, no finalizers: only the flush above
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    else:
        raise SystemExit(f"unknown mode {MODE!r}")
    print(json.dumps({"children": children, "codes": codes}), flush=True)


if __name__ == "__main__":
    main()
