"""Scopes: a child breaker per model (or any key) under a parent per API key.

In-process, on a hand-advanced clock, with the real openai SDK talking to a
scripted ``httpx2.MockTransport``: nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
import structlog.testing

from breakerd.actor.testing import FakeClock
from breakerd.clients import (
    ActorSystem,
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
)

pytestmark = pytest.mark.anyio

TIMEOUT = 30.0


class Upstream:
    """A scripted OpenAI: per model, a list of (status, headers, code); then 200s."""

    def __init__(self, script: dict[str, list[tuple[int, dict[str, str], str | None]]]) -> None:
        self.script = script
        self.requests: dict[str, int] = {}
        self.sdk = openai.AsyncOpenAI(
            api_key="sk-test",
            base_url="http://api.openai.test/v1",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self._handle)),
        )
        self.sync_sdk = openai.OpenAI(
            api_key="sk-test",
            base_url="http://api.openai.test/v1",
            max_retries=0,
            http_client=httpx2.Client(transport=httpx2.MockTransport(self._handle)),
        )

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        import json

        model = json.loads(request.content)["model"]
        self.requests[model] = self.requests.get(model, 0) + 1
        pending = self.script.get(model, [])
        if pending:
            code, headers, error_code = pending.pop(0)
            body = {"error": {"message": "scripted", "type": "x", "code": error_code}}
            return httpx2.Response(code, headers=headers, json=body)
        return httpx2.Response(
            200,
            json={
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"hi from {model}"},
                        "finish_reason": "stop",
                    }
                ],
            },
        )


def create(upstream: Upstream) -> Callable[..., Any]:
    return upstream.sdk.chat.completions.create


MESSAGES = [{"role": "user", "content": "hi"}]


def scoped(system: ActorSystem, **kwargs: Any) -> CircuitBreaker:
    settings: dict[str, Any] = {"timeout": TIMEOUT, "min_calls": 2, "system": system}
    settings.update(kwargs)
    return CircuitBreaker("LLM", scope="model", **settings)


def state(guard: CircuitBreaker) -> CircuitState:
    return guard.state


async def test_one_models_429_never_rejects_another_model(system: ActorSystem) -> None:
    upstream = Upstream({"gpt-4o": [(429, {"retry-after": "20"}, "rate_limit_exceeded")]})
    guard = scoped(system)
    with pytest.raises(openai.RateLimitError):
        await guard.call(create(upstream), model="gpt-4o", messages=MESSAGES)
    assert state(guard.scoped("gpt-4o")) is CircuitState.OPEN
    assert state(guard) is CircuitState.CLOSED
    reply = await guard.call(create(upstream), model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "hi from gpt-4o-mini"
    with pytest.raises(CircuitBreakerOpenError) as info:
        await guard.call(create(upstream), model="gpt-4o", messages=MESSAGES)
    error = info.value
    assert (error.name, error.scope, error.reason) == ("LLM/gpt-4o", "gpt-4o", "rate_limited")
    assert error.retry_after == pytest.approx(20.0)
    assert "scope 'gpt-4o' of 'LLM'" in str(error)
    assert upstream.requests == {"gpt-4o": 1, "gpt-4o-mini": 1}


async def test_quota_opens_the_parent_and_rejects_every_model(
    system: ActorSystem, clock: FakeClock
) -> None:
    upstream = Upstream({"gpt-4o": [(429, {}, "insufficient_quota")]})
    guard = scoped(system, quota_timeout=600.0)
    await guard.call(create(upstream), model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        await guard.call(create(upstream), model="gpt-4o", messages=MESSAGES)
    assert state(guard) is CircuitState.OPEN
    assert guard.snapshot.open_until == pytest.approx(clock() + 600.0)
    assert state(guard.scoped("gpt-4o")) is CircuitState.CLOSED  # the key, not the model
    for model in ("gpt-4o", "gpt-4o-mini", "o3"):
        with pytest.raises(CircuitBreakerOpenError) as info:
            await guard.call(create(upstream), model=model, messages=MESSAGES)
        assert (info.value.name, info.value.reason) == ("LLM", "quota")
        assert info.value.error_code == "insufficient_quota"
    assert upstream.requests == {"gpt-4o": 1, "gpt-4o-mini": 1}


async def test_402_opens_the_parent(system: ActorSystem) -> None:
    upstream = Upstream({"gpt-4o": [(402, {}, None)]})
    guard = scoped(system)
    with pytest.raises(openai.APIStatusError):
        await guard.call(create(upstream), model="gpt-4o", messages=MESSAGES)
    assert state(guard) is CircuitState.OPEN
    assert guard.snapshot.reason == "quota"


async def test_auth_opens_the_parent_only_with_auth_opens(system: ActorSystem) -> None:
    upstream = Upstream({"gpt-4o": [(401, {}, "invalid_api_key")] * 2})
    quiet = scoped(system)
    with pytest.raises(openai.AuthenticationError):
        await quiet.call(create(upstream), model="gpt-4o", messages=MESSAGES)
    assert state(quiet) is CircuitState.CLOSED
    assert state(quiet.scoped("gpt-4o")) is CircuitState.CLOSED
    strict = CircuitBreaker("KEY2", scope="model", system=system, auth_opens=True)
    with pytest.raises(openai.AuthenticationError):
        await strict.call(create(upstream), model="gpt-4o", messages=MESSAGES)
    assert state(strict) is CircuitState.OPEN
    assert (strict.snapshot.reason, strict.snapshot.error_code) == ("auth", "invalid_api_key")


async def test_failures_count_in_the_scope(system: ActorSystem) -> None:
    upstream = Upstream({"gpt-4o": [(503, {}, None)] * 2})
    guard = scoped(system)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await guard.call(create(upstream), model="gpt-4o", messages=MESSAGES)
    child = guard.scoped("gpt-4o")
    assert state(child) is CircuitState.OPEN
    assert child.snapshot.reason == "failure_rate"
    assert state(guard) is CircuitState.CLOSED
    assert guard.status().failures == 0  # the parent saw no failure
    await guard.call(create(upstream), model="gpt-4.1", messages=MESSAGES)


def test_sync_calls_and_the_fallback_answer_for_either_breaker(system: ActorSystem) -> None:
    upstream = Upstream(
        {
            "gpt-4o": [(429, {"retry-after": "9"}, None)],
            "o3": [(429, {}, "insufficient_quota")],
        }
    )

    def fallback(**kwargs: Any) -> str:
        return f"fallback for {kwargs['model']}"

    guard = CircuitBreaker("LLM", scope="model", system=system, fallback=fallback)

    def sync_create(**kwargs: Any) -> Any:
        return upstream.sync_sdk.chat.completions.create(**kwargs)

    with pytest.raises(openai.RateLimitError):
        guard.call_sync(sync_create, model="gpt-4o", messages=MESSAGES)
    assert guard.call_sync(sync_create, model="gpt-4o", messages=MESSAGES) == (
        "fallback for gpt-4o"
    )
    reply = guard.call_sync(sync_create, model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "hi from gpt-4o-mini"
    with pytest.raises(openai.RateLimitError):
        guard.call_sync(sync_create, model="o3", messages=MESSAGES)
    assert guard.call_sync(sync_create, model="gpt-4o-mini", messages=MESSAGES) == (
        "fallback for gpt-4o-mini"
    )


async def test_a_callable_scope_selects_any_key(system: ActorSystem) -> None:
    def tenant(*args: Any, **kwargs: Any) -> str | None:
        value = kwargs.get("tenant")
        return value if isinstance(value, str) else None

    async def work(tenant: str | None = None, fail: bool = False) -> str:
        if fail:
            raise RuntimeError("down")
        return "ok"

    guard = CircuitBreaker("API", scope=tenant, min_calls=1, system=system)
    with pytest.raises(RuntimeError):
        await guard.call(work, tenant="acme", fail=True)
    assert state(guard.scoped("acme")) is CircuitState.OPEN
    assert await guard.call(work, tenant="globex") == "ok"
    assert guard.status().failures == 0
    # No key: the parent alone governs, and counts everything.
    with pytest.raises(RuntimeError):
        await guard.call(work, fail=True)
    assert guard.status().failures == 1


async def test_past_max_scopes_the_parent_governs_with_one_warning(system: ActorSystem) -> None:
    upstream = Upstream({})
    guard = scoped(system, max_scopes=2)
    with structlog.testing.capture_logs() as logs:
        for model in ("a", "b", "c", "d", "c"):
            await guard.call(create(upstream), model=model, messages=MESSAGES)
    assert guard.scope_count == 2
    assert system.get("LLM/c") is None
    assert guard.scoped("c") is guard
    warnings = [entry for entry in logs if entry["event"] == "breaker_scope_limit"]
    assert len(warnings) == 1
    assert warnings[0]["max_scopes"] == 2


async def test_idle_closed_scopes_expire_open_ones_stay(
    system: ActorSystem, clock: FakeClock
) -> None:
    upstream = Upstream({"hot": [(429, {"retry-after": "500"}, None)]})
    guard = scoped(system, scope_ttl=100.0)
    await guard.call(create(upstream), model="idle", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        await guard.call(create(upstream), model="hot", messages=MESSAGES)
    assert guard.scope_count == 2
    clock.advance(150.0)
    await guard.call(create(upstream), model="fresh", messages=MESSAGES)
    assert guard.scope_count == 2  # "idle" is gone; "hot" is open and stays
    assert system.get("LLM/idle") is None
    assert system.get("LLM/hot") is not None
    assert state(guard.scoped("hot")) is CircuitState.OPEN


def test_without_scope_the_call_path_is_the_class_one(system: ActorSystem) -> None:
    plain = CircuitBreaker("plain", system=system)
    assert "call" not in vars(plain)
    assert "call_sync" not in vars(plain)
    with pytest.raises(ValueError, match="no scopes"):
        plain.scoped("x")


def test_bad_scope_arguments(system: ActorSystem) -> None:
    with pytest.raises(TypeError, match="scope must be"):
        CircuitBreaker("a", scope="tenant", system=system)
    with pytest.raises(ValueError, match="'/'"):
        CircuitBreaker("a/b", scope="model", system=system)
    with pytest.raises(ValueError, match="max_scopes"):
        CircuitBreaker("a", scope="model", max_scopes=-1, system=system)
