"""The one handle the facade holds (``clients/_handle.py``): each kind answers ``admit()``
as its snapshot says, and the facade never asks which kind it holds."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
from fake_daemon import (  # noqa: F401 - fixtures, found by pytest under their own names
    FakeDaemon,
    close_clients_after,
    fake_daemon,
    ok_sync,
    sock_dir_fixture,
    sock_path_fixture,
)

from breakerd.actor import ActorSystem
from breakerd.actor.daemon._state_table import SharedStateTable
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState
from breakerd.clients._link import RemoteBreaker
from breakerd.clients._plan import plain_generation
from breakerd.protocol import Snapshot

ROOT = Path(__file__).resolve().parent.parent
#: The facade: CircuitBreaker and both call paths.
FACADE = ("clients/_breaker.py", "clients/_calls_async.py", "clients/_calls_sync.py")
#: What the facade must not name: it holds a BreakerHandle and never asks which.
KINDS = {
    "BreakerActor",
    "RemoteBreaker",
    "LocalBinding",
    "DaemonBinding",
    "Fallback",
    "LocalFallback",
    "AllowFallback",
    "DenyFallback",
}


def test_the_facade_has_no_mode_branches() -> None:
    found = []
    for relative in FACADE:
        tree = ast.parse((ROOT / relative).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in KINDS:
                found.append(f"{relative}:{node.lineno} names {node.id}")
            if isinstance(node, (ast.If, ast.IfExp, ast.Compare, ast.BoolOp)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Attribute) and inner.attr == "daemon_path":
                        found.append(f"{relative}:{node.lineno} branches on daemon_path")
    assert found == []


def test_the_embedded_actor_admits_as_its_snapshot_says(system: ActorSystem) -> None:
    breaker = CircuitBreaker("svc", system=system)
    actor = breaker._actor
    assert actor.admit() == actor.snapshot.generation
    breaker.force_open()
    assert actor.admit() is None
    assert actor.seen is actor.snapshot
    assert actor.seen.state is CircuitState.FORCED_OPEN
    breaker.disable()
    assert actor.admit() is None
    breaker.reset()
    assert actor.admit() == actor.snapshot.generation == plain_generation(actor.snapshot)
    timed = CircuitBreaker("timed", system=system, slow_call_duration=1.0)
    assert timed._actor.snapshot.state is CircuitState.CLOSED
    assert timed._actor.admit() is None  # a timed call takes the slow path


def test_the_daemon_link_admits_from_the_state_table(daemon: FakeDaemon) -> None:
    # No push and no reply: only the shared table says the breaker opened, and
    # the link's admit() (the fast path's one look) sees it as its snapshot does.
    daemon.table = SharedStateTable(16)
    breaker = CircuitBreaker("svc", daemon=daemon.path, min_calls=1)
    link = breaker._actor
    assert isinstance(link, RemoteBreaker)
    assert breaker.call_sync(ok_sync) == 1  # the first use registers it
    generation = link.snapshot.generation
    assert link.admit() == generation
    opened = Snapshot("svc", CircuitState.OPEN, generation + 1, open_until=time.monotonic() + 30)
    # The client's lock held: its IO thread could not apply a push even if one came.
    with link.client._lock:
        daemon.write_table(opened)
        assert link.admit() is None
        # The slow path decides on the snapshot that answer came from.
        assert (link.seen.state, link.seen.generation) == (CircuitState.OPEN, generation + 1)
        with pytest.raises(CircuitBreakerOpenError):
            breaker.call_sync(ok_sync)
        daemon.write_table(Snapshot("svc", CircuitState.CLOSED, generation + 2))
        assert link.admit() == generation + 2
        assert link.admit() == plain_generation(link.snapshot)
