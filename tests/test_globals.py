"""Process-wide state lives in one labelled module per layer, hooks included.

What the hooks do is tested where it matters: a forked child gets its own
actor (test_breaker.py) and its own daemon connection, every outcome is
flushed at exit (test_daemon_client.py), multiprocessing children included
(test_client_lifecycle.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from breakerd.actor import _globals as actor_globals
from breakerd.clients import _globals as clients_globals

ROOT = Path(__file__).resolve().parent.parent
GLOBALS = {ROOT / "actor" / "_globals.py", ROOT / "clients" / "_globals.py"}
# Calls that install process-wide hooks.
HOOKS = {"register_at_fork", "register", "Finalize"}


def library_files() -> list[Path]:
    return sorted(
        p for folder in ("actor", "protocol", "clients") for p in (ROOT / folder).rglob("*.py")
    )


def test_hooks_and_global_statements_are_only_in_the_globals_modules() -> None:
    found = []
    for path in library_files():
        if path in GLOBALS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Global):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: global {node.names}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in HOOKS
                and ast.unparse(node.func.value) in ("os", "atexit", "multiprocessing.util")
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node.func)}")
    assert found == []


@pytest.mark.parametrize("module", [actor_globals, clients_globals])
def test_the_globals_module_lists_each_piece_of_state_it_holds(module: object) -> None:
    path = Path(getattr(module, "__file__", ""))
    doc = getattr(module, "__doc__", None) or ""
    state = []
    for node in ast.parse(path.read_text()).body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        state += [t.id for t in targets if isinstance(t, ast.Name) and t.id != "__all__"]
    assert state
    assert [name for name in state if f"``{name}``" not in doc] == []
