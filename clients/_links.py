"""The links attached to a daemon client, and what the client tells them.

A link (``_link.RemoteBreaker``) attaches to its ``DaemonClient``; the client
re-registers it on every connection and calls it back only through
``LinkEvents``. ``run_actions`` runs what the client's core hands back after
a read: reply callbacks, and new snapshots for the links of that breaker.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

from breakerd.actor import BreakerConfig
from breakerd.protocol import Snapshot

from ._core import Action, Completion, Reply

__all__ = ["LinkEvents", "LinkSet", "run_actions"]


class LinkEvents(Protocol):
    """What a ``DaemonClient`` needs of a link attached to it.

    The client calls these from the thread reading the socket (or the one
    giving up on it), outside its lock.
    """

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> BreakerConfig: ...

    def registration(self, epoch: int) -> Reply:
        """The reply to this link's ``Register`` on connection ``epoch``."""
        ...

    def daemon_snapshot(self, snapshot: Snapshot) -> None:
        """The daemon's newest snapshot of this breaker (a reply or a push)."""
        ...

    def daemon_lost(self, *, announce: bool) -> None:
        """The connection is gone: the policy serves (``announce``: tell the listeners)."""
        ...

    def suspend(self) -> None:
        """The daemon stopped answering: the policy serves, the registration stays."""
        ...

    def resume(self) -> None:
        """The daemon answers again after ``suspend``."""
        ...


class LinkSet:
    """The links of one client by breaker name, held weakly (an unused link goes away).

    Guarded by the client's lock: a link added under it either sees the
    connection and registers itself, or is listed by the next connection.
    """

    __slots__ = ("_by_name", "_lock")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._by_name: dict[str, weakref.WeakSet[LinkEvents]] = {}

    def add_locked(self, link: LinkEvents) -> None:
        self._by_name.setdefault(link.name, weakref.WeakSet()).add(link)

    def discard(self, link: LinkEvents) -> None:
        with self._lock:
            links = self._by_name.get(link.name)
            if links is not None:
                links.discard(link)

    def listed_locked(self) -> list[LinkEvents]:
        return [link for links in self._by_name.values() for link in links]

    def listed(self) -> list[LinkEvents]:
        with self._lock:
            return self.listed_locked()

    def named(self, name: str) -> list[LinkEvents]:
        with self._lock:
            links = self._by_name.get(name)
            return list(links) if links is not None else []

    def daemon_lost(self, *, announce: bool) -> None:
        for link in self.listed():
            link.daemon_lost(announce=announce)

    def suspend(self) -> None:
        for link in self.listed():
            link.suspend()

    def resume(self) -> None:
        for link in self.listed():
            link.resume()


def run_actions(actions: list[Action], links: LinkSet, log: Any) -> None:
    """Run what the core returned, in order, outside the client's lock.

    A failing callback is logged and the rest still run. An interrupt
    (a reader in the main thread) runs this action again -- it may have come
    before the action started, and replies are idempotent -- and the rest,
    which are other callers' replies, then goes on.
    """
    for index, action in enumerate(actions):
        try:
            _run(action, links)
        except Exception:
            log.exception("daemon_callback_failed")
        except BaseException:
            try:
                _run(action, links)
            except BaseException:
                log.exception("daemon_callback_failed")
            run_actions(actions[index + 1 :], links, log)
            raise


def _run(action: Action, links: LinkSet) -> None:
    if isinstance(action, Completion):
        action.run()
    else:
        for link in links.named(action.snapshot.name):
            link.daemon_snapshot(action.snapshot)
