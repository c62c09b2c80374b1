"""Write the sync code paths from their async sources (``PAIRS``).

Each async module is the source of a sync one: ``clients/_calls_async.py``
(``CircuitBreaker.call`` and its slow path), ``clients/_admit_async.py``
(``Budgets.admit_async``), ``clients/_budgeted_async.py`` (a call with
budgets), ``clients/_budget_link_async.py`` (``DaemonBudgets.admit_async``,
the host's budgets) and ``clients/_scope_first_async.py`` (a breaker's call
with scopes). The sync twin is the same code with the waits taken out, made by
the substitutions below (encode/httpcore's ``unasync.py`` is the model);
what really differs between the colours stays in small named methods the
tables rename (``_await_turn`` -> ``_wait_turn``).

    python scripts/unasync.py           # rewrite every sync file
    python scripts/unasync.py --check   # fail (exit 1, with a diff) if one is stale

Edit the async files only; ``.ci/run`` and the test suite run ``--check``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Pair:
    """An async source and the sync module written from it.

    ``names``: whole identifiers, renamed wherever they appear. ``phrases``:
    exact text, replaced in this order (public names, docstrings, types);
    each must be in the source, so a stale table fails loudly.
    ``docstring``: the generated module's, in place of the source's.
    """

    source: str
    target: str
    names: dict[str, str]
    phrases: list[tuple[str, str]]
    docstring: str


#: Every pair; ``--check`` checks them all.
PAIRS = [
    Pair(
        source="clients/_calls_async.py",
        target="clients/_calls_sync.py",
        names={
            "AsyncCalls": "SyncCalls",
            "_call_slow_path": "_call_sync_slow_path",
            "_settle_async": "_settle_sync",
            "_request_async": "_request_sync",
            "_reject_async": "_reject_sync",
        },
        phrases=[
            (
                '"""The async call path of ``CircuitBreaker``."""',
                '"""The sync call path of ``CircuitBreaker``."""',
            ),
            ("async def call(", "def call_sync("),
            ("Callable[P, Awaitable[T]]", "Callable[P, T]"),
            ("Callable[..., Awaitable[T]]", "Callable[..., T]"),
            (
                "from collections.abc import Awaitable, Callable",
                "from collections.abc import Callable",
            ),
            ("under the breaker.\n", "under the breaker from any thread, no loop needed.\n"),
            (
                "instead (awaited\n        if it returns an awaitable).",
                "instead (it must\n        not return an awaitable here).",
            ),
        ],
        docstring='''"""``CircuitBreaker.call_sync``: the sync call path.

Generated from ``_calls_async.py`` (``CircuitBreaker.call``) by
``scripts/unasync.py``: edit that file, never this one. The decisions live in
``_plan``; the waiting is ``CircuitBreaker._request_sync``.
"""
''',
    ),
    Pair(
        source="clients/_admit_async.py",
        target="clients/_admit_sync.py",
        names={
            "AsyncAdmission": "SyncAdmission",
            "admit_async": "admit_sync",
            "_lease_async": "_lease_sync",
            "_asleep": "_sleep",
            "_await_turn": "_wait_turn",
        },
        phrases=[
            (
                '"""The async admission of ``Budgets``."""',
                '"""The sync admission of ``Budgets``."""',
            ),
        ],
        docstring='''"""``Budgets.admit_sync``: waiting for admission, from any thread.

Generated from ``_admit_async.py`` (``Budgets.admit_async``) by
``scripts/unasync.py``: edit that file, never this one. The waiting is
``Budgets._sleep`` and ``Budgets._wait_turn``.
"""
''',
    ),
    Pair(
        source="clients/_budgeted_async.py",
        target="clients/_budgeted_sync.py",
        names={
            "AsyncBudgetedCalls": "SyncBudgetedCalls",
            "call_async": "call_sync",
            "_call_waiting_async": "_call_waiting_sync",
            "admit_async": "admit_sync",
            "asleep": "sleep",
            "ramp_slot_async": "ramp_slot",
        },
        phrases=[
            (
                '"""The async call path of ``BudgetedCalls``."""',
                '"""The sync call path of ``BudgetedCalls``."""',
            ),
            ("Callable[..., Awaitable[Any]]", "Callable[..., Any]"),
            (
                "from collections.abc import Awaitable, Callable",
                "from collections.abc import Callable",
            ),
        ],
        docstring='''"""``BudgetedCalls.call_sync``: a call with budgets, from any thread.

Generated from ``_budgeted_async.py`` (``BudgetedCalls.call_async``) by
``scripts/unasync.py``: edit that file, never this one. The waiting is
``Budgets.sleep`` and ``Budgets.admit_sync``.
"""
''',
    ),
    Pair(
        source="clients/_budget_link_async.py",
        target="clients/_budget_link_sync.py",
        names={
            "AsyncDaemonAdmission": "SyncDaemonAdmission",
            "admit_async": "admit_sync",
            "ramp_slot_async": "ramp_slot",
            "_slot_async": "_slot_sync",
            "_lease_remote_async": "_lease_remote_sync",
            "_ask_async": "_ask_sync",
            "_next_slot_async": "_next_slot_sync",
            "answer_within": "timeout",
            "asleep": "sleep",
        },
        phrases=[
            (
                '"""The async admission of ``DaemonBudgets``."""',
                '"""The sync admission of ``DaemonBudgets``."""',
            ),
        ],
        docstring='''"""``DaemonBudgets.admit_sync``: the host's slots and leases, from any thread.

Generated from ``_budget_link_async.py`` (``DaemonBudgets.admit_async``) by
``scripts/unasync.py``: edit that file, never this one. The waiting is
``DaemonBudgets._ask_sync``, ``DaemonBudgets._next_slot_sync`` and
``Budgets.sleep``.
"""
''',
    ),
    Pair(
        source="clients/_scope_first_async.py",
        target="clients/_scope_first_sync.py",
        names={
            "AsyncScopedCalls": "SyncScopedCalls",
            "AsyncCalls": "SyncCalls",
            "_calls_async": "_calls_sync",
            "call": "call_sync",
            "call_async": "call_sync",
            "_call_scoped": "_call_sync_scoped",
            "_run_scoped": "_run_scoped_sync",
            "_call_scope_first": "_call_sync_scope_first",
            "_reject_async": "_reject_sync",
            "_refuse_async": "_refuse_sync",
            "scope_first_async": "scope_first_sync",
            "_stage_async": "_stage_sync",
        },
        phrases=[
            (
                '"""The async paths of a ``CircuitBreaker`` with scopes."""',
                '"""The sync paths of a ``CircuitBreaker`` with scopes."""',
            ),
            ("Callable[..., Awaitable[T]]", "Callable[..., T]"),
            ("Callable[..., Awaitable[Any]]", "Callable[..., Any]"),
            (
                "from collections.abc import Awaitable, Callable",
                "from collections.abc import Callable",
            ),
        ],
        docstring='''"""``CircuitBreaker.call_sync`` with scopes: scope first, from any thread.

Generated from ``_scope_first_async.py`` (``CircuitBreaker.call`` with
scopes) by ``scripts/unasync.py``: edit that file, never this one.
"""
''',
    ),
]

#: The colour itself.
KEYWORDS = [
    (re.compile(r"\basync def\b"), "def"),
    (re.compile(r"\bawait "), ""),
]


def unasync(pair: Pair, text: str) -> str:
    """The sync twin of ``pair``'s async source ``text``."""
    if not text.startswith('"""'):
        raise SystemExit(f"unasync: {pair.source} must start with its module docstring")
    text = text[text.index('"""', 3) + 4 :]  # the pair's docstring replaces it, as written
    for old, new in pair.phrases:
        if old not in text:
            raise SystemExit(f"unasync: {pair.source} no longer contains {old!r}; update PAIRS")
        text = text.replace(old, new)
    names = re.compile(r"\b(" + "|".join(map(re.escape, pair.names)) + r")\b")
    text = names.sub(lambda match: pair.names[match.group(1)], text)
    for pattern, new in KEYWORDS:
        text = pattern.sub(new, text)
    header = (
        f"# Generated from {Path(pair.source).name} by scripts/unasync.py: do not edit.\n"
        "# Edit the async source and run `python scripts/unasync.py`.\n"
    )
    return _formatted(header + pair.docstring + text, pair.target)


def _formatted(text: str, target: str) -> str:
    # Taking the waits out shortens lines: ruff joins what now fits, so the
    # generated file passes `ruff format --check` like every other.
    ruff = Path(sys.executable).with_name("ruff")
    command = str(ruff) if ruff.exists() else shutil.which("ruff")
    if command is None:
        raise SystemExit("unasync: ruff is needed to format the generated file (pip install ruff)")
    done = subprocess.run(
        [command, "format", "--stdin-filename", str(ROOT / target), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"unasync: ruff format failed:\n{done.stderr}")
    return done.stdout


def stale(root: Path = ROOT) -> list[str]:
    """The generated modules under ``root`` that differ from their sources, with a diff each."""
    found = []
    for pair in PAIRS:
        expected = unasync(pair, (root / pair.source).read_text())
        target = root / pair.target
        actual = target.read_text() if target.exists() else ""
        if actual == expected:
            continue
        diff = difflib.unified_diff(
            actual.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            f"{pair.target} (as is)",
            f"{pair.target} (generated from {pair.source})",
        )
        found.append(
            "".join(diff) + f"\n{pair.target} is not what {pair.source} generates: "
            f"edit {pair.source} only, then run `python scripts/unasync.py`\n"
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if a sync file differs from the generated one"
    )
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        sys.stderr.write("".join(found))
        return 1 if found else 0
    for pair in PAIRS:
        (ROOT / pair.target).write_text(unasync(pair, (ROOT / pair.source).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
