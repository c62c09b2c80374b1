"""The client library's process-wide state: all of it is here.

Each piece, and why it has to be process-wide:

* ``_daemon_clients``: socket path -> this process's ``DaemonClient``
  (``get_client``). One connection and one IO thread per process and
  socket, shared by every breaker of the process: the daemon bounds
  connections per process, and one connection batches every breaker's
  reports. ``_daemon_clients_lock`` makes two threads asking for the same
  socket at once share one client.
* ``_finalizer_pid``: the process whose multiprocessing finalizer is
  registered (one per process; see ``_flush_at_exit``).
* ``live_breakers``: every ``CircuitBreaker`` alive in this process, held
  weakly (a breaker nobody holds is not kept alive by being listed). A
  forked child must repoint each of them, and nothing else knows them all.
* ``_budgets``: (clock or socket, breaker name) -> that breaker's budgets
  (``shared_budget``), held weakly: every ``CircuitBreaker`` of one name in
  a process draws on one budget, as it shares one actor. ``budgets_lock``
  guards it, and makes a budget installed by two threads' first
  ``observe_limits`` at once one budget. A forked child drops what each
  host-wide budget held (its slots and leases are the parent's).
* hooks, registered once when this module is imported:
  - at exit (``atexit``), and from a multiprocessing child's finalizer:
    flush and close every daemon client, so no queued outcome is lost;
  - at fork, in the child (``os.register_at_fork``): replace the lock (a
    parent thread may have held it at fork time), forget every daemon
    client (closing the child's copies of their descriptors, never the
    parent's connection), then repoint every live breaker so that its next
    call rebinds (a new connection, or the child's default actor system).
    Clients first: a breaker rebinding in the child must not find the
    parent's client.

The actor runtime's (the default actor system) is in
``breakerd.actor._globals``; its fork hook runs first (it is registered
first, when ``breakerd.actor`` is imported). ``breakerd.clients.openai``'s
``_guards`` is a ``ContextVar``: per task and thread, not process-wide.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from ._daemon_client import DaemonClient
from ._daemon_socket import check_socket_path

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker
    from ._budgets import Budgets

__all__ = [
    "budgets_lock",
    "budgets_of",
    "close_all_clients",
    "flush_all_clients",
    "get_client",
    "live_breakers",
    "shared_budget",
]

_daemon_clients: dict[str, DaemonClient] = {}
_daemon_clients_lock = threading.Lock()
_finalizer_pid = 0
live_breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
_budgets: weakref.WeakValueDictionary[tuple[object, str], Budgets] = weakref.WeakValueDictionary()
budgets_lock = threading.RLock()


def shared_budget(key: tuple[object, str], budgets: Budgets) -> Budgets:
    """The budgets registered under ``key``, or ``budgets``, registered now (first wins)."""
    with budgets_lock:
        existing = _budgets.get(key)
        if existing is not None:
            return existing
        _budgets[key] = budgets
        return budgets


def budgets_of(key: tuple[object, str]) -> Budgets | None:
    """The budgets registered under ``key`` (see ``shared_budget``), if any."""
    with budgets_lock:
        return _budgets.get(key)


def get_client(path: str | Path, *, start: bool = True) -> DaemonClient:
    """The client of this process for the daemon at ``path``.

    With ``start`` (the default) it is started if it is not yet, and this
    waits for its first connection attempt (bounded by ``connect_timeout``);
    without, a new client is only made: ``DaemonClient.start`` opens its
    connection when something first needs it.
    """
    key = check_socket_path(path)
    with _daemon_clients_lock:
        client = _daemon_clients.get(key)
        if client is None or client.pid != os.getpid() or client.closed:
            client = DaemonClient(key)
            client.on_close = _forget
            _daemon_clients[key] = client
            _flush_at_exit()
    if start:
        client.start()
    return client


def _forget(client: DaemonClient) -> None:
    with _daemon_clients_lock:
        if _daemon_clients.get(client.path) is client:
            del _daemon_clients[client.path]


def close_all_clients() -> None:
    """Flush and close every client of this process (run at exit)."""
    with _daemon_clients_lock:
        clients = [c for c in _daemon_clients.values() if c.pid == os.getpid()]
    for client in clients:
        client.close()


def flush_all_clients() -> None:
    """Write every outcome and rejection this process has queued for a daemon, now.

    When this returns they are in the kernel's socket buffers, which the
    daemon reads even after this process is gone. For a process that ends
    without running exit hooks (``os._exit()`` after a bare ``os.fork()``).
    """
    with _daemon_clients_lock:
        clients = [c for c in _daemon_clients.values() if c.pid == os.getpid()]
    for client in clients:
        client.flush()


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
    global _daemon_clients_lock, budgets_lock
    _daemon_clients_lock = threading.Lock()
    budgets_lock = threading.RLock()
    for budgets in list(_budgets.values()):
        budgets.after_fork_in_child()
    clients = list(_daemon_clients.values())
    _daemon_clients.clear()
    for client in clients:
        client.abandon_in_child()
    for breaker in list(live_breakers):
        breaker.after_fork_in_child()


atexit.register(close_all_clients)
os.register_at_fork(after_in_child=_after_fork_in_child)
