"""The codebase's shape: modules of one sitting, no reach into another module's privates.

Read as text (``ast``), so these hold for every module whether or not a test
imports it. They fail with the offending places named.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actor", "protocol", "clients")
#: A module a reader takes in at one sitting; past this, split it by responsibility.
MAX_MODULE_LINES = 700
#: Other libraries' private names we use on purpose, and why.
THIRD_PARTY_PRIVATES = {
    # typeshed names argparse's subparsers type only under this name.
    "argparse._SubParsersAction",
    # The SDK's own status -> exception mapping, so a transport-level failure
    # is classified exactly as the SDK would raise it (openai is pinned to one major).
    "client._make_status_error_from_response",
    # The SDK's retry loop has no public hook; it is replaced on a private copy
    # of the user's client so that the SDK's own retries stop at an open breaker.
    "client._sleep_for_retry",
    # The SDK's one place that sends an HTTP attempt (no public hook sees the
    # response of every attempt, retries and 429s included, on a private copy
    # of the user's client): its x-ratelimit-* headers feed the budgets.
    "client._send_request",
}


def library_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _names_defined_here(tree: ast.Module) -> set[str]:
    """Private names this module owns: its functions, classes, attributes and globals."""
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            # Only its own: ``other._x = ...`` is a reach-in, not a definition.
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.alias):
            defined.add((node.asname or node.name).split(".")[0])
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.isidentifier()
        ):
            # __slots__ entries name attributes this module's classes own.
            defined.add(node.value)
    return defined


def _is_module(package_dir: Path, level: int, module: str | None, name: str) -> bool:
    base = package_dir
    for _ in range(level - 1):
        base = base.parent
    if module:
        base = base.joinpath(*module.split("."))
    return (base / f"{name}.py").exists() or (base / name / "__init__.py").exists()


def reach_ins(path: Path, root: Path = ROOT) -> Iterator[str]:
    """``other._x`` where this module defines no ``_x``; ``from .m import _x`` of a non-module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    defined = _names_defined_here(tree)
    where = path.relative_to(root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if node.attr not in defined and ast.unparse(node) not in THIRD_PARTY_PRIVATES:
                yield f"{where}:{node.lineno}: reads {ast.unparse(node)}"
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            for alias in node.names:
                if _private(alias.name) and not _is_module(
                    path.parent, node.level, node.module, alias.name
                ):
                    yield f"{where}:{node.lineno}: imports {alias.name} from {node.module}"


def test_no_module_reaches_into_another_modules_privates() -> None:
    found = [line for path in library_modules() for line in reach_ins(path)]
    assert found == [], "cross-module private access:\n" + "\n".join(found)


#: Modules still being split, with the length they may not pass meanwhile.
BEING_SPLIT: dict[str, int] = {}


def test_every_library_module_reads_in_one_sitting() -> None:
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in library_modules()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    grown = {name: n for name, n in too_long.items() if n > BEING_SPLIT.get(name, MAX_MODULE_LINES)}
    assert grown == {}


@pytest.mark.parametrize(
    "source",
    [
        "class A:\n    def f(self, other):\n        return other._secret\n",
        "from ._machine import _helper\n",
        "def arm(link):\n    link._flush_armed = True\n",
    ],
)
def test_the_reach_in_check_sees_a_reach_in(tmp_path: Path, source: str) -> None:
    module = tmp_path / "actor" / "m.py"
    module.parent.mkdir()
    module.write_text(source)
    found = list(reach_ins(module, tmp_path))
    assert len(found) == 1
