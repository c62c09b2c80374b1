"""The public API as a user writes it, for ``mypy --strict tests`` (never run).

Modelled on stamina's ``tests/typing/api.py``: each ``assert_type`` pins a
type users rely on (the generic returns of ``call``/``call_sync`` and of the
decorator, ``state``, ``status()``...), and each ``type: ignore[code]`` is a
misuse mypy must reject: under ``--strict`` an ignore that stops being
needed is itself an error (``warn_unused_ignores``), so a loosened signature
fails the check as surely as a wrong one. Only ``breakerd.clients``'s public
names and its documented submodules appear here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_type

from breakerd.clients import (
    ActorStoppedError,
    ActorSystem,
    BreakerConfig,
    BreakerError,
    BreakerStatus,
    BudgetStatus,
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    ClassifyFunc,
    DaemonUnavailableError,
    InboxFullError,
    InvalidRequestError,
    LimitExceededError,
    OnUnavailable,
    Outcome,
    ProtocolError,
    RateLimited,
    Snapshot,
    Transition,
    TransitionReason,
    UnknownBreakerError,
    Verdict,
    flush,
)
from breakerd.clients.openai import classify_openai, parse_retry_after
from breakerd.clients.testing import FakeClock


async def ask_model(prompt: str, *, temperature: float = 0.0) -> str:
    return prompt


def read_row(key: int) -> bytes:
    return b""


async def fallback_answer(prompt: str, *, temperature: float = 0.0) -> str:
    return "later"


def make_breakers() -> tuple[CircuitBreaker, CircuitBreaker]:
    embedded = CircuitBreaker(
        "LLM",
        failure_threshold=0.5,
        timeout=30.0,
        min_calls=5,
        fallback=fallback_answer,
        half_open_calls=1,
    )
    policy: OnUnavailable = "deny"
    shared = CircuitBreaker("db", daemon=True, on_unavailable=policy, daemon_timeout=0.25)
    CircuitBreaker("x", on_unavailable="maybe")  # type: ignore[arg-type]
    CircuitBreaker("x", daemon=3)  # type: ignore[arg-type]
    CircuitBreaker("m", scope="model", scope_budgets={"gpt-4o": {"max_rate": "500/min"}})
    CircuitBreaker("m", scope="model", scope_budgets=lambda key: {"max_concurrent": 2})
    CircuitBreaker("m", scope="model", scope_budgets=lambda key: None)
    CircuitBreaker("m", scope="model", scope_budgets=["gpt-4o"])  # type: ignore[arg-type]
    return embedded, shared


async def calls(breaker: CircuitBreaker) -> None:
    # The result type follows the protected function, arguments included.
    assert_type(await breaker.call(ask_model, "hi", temperature=0.2), str)
    assert_type(breaker.call_sync(read_row, 7), bytes)
    await breaker.call(ask_model, 42)  # type: ignore[arg-type]
    breaker.call_sync(read_row, "7")  # type: ignore[arg-type]
    breaker.call_sync(read_row, 7, extra=True)  # type: ignore[call-arg]


def decorators(breaker: CircuitBreaker) -> None:
    @breaker
    async def summarize(text: str, limit: int = 100) -> list[str]:
        return [text[:limit]]

    @breaker
    def lookup(key: int) -> dict[str, int]:
        return {"key": key}

    async def use() -> None:
        assert_type(await summarize("text", limit=5), list[str])

    assert_type(lookup(1), dict[str, int])
    lookup("1")  # type: ignore[arg-type]
    del use


def state_and_status(breaker: CircuitBreaker) -> None:
    assert_type(breaker.state, CircuitState)
    assert_type(breaker.snapshot, Snapshot)
    assert_type(breaker.snapshot.state, CircuitState)
    assert_type(breaker.snapshot.reason, str | None)
    assert_type(breaker.status(), BreakerStatus)
    assert_type(breaker.status().failures, int)
    assert_type(breaker.status().budget, BudgetStatus | None)
    assert_type(breaker.config, BreakerConfig)
    assert_type(breaker.config_conflicts, tuple[str, ...])
    assert_type(breaker.force_open(), CircuitState)
    assert_type(breaker.disable(), CircuitState)
    assert_type(breaker.reset(), CircuitState)
    assert_type(breaker.scoped("gpt-4o"), CircuitBreaker)
    assert_type(flush(), None)


async def observers(breaker: CircuitBreaker) -> None:
    def on_change(transition: Transition) -> None:
        assert_type(transition.reason, TransitionReason)
        assert_type(transition.to_state, CircuitState)
        if transition.reason is TransitionReason.FAILURE_RATE_EXCEEDED:
            assert_type(transition.failure_rate, float | None)

    unsubscribe = breaker.on_transition(on_change)
    assert_type(unsubscribe, Callable[[], None])
    async for transition in breaker.transitions():
        assert_type(transition, Transition)


def classifiers() -> None:
    def classify(exc: BaseException) -> Verdict | None:
        if isinstance(exc, TimeoutError):
            return Outcome.FAILURE
        if isinstance(exc, LookupError):
            return RateLimited(retry_after=5.0, reason="quota", error_code="insufficient_quota")
        return None

    rule: ClassifyFunc = classify
    CircuitBreaker("svc", classify=rule, record=(OSError,), ignore=(KeyError,))
    CircuitBreaker("svc", classify=lambda exc: "failure")  # type: ignore[arg-type,return-value]
    assert_type(classify_openai(ValueError()), tuple[Outcome, float | None] | None)
    assert_type(parse_retry_after({"retry-after": "2"}), float | None)


def errors(breaker: CircuitBreaker) -> None:
    try:
        breaker.call_sync(read_row, 1)
    except CircuitBreakerOpenError as rejected:
        assert_type(rejected.name, str)
        assert_type(rejected.retry_after, float | None)
        assert_type(rejected.reason, str | None)
        assert_type(rejected.state, str)
    except (
        DaemonUnavailableError,
        ActorStoppedError,
        InboxFullError,
        InvalidRequestError,
        UnknownBreakerError,
        LimitExceededError,
        ProtocolError,
    ) as other:
        assert_type(other.code, str)
    except BreakerError:
        pass


def internal_names_are_not_public() -> None:
    import breakerd.clients

    _ = breakerd.clients.DaemonClient  # type: ignore[attr-defined]
    _ = breakerd.clients.RemoteBreaker  # type: ignore[attr-defined]


def testing_clock() -> None:
    clock = FakeClock()
    assert_type(clock(), float)
    assert_type(clock.advance(30.0), float)
    system = ActorSystem(clock=clock).start()
    CircuitBreaker("svc", system=system)
    system.stop()
