"""The test suite on every CPython the package supports: ``nox`` (``.ci/run`` runs it).

The README's own test command runs the suite on the interpreter of the
project's virtual environment (3.11); these sessions run it again on the
newest CPython the machine has, installed the way a user would install it.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

#: The oldest supported version runs in .ci/run's own environment; nox adds the newest.
NEWEST = "3.13"


@nox.session(python=[NEWEST])
def tests(session: nox.Session) -> None:
    # dev: every extra the tests exercise, so none of them skips for want of one.
    session.install("-e", ".[dev]", "--config-settings", "editable_mode=strict")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)
