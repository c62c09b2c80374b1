"""The error tree: one base, documented in one place, no error that is never raised."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import threading
from pathlib import Path
from typing import Any

import pytest

import breakerd.actor
import breakerd.clients
import breakerd.protocol
from breakerd.actor import ActorSystem, BreakerConfig
from breakerd.actor._machine import IllegalTransitionError
from breakerd.actor.testing import FakeClock
from breakerd.protocol import Acquire, BreakerError
from breakerd.protocol import _errors as errors_module

ROOT = Path(__file__).resolve().parent.parent
# Control flow that never leaves its function, not errors: a stream's
# abandonment (a BaseException, like GeneratorExit) and the demo stand-in
# server's bad request, answered with a 400 where it is raised.
NOT_ERRORS = {"_Abandoned", "_BadRequest"}


def all_modules() -> list[Any]:
    modules = []
    for package in (breakerd.actor, breakerd.protocol, breakerd.clients):
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith(".__main__"):
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except ImportError:  # an optional extra (prometheus-client, redis) missing
                continue
    return modules


def defined_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module in all_modules():
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and name not in NOT_ERRORS
            ):
                found[name] = value
    return found


def test_every_error_breakerd_defines_derives_from_breaker_error() -> None:
    found = defined_exceptions()
    assert len(found) > 20  # the walk did find them
    assert sorted(name for name, cls in found.items() if not issubclass(cls, BreakerError)) == []


def test_the_errors_module_documents_every_error_in_its_tree() -> None:
    doc = errors_module.__doc__ or ""
    assert sorted(name for name in defined_exceptions() if name not in doc) == []


def test_errors_that_had_a_standard_base_keep_it() -> None:
    # Code that caught ValueError from the config loader (say) still does.
    found = defined_exceptions()
    assert issubclass(found["ConfigError"], ValueError)
    assert issubclass(found["StateFileError"], ValueError)
    assert issubclass(found["StateTableError"], ValueError)
    assert issubclass(found["StateTableUnavailableError"], OSError)
    assert issubclass(found["IllegalTransitionError"], RuntimeError)


def raised_names() -> set[str]:
    """Names of the exception classes some library module raises or builds."""
    names: set[str] = set()
    for folder in ("actor", "protocol", "clients"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    names.add(node.func.id)
                elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Name):
                    names.add(node.exc.id)
    return names


def test_every_error_is_raised_somewhere() -> None:
    # A class that is only ever a base (ProtocolError's two kinds are raised,
    # it is caught) or made from a wire code counts through its users.
    bases = {"BreakerError", "ProtocolError", "CircuitBreakerOpenError"}
    raised = raised_names()
    never = sorted(name for name in defined_exceptions() if name not in raised | bases)
    assert never == []


def ask(actor: Any, message: object) -> tuple[Any, BaseException | None]:
    answers: list[tuple[Any, BaseException | None]] = []
    answered = threading.Event()

    def reply(result: Any, error: BaseException | None) -> None:
        answers.append((result, error))
        answered.set()

    actor.ask(message, reply)
    assert answered.wait(10), "the actor never answered"
    return answers[0]


def test_an_illegal_transition_in_an_actor_is_a_crash_not_a_bad_request() -> None:
    # IllegalTransitionError is a BreakerError, and the actor answers a
    # BreakerError from its handler as the request's fault; a bug in the
    # machine must still restart the actor from its successor.
    system = ActorSystem(clock=FakeClock()).start()
    try:
        actor, _ = system.actor("svc", BreakerConfig())

        def broken(now: float) -> Any:
            raise IllegalTransitionError("breaker 'svc': illegal transition closed -> half_open")

        actor.machine.acquire = broken  # type: ignore[method-assign]
        _, error = ask(actor, Acquire("svc"))
        assert isinstance(error, BreakerError)
        assert "crashed" in str(error)
        assert actor.restarts == 1
        # A fresh machine serves the next request; the broken method went with the old one.
        admission, error = ask(actor, Acquire("svc"))
        assert error is None
        assert admission.admitted
    finally:
        system.stop()


@pytest.mark.parametrize("code", sorted(errors_module.ERROR_CODES))
def test_every_wire_code_comes_back_as_its_class(code: str) -> None:
    error = errors_module.error_from_code(code, "message", {"name": "svc"})
    assert error.code == code
    assert isinstance(error, BreakerError)
