"""The budgets' sync paths are generated from their async sources, and cannot drift.

``scripts/unasync.py`` writes every sync module of a pair from its async
source; ``--check`` (``.ci/run`` and this file) fails when a sync module is
not what its source generates.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "unasync.py"

#: (async source, generated sync module) of the budgets.
BUDGET_PAIRS = [
    ("clients/_admit_async.py", "clients/_admit_sync.py"),
    ("clients/_budgeted_async.py", "clients/_budgeted_sync.py"),
]


def _unasync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_check_covers_the_budgets_pairs() -> None:
    pairs = {(pair.source, pair.target) for pair in _unasync().PAIRS}
    assert set(BUDGET_PAIRS) <= pairs
    assert ("clients/_calls_async.py", "clients/_calls_sync.py") in pairs


def test_every_generated_module_is_what_its_source_generates() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("source", "target"), BUDGET_PAIRS)
def test_an_edit_to_one_side_only_fails_the_check(tmp_path: Path, source: str, target: str) -> None:
    # A copy of the tree's pairs, with the sync side edited by hand.
    unasync = _unasync()
    for pair in unasync.PAIRS:
        for name in (pair.source, pair.target):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, tmp_path / name)
    assert unasync.stale(tmp_path) == []
    edited = tmp_path / target
    edited.write_text(edited.read_text().replace("deadline", "dead_line", 1))
    found = unasync.stale(tmp_path)
    assert len(found) == 1
    assert target in found[0]
    assert f"edit {source} only" in found[0]
