"""The public API is ``breakerd.clients.__all__`` (and three submodules), and the README says so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import breakerd.actor
import breakerd.clients
import breakerd.protocol
from breakerd.protocol import _errors

README = Path(__file__).resolve().parent.parent / "README.md"

PUBLIC = {
    "CircuitBreaker",
    "CircuitState",
    "Snapshot",
    "BreakerStatus",
    "BudgetExceededError",
    "BudgetStatus",
    "BreakerConfig",
    "Transition",
    "TransitionReason",
    "OnUnavailable",
    "ActorSystem",
    "flush",
    "Outcome",
    "RateLimited",
    "Verdict",
    "ClassifyFunc",
    "BreakerError",
    "CircuitBreakerOpenError",
    "DaemonUnavailableError",
    "ActorStoppedError",
    "InboxFullError",
    "InvalidRequestError",
    "UnknownBreakerError",
    "LimitExceededError",
    "ProtocolError",
}


def test_the_public_api_is_small_and_exactly_these_names() -> None:
    assert set(breakerd.clients.__all__) == PUBLIC
    assert len(breakerd.clients.__all__) == len(PUBLIC) <= 25


def test_no_internal_class_is_public() -> None:
    for internal in ("DaemonClient", "RemoteBreaker", "Envelope", "Reply", "Classifier"):
        assert internal not in breakerd.clients.__all__
        with pytest.raises(AttributeError):
            getattr(breakerd.clients, internal)


def test_every_error_a_user_can_be_answered_with_is_public() -> None:
    # Every class a wire code maps back to, but the handshake's (the client
    # turns a version mismatch into an unavailable daemon).
    answers = {cls.__name__ for cls in _errors._BY_CODE.values()} - {"VersionMismatchError"}
    assert answers - set(breakerd.clients.__all__) == set()
    for name in answers:
        assert issubclass(getattr(breakerd.clients, name), breakerd.clients.BreakerError)


def test_the_documented_submodules_are_public() -> None:
    from breakerd.actor.testing import FakeClock as RuntimeClock
    from breakerd.clients import openai, testing

    assert testing.__all__ == ["FakeClock"]
    assert testing.FakeClock is RuntimeClock
    assert set(openai.__all__) == {"protect", "classify_openai", "parse_retry_after"}
    assert openai.parse_retry_after({"retry-after": "7"}) == 7.0


def test_the_fake_clock_lets_an_open_timeout_pass_without_sleeping() -> None:
    from breakerd.clients import ActorSystem, CircuitBreaker, CircuitBreakerOpenError, CircuitState
    from breakerd.clients.testing import FakeClock

    clock = FakeClock()
    system = ActorSystem(clock=clock).start()
    try:
        breaker = CircuitBreaker("svc", timeout=30.0, min_calls=1, system=system)
        with pytest.raises(ZeroDivisionError):
            breaker.call_sync(lambda: 1 / 0)
        assert breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitBreakerOpenError):
            breaker.call_sync(lambda: 1)
        clock.advance(30.0)
        assert breaker.call_sync(lambda: 2) == 2
        assert breaker.status().snapshot.state is CircuitState.CLOSED
    finally:
        system.stop()


@pytest.mark.parametrize("package", [breakerd.actor, breakerd.protocol])
def test_the_internal_packages_say_so(package: object) -> None:
    doc = " ".join((getattr(package, "__doc__", None) or "").split())
    assert "Internal" in doc
    assert "no stability promise" in doc
    assert "breakerd.clients" in doc


def readme_api_names() -> list[str]:
    text = README.read_text()
    section = text.split("### The public API", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([A-Za-z_]+)` \|", section, flags=re.MULTILINE)


def test_the_readme_documents_exactly_the_public_names() -> None:
    names = readme_api_names()
    assert len(names) == len(set(names))
    assert set(names) == set(breakerd.clients.__all__)
