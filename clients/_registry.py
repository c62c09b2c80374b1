"""The daemon clients of this process: one per socket, flushed at exit, forgotten at fork.

* A client connects when something first needs it (``get_client(start=False)``
  and ``DaemonClient.start_nowait``): the facade's links are lazy.
* After ``fork()`` the child forgets every client (closing its copies of
  their file descriptors, never touching the parent's connection); the
  facade's fork hook sends the child's next call down the slow path, which
  opens the child's own connection.
* At exit every client flushes its queued reports and closes its
  connection: atexit, and a multiprocessing finalizer for the children that
  end in ``os._exit()`` (``flush_all_clients`` for the rest).
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import threading
from pathlib import Path

from ._daemon_client import DaemonClient, check_socket_path

__all__ = ["close_all_clients", "flush_all_clients", "get_client"]

_clients: dict[str, DaemonClient] = {}
_clients_lock = threading.Lock()


def get_client(path: str | Path, *, start: bool = True) -> DaemonClient:
    """The client of this process for the daemon at ``path``.

    With ``start`` (the default) it is started if it is not yet, and this
    waits for its first connection attempt (bounded by ``connect_timeout``);
    without, a new client is only made: ``DaemonClient.start`` opens its
    connection when something first needs it.
    """
    key = check_socket_path(path)
    with _clients_lock:
        client = _clients.get(key)
        if client is None or client.pid != os.getpid() or client.closed:
            client = DaemonClient(key)
            client.on_close = _forget
            _clients[key] = client
            _flush_at_exit()
    if start:
        client.start()
    return client


def _forget(client: DaemonClient) -> None:
    with _clients_lock:
        if _clients.get(client.path) is client:
            del _clients[client.path]


def close_all_clients() -> None:
    """Flush and close every client of this process (run at exit)."""
    with _clients_lock:
        clients = [c for c in _clients.values() if c.pid == os.getpid()]
    for client in clients:
        client.close()


def flush_all_clients() -> None:
    """Write every outcome and rejection this process has queued for a daemon, now.

    When this returns they are in the kernel's socket buffers, which the
    daemon reads even after this process is gone. For a process that ends
    without running exit hooks (``os._exit()`` after a bare ``os.fork()``).
    """
    with _clients_lock:
        clients = [c for c in _clients.values() if c.pid == os.getpid()]
    for client in clients:
        client.flush()


# The pid whose multiprocessing finalizer is registered (one per process).
_finalizer_pid = 0


def _flush_at_exit() -> None:
    # A multiprocessing child (every Process, every Pool worker made by
    # fork) ends in os._exit(): atexit hooks never run there, but
    # multiprocessing's own finalizers do, just before (its
    # BaseProcess._bootstrap calls util._exit_function()). The child clears
    # the registry it inherited, so each process registers its own, with
    # its first client. A positive priority runs it in the first round,
    # before multiprocessing joins the process's own children. In a plain
    # process both this and atexit run; the second close is a no-op.
    global _finalizer_pid
    pid = os.getpid()
    if _finalizer_pid != pid:
        _finalizer_pid = pid
        multiprocessing.util.Finalize(None, close_all_clients, exitpriority=50)


def _after_fork_in_child() -> None:
    global _clients_lock
    # The lock may have been held by a parent thread at fork time.
    _clients_lock = threading.Lock()
    clients = list(_clients.values())
    _clients.clear()
    for client in clients:
        client.abandon_in_child()


atexit.register(close_all_clients)
os.register_at_fork(after_in_child=_after_fork_in_child)
