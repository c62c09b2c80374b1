"""Write the sync call path (``clients/_calls_sync.py``) from the async one.

``clients/_calls_async.py`` is the source: ``CircuitBreaker.call`` and its
slow path. The sync twin is the same code with the waits taken out, made by
the substitutions below (encode/httpcore's ``unasync.py`` is the model).

    python scripts/unasync.py           # rewrite the sync file
    python scripts/unasync.py --check   # fail (exit 1, with a diff) if it is stale

Edit the async file only; ``.ci/run`` and the test suite run ``--check``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "clients" / "_calls_async.py"
TARGET = ROOT / "clients" / "_calls_sync.py"

#: Whole identifiers, renamed wherever they appear.
NAMES = {
    "AsyncCalls": "SyncCalls",
    "_call_slow_path": "_call_sync_slow_path",
    "_settle_async": "_settle_sync",
    "_request_async": "_request_sync",
    "_reject_async": "_reject_sync",
}

#: Exact text, in this order (the public method's name and docstrings).
PHRASES = [
    (
        '"""The async call path of ``CircuitBreaker``."""',
        '"""The sync call path of ``CircuitBreaker``."""',
    ),
    ("async def call(", "def call_sync("),
    ("Callable[P, Awaitable[T]]", "Callable[P, T]"),
    ("Callable[..., Awaitable[T]]", "Callable[..., T]"),
    ("from collections.abc import Awaitable, Callable", "from collections.abc import Callable"),
    ("under the breaker.\n", "under the breaker from any thread, no loop needed.\n"),
    (
        "instead (awaited\n        if it returns an awaitable).",
        "instead (it must\n        not return an awaitable here).",
    ),
]

#: The colour itself.
KEYWORDS = [
    (re.compile(r"\basync def\b"), "def"),
    (re.compile(r"\bawait "), ""),
]

_NAME_PATTERN = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b")


#: The generated module's docstring, in place of the source's.
DOCSTRING = '''"""``CircuitBreaker.call_sync``: the sync call path.

Generated from ``_calls_async.py`` (``CircuitBreaker.call``) by
``scripts/unasync.py``: edit that file, never this one. The decisions live in
``_plan``; the waiting is ``CircuitBreaker._request_sync``.
"""
'''


def unasync(text: str) -> str:
    """The sync twin of the async source ``text``."""
    if not text.startswith('"""'):
        raise SystemExit("unasync: the source must start with its module docstring")
    text = DOCSTRING + text[text.index('"""', 3) + 4 :]
    for old, new in PHRASES:
        if old not in text:
            raise SystemExit(f"unasync: the source no longer contains {old!r}; update PHRASES")
        text = text.replace(old, new)
    text = _NAME_PATTERN.sub(lambda match: NAMES[match.group(1)], text)
    for pattern, new in KEYWORDS:
        text = pattern.sub(new, text)
    header = (
        f"# Generated from {SOURCE.name} by scripts/unasync.py: do not edit.\n"
        "# Edit the async source and run `python scripts/unasync.py`.\n"
    )
    return _formatted(header + text)


def _formatted(text: str) -> str:
    # Taking the waits out shortens lines: ruff joins what now fits, so the
    # generated file passes `ruff format --check` like every other.
    ruff = Path(sys.executable).with_name("ruff")
    command = str(ruff) if ruff.exists() else shutil.which("ruff")
    if command is None:
        raise SystemExit("unasync: ruff is needed to format the generated file (pip install ruff)")
    done = subprocess.run(
        [command, "format", "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"unasync: ruff format failed:\n{done.stderr}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if the sync file differs from the generated one"
    )
    args = parser.parse_args(argv)
    expected = unasync(SOURCE.read_text())
    if args.check:
        actual = TARGET.read_text() if TARGET.exists() else ""
        if actual == expected:
            return 0
        diff = difflib.unified_diff(
            actual.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            f"{TARGET.relative_to(ROOT)} (as is)",
            f"{TARGET.relative_to(ROOT)} (generated from {SOURCE.relative_to(ROOT)})",
        )
        sys.stderr.write("".join(diff))
        sys.stderr.write(
            f"\n{TARGET.relative_to(ROOT)} is not what {SOURCE.relative_to(ROOT)} generates: "
            "edit the async source only, then run `python scripts/unasync.py`\n"
        )
        return 1
    TARGET.write_text(expected)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
