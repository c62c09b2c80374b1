"""No module of the library reaches into another module's private attributes.

Modules talk through small public methods (DESIGN.md). This reads the
source, not the running code: for each module of ``clients/``, every
``obj._name`` (``obj`` not ``self`` or ``cls``) whose ``_name`` this module
does not define, but another module of the package does, is a reach-in; so
is importing a private name from another module. A name both modules
define passes (the check cannot tell the classes apart without types), so
it catches the usual slip -- a new reach-in under a name only its owner
uses -- not every one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("actor", "protocol", "clients")
CHECKED_DIR = "clients"
#: Reach-ins known and left to their module's owner: the daemon demo borrows
#: the embedded demo's helpers. Remove an entry once its reach-in is gone.
KNOWN = (
    "clients/cli/_demo_daemon.py: imports _DEADLINE_MARGIN",
    "clients/cli/_demo_daemon.py: imports _drop_event",
    "clients/cli/_demo_daemon.py: imports _Printer",
)


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined(tree: ast.Module) -> set[str]:
    """Private names a module defines: its own attributes, slots, methods, functions, globals."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries, and getattr() by name
    return {name for name in names if _private(name)}


def _reach_ins(path: Path, tree: ast.Module, elsewhere: set[str]) -> Iterator[str]:
    own = _defined(tree)
    where = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if node.attr not in own and node.attr in elsewhere:
                yield f"{where}: .{node.attr} (line {node.lineno})"
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                if _private(alias.name):
                    yield f"{where}: imports {alias.name} (line {node.lineno})"


def _trees(folders: tuple[str, ...]) -> dict[Path, ast.Module]:
    return {
        path: ast.parse(path.read_text(), str(path))
        for folder in folders
        for path in _modules(folder)
    }


def test_no_module_in_clients_reaches_into_another_modules_privates() -> None:
    trees = _trees(PACKAGE_DIRS)
    defined = {path: _defined(tree) for path, tree in trees.items()}
    found: list[str] = []
    for path, tree in trees.items():
        if not path.is_relative_to(ROOT / CHECKED_DIR):
            continue
        elsewhere = set().union(*(names for other, names in defined.items() if other != path))
        found.extend(_reach_ins(path, tree, elsewhere))
    assert [f for f in found if not f.startswith(KNOWN)] == []


@pytest.mark.parametrize(
    "source",
    [
        "def f(client):\n    client._flush_armed = True\n",
        "def f(core):\n    return core._pending\n",
        "from ._core import _SUCCESS\n",
    ],
)
def test_the_check_sees_a_reach_in(source: str) -> None:
    tree = ast.parse(source)
    reach_ins = list(_reach_ins(ROOT / CHECKED_DIR / "x.py", tree, {"_flush_armed", "_pending"}))
    assert len(reach_ins) == 1
