"""The actor runtime's process-wide state: all of it is here.

One piece, and its hooks:

* ``_default``: the ``ActorSystem`` that every ``CircuitBreaker`` without
  ``system=`` uses (``default_system()``), started on first use in a daemon
  thread. Process-wide because breakers with the same name must share one
  actor across the whole process, whichever module made them; a library
  cannot ask its host to pass a system around. ``_default_lock`` makes
  its first start happen once when several threads race to it.
* at exit (``atexit``): stop the default system, so pending requests are
  answered and the loop thread ends before the interpreter tears down.
* at fork, in the child (``os.register_at_fork``): forget the default system
  (its loop thread does not exist in the child; the next use starts a new
  one) and replace the lock (a parent thread may have held it at fork time).

The client library's process-wide state (the daemon clients, the live
breakers) is in ``breakerd.clients._globals``. The daemon (``breakerd
serve``) is a program, not a library: its state lives in its ``Daemon``.
"""

from __future__ import annotations

import atexit
import os
import threading

from ._system import ActorSystem

__all__ = ["default_system"]

_default: ActorSystem | None = None
_default_lock = threading.Lock()


def default_system() -> ActorSystem:
    """The process-wide actor system that ``CircuitBreaker`` uses by default.

    Started on first use in a daemon thread and stopped at exit. A forked
    child gets a new one: the parent's thread does not survive ``fork``.
    """
    global _default
    system = _default
    if system is not None and system.pid == os.getpid() and system.running:
        return system
    with _default_lock:
        system = _default
        if system is None or system.pid != os.getpid() or not system.running:
            system = ActorSystem().start()
            _default = system
        return system


def _stop_default() -> None:
    system = _default
    if system is not None and system.pid == os.getpid():
        system.stop()


def _forget_default_in_child() -> None:
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


atexit.register(_stop_default)
os.register_at_fork(after_in_child=_forget_default_in_child)
